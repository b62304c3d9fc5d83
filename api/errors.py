"""Typed errors of the Python API (:mod:`pyemu.api`): what a program driving a VM can catch and act on.

Configuration mistakes keep their own type (:class:`~pyemu.errors.ConfigError`, the same one the CLI
prints). A command the VM refuses is a :class:`CommandError` carrying QEMU's error class whether the VM
runs in this process or behind a QMP socket, so one ``except`` serves both.
"""

from __future__ import annotations

from pyemu.errors import PyemuError


class VmError(PyemuError):
    """Root of the API's own errors."""


class VmStateError(VmError):
    """The call does not fit the object's life cycle (``pause`` before ``start``, ``start`` twice...)."""


class VmTimeout(VmError):
    """A wait (``wait``, ``expect``, ``events.get``) ran out of time; the VM is left as it was."""


class ConsoleError(VmError):
    """The serial console is not available, or its connection failed."""


class ConsoleTimeout(VmTimeout, ConsoleError):
    """``expect`` did not see its pattern in time; ``output`` holds what the console printed."""

    def __init__(self, message: str, *, output: str) -> None:
        super().__init__(message)
        self.output = output


class ConsoleClosed(ConsoleError):
    """The console ended (the VM is gone) before ``expect`` saw its pattern."""

    def __init__(self, message: str, *, output: str) -> None:
        super().__init__(message)
        self.output = output


class RemoteError(VmError):
    """Talking to a VM over QMP failed: it could not be reached, or the connection broke."""


class CommandError(VmError):
    """The VM refused a QMP command; ``error_class`` is QEMU's class (GenericError, CommandNotFound...)."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc
