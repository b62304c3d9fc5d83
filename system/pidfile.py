"""``-pidfile FILE``: the process id in a file, locked while pyemu runs, removed when it ends.

Management tools find (and signal) the VMM through this file; the lock makes a second pyemu started with
the same file fail at once ("Cannot lock pid file") instead of overwriting the first one's pid, which is
what QEMU does too. The file is removed only by the process that wrote it.
"""

from __future__ import annotations

import errno
import fcntl
import os

from pyemu.errors import ConfigError


class PidFile:
    """An open, locked pid file; :meth:`remove` unlinks and unlocks it."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"-pidfile: cannot open pid file {path}: {os.strerror(exc.errno or errno.EIO)}",
                              option="-pidfile") from exc
        try:
            # flock: owned by this open file description, so closing some other descriptor of the same
            # file (anywhere in the process) cannot drop it, unlike a POSIX record lock.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"-pidfile: Cannot lock pid file {path}: {os.strerror(exc.errno or errno.EIO)}",
                              option="-pidfile") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def remove(self) -> None:
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # already gone: nothing else to clean up
        os.close(self._fd)
        self._fd = -1
