"""Typed errors of the block layer.

Two families, because the people who act on them differ:

* run-time I/O failures (:class:`BlockIOError`, :class:`ReadOnlyError`) carry an ``errno`` plus the request's
  ``offset``/``length``, so a device model can turn them into its own status code (virtio-blk IOERR) and log
  what failed, and a later error policy (QEMU's werror/rerror) can decide on ENOSPC vs EIO;
* open-time problems -- a bad ``-drive`` option, a file that cannot be opened, an image another process
  holds -- which the CLI prints in one line and exits. Those about options derive from
  :class:`~pyemu.errors.ConfigError`; :class:`ImageLockedError` is separate because it is about another
  process, not about the command line, and callers (QMP ``blockdev-add`` later) may want to retry it.

Errors wrapping an OSError are raised ``from`` it so the cause stays visible.
"""

from __future__ import annotations

import errno as _errno
import os

from pyemu.errors import ConfigError, PyemuError


class BlockError(PyemuError):
    """Root of every error the block layer raises on purpose."""


class BlockIOError(BlockError):
    """A read, write, flush, discard or status query failed; ``errno`` says why (EINVAL for a request outside
    the image, EIO/ENOSPC/... from the host). ``offset``/``length`` describe the request (-1 when not a
    ranged request, e.g. flush)."""

    def __init__(self, message: str, *, errno: int, offset: int = -1, length: int = -1) -> None:
        super().__init__(message)
        self.errno = errno
        self.offset = offset
        self.length = length

    @classmethod
    def from_os_error(cls, op: str, filename: str, exc: OSError, *, offset: int = -1,
                      length: int = -1) -> "BlockIOError":
        """The error for a failed host call; raise it ``from exc``."""
        code = exc.errno if exc.errno is not None else _errno.EIO
        where = f" at offset {offset} length {length}" if offset >= 0 else ""
        return cls(f"{op} on '{filename}'{where} failed: {os.strerror(code)}", errno=code, offset=offset,
                   length=length)


class ReadOnlyError(BlockError):
    """A write, discard or write-zeroes request reached a read-only node or backend (EROFS semantics; the
    image is left untouched)."""

    errno = _errno.EROFS

    def __init__(self, message: str, *, offset: int = -1, length: int = -1) -> None:
        super().__init__(message)
        self.offset = offset
        self.length = length


class ImageLockedError(BlockError):
    """Another user (QEMU, qemu-img, another pyemu) holds image locks that conflict with ours.

    The message is QEMU's: ``Failed to get "write" lock`` followed by the hint line ``Is another process
    using the image [PATH]?``; ``permission`` names the permission ("write", "consistent read", ...) and
    ``shared`` is True when the conflict is about a permission we refuse to share (QEMU's
    ``Failed to get shared "write" lock``).
    """

    errno = _errno.EAGAIN

    def __init__(self, filename: str, permission: str, *, shared: bool) -> None:
        what = f'shared "{permission}"' if shared else f'"{permission}"'
        super().__init__(f"Failed to get {what} lock\nIs another process using the image [{filename}]?")
        self.filename = filename
        self.permission = permission
        self.shared = shared


class BlockConfigError(ConfigError):
    """A ``-drive`` option is invalid, or the image it names cannot be opened as asked. ``errno`` is set
    when an OSError was the cause (ENOENT, EACCES, EINVAL for O_DIRECT ...)."""

    def __init__(self, message: str, *, option: str | None = "-drive", errno: int | None = None) -> None:
        super().__init__(message, option=option)
        self.errno = errno
