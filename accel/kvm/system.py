"""``/dev/kvm`` itself: API version, capabilities, and what the host can offer a guest.

This is where "can this host run KVM at all" is decided, so the answer is one clear
:class:`~pyemu.accel.base.AcceleratorUnavailable` line (suggesting ``-accel tcg``) instead of an errno
surfacing later from some VM ioctl.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pyemu.accel.base import AcceleratorUnavailable
from pyemu.accel.kvm import abi
from pyemu.accel.kvm.abi import ffi
from pyemu.accel.kvm.errors import KvmError
from pyemu.accel.kvm.fd import KvmFd

DEFAULT_DEVICE = "/dev/kvm"
DEVICE_ENV = "PYEMU_KVM_DEVICE"
"""Environment variable naming the KVM device to open instead of /dev/kvm. Lets a test (or a user with a
KVM device elsewhere, e.g. in a container) choose the device without root: pointing it at a path that does
not exist makes KVM unusable, which exercises ``-accel kvm:tcg`` fallback and the ``-accel kvm`` error."""


def default_device() -> str:
    """The device :class:`KvmSystem` opens when given none: ``$PYEMU_KVM_DEVICE`` if set, else /dev/kvm."""
    return os.environ.get(DEVICE_ENV) or DEFAULT_DEVICE

REQUIRED_CAPABILITIES: dict[str, int] = {
    "KVM_CAP_USER_MEMORY": abi.KVM_CAP_USER_MEMORY,
    "KVM_CAP_SET_TSS_ADDR": abi.KVM_CAP_SET_TSS_ADDR,
    "KVM_CAP_EXT_CPUID": abi.KVM_CAP_EXT_CPUID,
    "KVM_CAP_IRQCHIP": abi.KVM_CAP_IRQCHIP,
    "KVM_CAP_SPLIT_IRQCHIP": abi.KVM_CAP_SPLIT_IRQCHIP,
    "KVM_CAP_SIGNAL_MSI": abi.KVM_CAP_SIGNAL_MSI,
    "KVM_CAP_IMMEDIATE_EXIT": abi.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_MP_STATE": abi.KVM_CAP_MP_STATE,
    "KVM_CAP_VCPU_EVENTS": abi.KVM_CAP_VCPU_EVENTS,
}
"""Without these the run loop and the split-irqchip design do not work; checked before creating a VM."""

_MAX_CPUID_ENTRIES = 256
_MAX_MSR_INDICES = 1024


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID answer as KVM exchanges it (``kvm_cpuid_entry2`` without the padding)."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    @property
    def regs(self) -> tuple[int, int, int, int]:
        return (self.eax, self.ebx, self.ecx, self.edx)


class KvmSystem:
    """The open KVM device (``path``, default :func:`default_device`). Raises AcceleratorUnavailable when
    the device is missing, not accessible, speaks another API version, or lacks a required capability."""

    def __init__(self, path: str | None = None) -> None:
        path = default_device() if path is None else path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            why = "does not exist" if exc.errno == errno.ENOENT else exc.strerror
            raise AcceleratorUnavailable(
                f"KVM is not available: {path} {why}; use -accel tcg (software CPU) instead"
            ) from exc
        self.path = path
        self.fd = KvmFd(fd, path)
        try:
            version = self.fd.ioctl(abi.KVM_GET_API_VERSION)
            if version != abi.KVM_API_VERSION:
                raise AcceleratorUnavailable(
                    f"KVM is not usable: {path} speaks API version {version}, pyemu needs "
                    f"{abi.KVM_API_VERSION}; use -accel tcg instead"
                )
            missing = [name for name, cap in REQUIRED_CAPABILITIES.items() if not self.check_extension(cap)]
            if missing:
                raise AcceleratorUnavailable(
                    f"KVM is not usable: {path} lacks {', '.join(missing)}; use -accel tcg instead"
                )
            self.vcpu_mmap_size = self.fd.ioctl(abi.KVM_GET_VCPU_MMAP_SIZE)
        except KvmError as exc:
            self.fd.close()
            raise AcceleratorUnavailable(f"KVM is not usable: {exc}; use -accel tcg instead") from exc
        except AcceleratorUnavailable:
            self.fd.close()
            raise
        self._supported_cpuid: tuple[CpuidEntry, ...] | None = None
        self._msr_indices: frozenset[int] | None = None

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific positive value."""
        return self.fd.ioctl(abi.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        """KVM_GET_SUPPORTED_CPUID: every leaf and bit KVM can present on this host (cached)."""
        if self._supported_cpuid is None:
            count = _MAX_CPUID_ENTRIES
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + count * ffi.sizeof("struct kvm_cpuid_entry2"))
            table = ffi.cast("struct kvm_cpuid2 *", raw)
            table.nent = count
            self.fd.ioctl(abi.KVM_GET_SUPPORTED_CPUID, table)
            self._supported_cpuid = tuple(
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (table.entries[i] for i in range(table.nent))
            )
        return self._supported_cpuid

    def msr_indices(self) -> frozenset[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs KVM can save and restore for a vCPU (cached)."""
        if self._msr_indices is None:
            raw = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * _MAX_MSR_INDICES)
            listing = ffi.cast("struct kvm_msr_list *", raw)
            listing.nmsrs = _MAX_MSR_INDICES
            self.fd.ioctl(abi.KVM_GET_MSR_INDEX_LIST, listing)
            self._msr_indices = frozenset(listing.indices[i] for i in range(listing.nmsrs))
        return self._msr_indices

    def close(self) -> None:
        self.fd.close()
