"""Which accelerators guest-program tests can run on this host.

The software CPU is always available. KVM needs both the ``pyemu.accel.kvm.accel`` module and a
``/dev/kvm`` that can create a VM; tests parametrized over ``["tcg", "kvm"]`` skip the kvm case otherwise.
"""

from __future__ import annotations

import fcntl
import functools
import os

_KVM_CREATE_VM = 0xAE01


@functools.cache
def kvm_unavailable_reason() -> str | None:
    """None if KVM guest tests can run here, else why not."""
    try:
        import pyemu.accel.kvm.accel  # noqa: F401
    except ImportError as exc:
        return f"pyemu.accel.kvm.accel cannot be imported: {exc}"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm unusable: {exc.strerror}"
    try:
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as exc:
        return f"KVM_CREATE_VM failed: {exc.strerror}"
    finally:
        os.close(fd)
    return None


ACCELERATORS = ("tcg", "kvm")


def limited_kvm_reason(accel: str, what: str) -> str | None:
    """This host's KVM is PVM-based: CPL3 code and ``int3`` fail there even under QEMU (DESIGN.md).
    Tests needing them skip their kvm case unless PYEMU_KVM_FULL=1 says the host has a regular KVM."""
    if accel == "kvm" and os.environ.get("PYEMU_KVM_FULL") != "1":
        return f"{what} does not work under this host's PVM-based KVM (set PYEMU_KVM_FULL=1 elsewhere)"
    return None
