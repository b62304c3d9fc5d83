"""Reading kernel and initrd files with errors that name the file.

Kernels are tens of MiB (an uncompressed ``vmlinux`` is ~65 MiB), so large parts are copied straight into
guest RAM (:meth:`GuestMemory.copy_from_file`) instead of through an intermediate ``bytes`` copy.
"""

from __future__ import annotations

import io
import os

from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.errors import ImageReadError, TruncatedImageError


class ImageFile:
    """An open kernel/initrd file: its size, bounded reads and reads into guest memory."""

    def __init__(self, path: str | os.PathLike[str], what: str = "kernel") -> None:
        self.path = os.fspath(path)
        self.what = what
        try:
            self._file: io.BufferedReader = open(self.path, "rb")
            self.size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise ImageReadError(
                f"cannot open {what} '{self.path}': {exc.strerror or exc}", path=self.path
            ) from exc

    @property
    def stream(self) -> io.BufferedReader:
        """The open file, for parsers (pyelftools) that read it themselves."""
        return self._file

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read_at(self, offset: int, size: int, *, what: str = "data") -> bytes:
        """Exactly ``size`` bytes at ``offset``; a short file raises TruncatedImageError."""
        if offset < 0 or offset + size > self.size:
            raise self.truncated(offset + size, what)
        try:
            self._file.seek(offset)
            data = self._file.read(size)
        except OSError as exc:
            raise ImageReadError(f"cannot read {self.what} '{self.path}': {exc.strerror}", path=self.path) from exc
        if len(data) != size:
            raise self.truncated(offset + size, what)
        return data

    def head(self, size: int) -> bytes:
        """Up to ``size`` bytes from the start (shorter if the file is)."""
        return self.read_at(0, min(size, self.size))

    def copy_to_memory(self, memory: GuestMemory, gpa: int, offset: int, size: int, *, what: str) -> None:
        """Copy ``size`` bytes at file ``offset`` into guest RAM at ``gpa`` (in the kernel: no bytes object,
        no page faults through pyemu's mapping)."""
        if offset < 0 or offset + size > self.size:
            raise self.truncated(offset + size, what)
        try:
            copied = memory.copy_from_file(gpa, self._file.fileno(), offset, size)
        except OSError as exc:
            raise ImageReadError(f"cannot read {self.what} '{self.path}': {exc.strerror}", path=self.path) from exc
        if copied < size:
            raise self.truncated(offset + size, what)

    def truncated(self, needed: int, what: str) -> TruncatedImageError:
        return TruncatedImageError(
            f"{self.what} '{self.path}' is truncated: {what} needs {needed} bytes but the file has {self.size}",
            path=self.path,
        )
