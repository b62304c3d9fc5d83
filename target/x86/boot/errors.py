"""Typed errors of the direct kernel loaders.

Every problem with a user's ``-kernel``/``-initrd``/``-append`` input ends in one of these, naming the file
and what is wrong with it, so the CLI prints one line instead of a traceback. The tree lets callers (and
tests) tell "this file is not a kernel" from "this kernel does not fit in this machine".
"""

from __future__ import annotations

from pyemu.errors import PyemuError


class BootError(PyemuError):
    """Root of the boot-loader errors. ``path`` is the offending file, when there is one."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ImageReadError(BootError):
    """The kernel or initrd file cannot be opened or read (missing, permissions, I/O error)."""


class NotAKernelError(BootError):
    """The file is none of the formats we boot (bzImage, ELF with a PVH note, multiboot image)."""


class TruncatedImageError(BootError):
    """The file is shorter than its own headers say it is."""


class UnsupportedProtocolError(BootError):
    """A recognised image that asks for a protocol version or feature we do not implement."""


class ImageTooLargeError(BootError):
    """The kernel or initrd does not fit into the guest's RAM (as described by the e820 map)."""


class CmdlineError(BootError):
    """The kernel command line cannot be passed as given (e.g. it contains a NUL character)."""


class CmdlineTooLongError(CmdlineError):
    """The command line is longer than the kernel (or our command-line area) accepts."""

    def __init__(self, message: str, *, path: str | None = None, length: int, limit: int) -> None:
        super().__init__(message, path=path)
        self.length = length
        self.limit = limit


class MemoryMapError(BootError):
    """The e820 map given by the board is invalid, or conflicts with what the loader must place."""
