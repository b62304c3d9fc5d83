"""Typed errors of the KVM accelerator.

Every failing ioctl becomes a :class:`KvmError` that names the ioctl and the errno, raised ``from`` the
OSError, so a user sees "KVM_SET_SREGS failed: Invalid argument (errno 22)" instead of a bare -1, and a
test can assert on ``exc.ioctl``. A host without a usable /dev/kvm is not a KvmError: the accelerator
raises :class:`pyemu.accel.base.AcceleratorUnavailable`, which the CLI turns into a hint to use ``-accel tcg``.
"""

from __future__ import annotations

import errno as _errno
import os

from pyemu.errors import PyemuError


class KvmError(PyemuError):
    """A KVM ioctl failed (``ioctl`` is its name, ``errno`` the error number) or returned nonsense."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        name = _errno.errorcode.get(errno, str(errno))
        message = f"{ioctl} failed: {os.strerror(errno)} ({name})"
        if detail:
            message += f": {detail}"
        super().__init__(message)
        self.ioctl = ioctl
        self.errno = errno
        self.detail = detail


class KvmStateError(KvmError):
    """KVM refused part of a vCPU state being loaded (an MSR it does not know, an invalid segment...)."""
