"""Typed errors of the software CPU (``accel/tcg``).

Everything the Unicorn vCPU raises on purpose derives from :class:`TcgError`. Errors that stop the guest
(triple fault, an instruction fetch from a device window) are not raised out of ``run()``: the run loop
turns them into ``Shutdown(reason)``. What is raised is what a caller must fix: an engine that cannot be
created, a calibration that does not match this Unicorn build, a block hook that cannot be compiled.
"""

from __future__ import annotations

from pyemu.errors import PyemuError


class TcgError(PyemuError):
    """Root of the software CPU's errors."""


class EngineError(TcgError):
    """Unicorn refused an operation (map, hook, register access); ``operation`` names it."""

    def __init__(self, message: str, *, operation: str) -> None:
        super().__init__(message)
        self.operation = operation


class CalibrationError(TcgError):
    """The CPU-state blob of this Unicorn build does not look like the one the vCPU was written for.

    ``field`` is the blob field whose offset could not be found unambiguously. Seeing this error means the
    Unicorn version changed: re-run the calibration probes and review accel/tcg/calibration.py.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class BlockHookBuildError(TcgError):
    """The C block hook (built with cffi at first use) could not be compiled or loaded."""

    def __init__(self, message: str, *, build_dir: str) -> None:
        super().__init__(message)
        self.build_dir = build_dir


class EngineBuildError(TcgError):
    """pyemu's build of the Unicorn engine failed; ``step`` names where (download, patch, configure,
    compile, check). The software CPU then runs on the PyPI library, slower but the same guest-visible CPU."""

    def __init__(self, message: str, *, step: str) -> None:
        super().__init__(message)
        self.step = step


class GuestFault(TcgError):
    """An architectural exception raised while the vCPU itself accesses guest state (IDT/GDT/TSS reads,
    stack pushes during delivery, SYSCALL's instruction fetch). Internal to delivery: it becomes the
    next event to deliver (or a double fault), never leaves ``run()``."""

    def __init__(self, vector: int, error_code: int | None = None, *, cr2: int | None = None) -> None:
        super().__init__(f"guest fault vector {vector} error code {error_code}")
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class TripleFault(TcgError):
    """A fault occurred while delivering a double fault: the CPU shuts down (``Shutdown("triple fault")``)."""


class UnsupportedGuestState(TcgError):
    """The guest reached a CPU feature the software CPU does not model (task gates, virtual-8086 mode);
    ``run()`` reports it as ``Shutdown(reason)``."""
