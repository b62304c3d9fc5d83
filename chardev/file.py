"""The ``file:PATH`` backend: guest output written to a file, no input.

Like QEMU's ``-serial file:PATH`` the file is created or truncated when the VM starts, so a log holds one
run; :class:`~pyemu.chardev.spec.FileSpec` with ``append=True`` keeps earlier contents (QEMU's
``append=on``). Writes go straight to the kernel (unbuffered) so a crash loses nothing the guest printed.
"""

from __future__ import annotations

import os

from pyemu.chardev.base import CharBackend, host_warning
from pyemu.chardev.errors import ChardevError
from pyemu.chardev.spec import FileSpec


class FileBackend(CharBackend):
    def __init__(self, spec: FileSpec) -> None:
        super().__init__(str(spec))
        self.path = spec.path
        try:
            mode = os.O_APPEND if spec.append else os.O_TRUNC
            self._fd: int | None = os.open(spec.path, os.O_WRONLY | mode | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self._wake.close()
            raise ChardevError(f"cannot open chardev file '{spec.path}': {exc.strerror}",
                               spec=str(spec)) from exc
        self.bytes_dropped = 0

    def write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            self.bytes_dropped += len(data)
            return
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            # Disk full or the file system went away: keep the VM running, stop writing.
            self.bytes_dropped += len(view)
            self._fd = None
            os.close(fd)
            host_warning(f"chardev {self.label}: output stopped: {exc.strerror}")

    def _close_resources(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
