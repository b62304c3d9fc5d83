"""The KVM guest TSC across pause, resume and reset, as QEMU keeps it (and kvmclock with it).

KVM's guest TSC keeps counting while no vCPU runs (it is the host TSC scaled plus a per-vCPU offset), so
"stands still while paused" means: read each vCPU's TSC when the VM stops and, when it runs again, move
each offset back by what the TSC advanced meanwhile. The lever is the vCPU attribute KVM_VCPU_TSC_OFFSET
(Linux 5.16+), which sets the offset exactly; IA32_TSC writes through KVM_SET_MSRS are the fallback, but
KVM treats a host write within a second of the value it expects as a vCPU synchronisation and may keep its
old offset, so every change is read back and checked. kvmclock is stopped the QEMU way
(KVM_GET_CLOCK at stop, KVM_SET_CLOCK at resume).

Measured on this host (PVM-based KVM, Linux 6.18, 2026-12-03): the guest TSC *is* the host TSC (it reads
the host's ~5e13 right after vCPU creation); KVM_HAS_DEVICE_ATTR reports KVM_VCPU_TSC_OFFSET, SET accepts
any value but GET reads 0 again and RDTSC in the guest does not move; KVM_SET_MSRS of IA32_TSC (0 or 2^50)
is accepted and ignored too. RDTSC is not virtualised there, so the guest TSC cannot start at 0 nor stop
while paused. The check notices it: :attr:`KvmGuestTsc.controllable` becomes False, one line says so under
``-d unimp``, and pause/resume still stop and resume the vCPUs and kvmclock.
"""

from __future__ import annotations

from typing import Callable, Protocol

from pyemu.accel.kvm import abi
from pyemu.accel.kvm.abi import ffi
from pyemu.accel.kvm.errors import KvmError
from pyemu.accel.kvm.fd import KvmFd
from pyemu.system import log

_MASK = 0xFFFF_FFFF_FFFF_FFFF
_TOLERANCE_S = 0.25  # a set TSC may be this far past the wanted value (ioctl latency on a busy host)


class TscVcpu(Protocol):
    index: int

    def guest_tsc(self) -> int: ...

    def set_guest_tsc(self, value: int) -> None: ...

    def tsc_offset(self) -> int | None: ...

    def set_tsc_offset(self, offset: int) -> None: ...

    def tsc_khz(self) -> int: ...


class KvmGuestTsc:
    """Freeze, continue and zero the guest TSC of every vCPU of one VM (all vCPUs parked)."""

    def __init__(self, vcpus: Callable[[], tuple[TscVcpu, ...]], vm_fd: KvmFd | None = None) -> None:
        self._vcpus = vcpus
        self._vm_fd = vm_fd
        self._frozen: list[int] | None = None
        self._clock: int | None = None
        self.controllable: bool | None = None
        """None until the first change; False once KVM was seen to ignore a TSC change."""

    @property
    def running(self) -> bool:
        return self._frozen is None

    def value(self) -> int:
        """vCPU 0's guest TSC (the frozen value while stopped)."""
        if self._frozen is not None:
            return self._frozen[0] if self._frozen else 0
        vcpus = self._vcpus()
        return vcpus[0].guest_tsc() if vcpus else 0

    def stop(self) -> None:
        if self._frozen is not None:
            return
        self._frozen = [vcpu.guest_tsc() for vcpu in self._vcpus()]
        self._clock = self._get_clock()

    def start(self) -> None:
        if self._frozen is None:
            return
        frozen, self._frozen = self._frozen, None
        for vcpu, value in zip(self._vcpus(), frozen):
            self._set(vcpu, value)
        if self._clock is not None:
            self._set_clock(self._clock)
            self._clock = None

    def reset(self) -> None:
        if self._frozen is not None:
            self._frozen = [0] * len(self._frozen)
            return
        for vcpu in self._vcpus():
            self._set(vcpu, 0)

    def set(self, value: int) -> None:
        """Every vCPU's TSC reads ``value`` now (a restored VM's); frozen there if stopped."""
        if self._frozen is not None:
            self._frozen = [value] * len(self._frozen)
            return
        for vcpu in self._vcpus():
            self._set(vcpu, value)

    # -- one vCPU ---------------------------------------------------------------------------------------
    def _set(self, vcpu: TscVcpu, value: int) -> None:
        """Make ``vcpu``'s TSC read ``value`` now, by its offset where KVM has the attribute."""
        if self.controllable is False:
            return
        try:
            offset = vcpu.tsc_offset()
            if offset is not None:
                vcpu.set_tsc_offset(offset + (value - vcpu.guest_tsc()))
            else:
                vcpu.set_guest_tsc(value)
            now = vcpu.guest_tsc()
        except KvmError as exc:
            self._give_up(vcpu, f"{exc}")
            return
        slack = vcpu.tsc_khz() * 1000 * _TOLERANCE_S
        if not 0 <= (now - value) & _MASK <= slack:
            self._give_up(vcpu, f"asked for {value:#x}, reads {now:#x}")
            return
        self.controllable = True

    def _give_up(self, vcpu: TscVcpu, detail: str) -> None:
        self.controllable = False
        log.log("unimp", f"kvm: vCPU {vcpu.index}: this host's KVM ignores guest TSC changes ({detail}); "
                         "the guest TSC follows the host's and keeps counting while the VM is paused")

    # -- kvmclock ---------------------------------------------------------------------------------------
    def _get_clock(self) -> int | None:
        if self._vm_fd is None:
            return None
        data = ffi.new("struct kvm_clock_data *")
        try:
            self._vm_fd.ioctl(abi.KVM_GET_CLOCK, data)
        except KvmError:
            return None
        return int(data.clock)

    def _set_clock(self, clock: int) -> None:
        assert self._vm_fd is not None
        data = ffi.new("struct kvm_clock_data *")
        data.clock = clock
        try:
            self._vm_fd.ioctl(abi.KVM_SET_CLOCK, data)
        except KvmError as exc:
            log.log("unimp", f"kvm: KVM_SET_CLOCK: {exc}; kvmclock went on while the VM was paused")
