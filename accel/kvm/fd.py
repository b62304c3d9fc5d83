"""An open KVM file descriptor (``/dev/kvm``, a VM or a vCPU) and the one place ioctls are issued.

Why libc's ``ioctl`` through cffi rather than ``fcntl.ioctl``: the argument is the cffi structure itself
(no ``bytes`` round trip per call) and cffi releases the GIL for the duration of the call, so a vCPU
sitting in ``KVM_RUN`` does not stop the rest of the VMM. ``benchmarks/kvm_exits.py`` measures both.
"""

from __future__ import annotations

import os
from typing import Any

from pyemu.accel.kvm.abi import IOCTL_NAMES, ffi, libc
from pyemu.accel.kvm.errors import KvmError

_NO_ARG = ffi.cast("unsigned long", 0)


class KvmFd:
    """Owns one fd; :meth:`ioctl` raises :class:`KvmError` (with the ioctl's name) on failure."""

    def __init__(self, fd: int, what: str) -> None:
        self.fd = fd
        self.what = what

    def ioctl(self, request: int, arg: Any = None) -> int:
        """Issue ``request``; ``arg`` is a cffi pointer, an int (passed by value) or None."""
        if arg is None:
            result = libc.ioctl(self.fd, request, _NO_ARG)
        elif isinstance(arg, int):
            result = libc.ioctl(self.fd, request, ffi.cast("unsigned long", arg))
        else:
            result = libc.ioctl(self.fd, request, arg)
        if result < 0:
            err = ffi.errno
            name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
            raise KvmError(name, err, f"on {self.what}") from OSError(err, os.strerror(err))
        return int(result)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0
