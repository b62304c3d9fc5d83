"""The root of pyemu's typed errors.

Every error pyemu raises on purpose derives from :class:`PyemuError`, so the CLI can print one clear line
for any of them and exit, while a genuine bug still shows its traceback. Each package adds its own subtree
(``GuestMemoryError`` here, ``BootError`` in target/x86/boot, ``TcgError`` in accel/tcg, ...), and errors
that wrap an OSError are raised ``from`` it so the cause is kept.
"""

from __future__ import annotations


class PyemuError(Exception):
    """Base of every error pyemu raises deliberately."""


class ConfigError(PyemuError):
    """A user-supplied configuration (CLI option, device property, machine option) is invalid."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class GuestMemoryError(PyemuError):
    """An access to guest-physical memory falls outside guest RAM."""

    def __init__(self, message: str, *, gpa: int, size: int) -> None:
        super().__init__(message)
        self.gpa = gpa
        self.size = size


class BusError(PyemuError):
    """A device registration on an I/O or MMIO bus is invalid (overlap, empty range)."""


class GuestError(PyemuError):
    """The guest did something that stops the machine (triple fault, unhandled CPU state)."""
