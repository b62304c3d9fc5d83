"""KvmGuestTsc's bookkeeping against fake vCPUs whose TSC is host TSC + offset, as KVM's: freeze on stop,
continue on start, zero on reset, through the offset attribute or an IA32_TSC write, and the give-up path
for a KVM that ignores both (this host's PVM, measured)."""

from __future__ import annotations

from pyemu.accel.kvm.guest_tsc import KvmGuestTsc
from pyemu.testing.clock import FakeClock

KHZ = 1_000_000  # 1 GHz: one cycle per fake nanosecond
MASK = (1 << 64) - 1


class FakeTscVcpu:
    def __init__(self, index: int, host: FakeClock, *, has_offset: bool = True, honours: bool = True) -> None:
        self.index = index
        self.host = host
        self.offset = 0
        self.has_offset = has_offset
        self.honours = honours

    def guest_tsc(self) -> int:
        return (self.host.ns + self.offset) & MASK

    def set_guest_tsc(self, value: int) -> None:
        if self.honours:
            self.offset = (value - self.host.ns) & MASK

    def tsc_offset(self) -> int | None:
        return self.offset if self.has_offset else None

    def set_tsc_offset(self, offset: int) -> None:
        if self.honours:
            self.offset = offset & MASK

    def tsc_khz(self) -> int:
        return KHZ


def make(host: FakeClock, **kwargs: bool) -> tuple[KvmGuestTsc, tuple[FakeTscVcpu, ...]]:
    vcpus = (FakeTscVcpu(0, host, **kwargs), FakeTscVcpu(1, host, **kwargs))
    return KvmGuestTsc(lambda: vcpus), vcpus


def check_freeze_continue_reset(host: FakeClock, tsc: KvmGuestTsc, vcpus: tuple[FakeTscVcpu, ...]) -> None:
    host.ns += 1000
    tsc.stop()
    assert tsc.value() == 1000
    host.ns += 5_000_000_000  # paused 5 s
    tsc.start()
    assert [v.guest_tsc() for v in vcpus] == [1000, 1000]
    host.ns += 10
    tsc.reset()
    assert [v.guest_tsc() for v in vcpus] == [0, 0]
    tsc.stop()
    host.ns += 99
    tsc.reset()
    tsc.start()
    assert [v.guest_tsc() for v in vcpus] == [0, 0]
    assert tsc.controllable is True


def test_offset_attribute_freezes_continues_and_zeroes() -> None:
    host = FakeClock(10**12)
    tsc, vcpus = make(host)
    tsc.reset()
    check_freeze_continue_reset(host, tsc, vcpus)


def test_msr_write_is_the_fallback_without_the_attribute() -> None:
    host = FakeClock(10**12)
    tsc, vcpus = make(host, has_offset=False)
    tsc.reset()
    check_freeze_continue_reset(host, tsc, vcpus)


def test_a_kvm_that_ignores_tsc_changes_is_detected_and_left_alone() -> None:
    host = FakeClock(5 * 10**13)  # what this host's PVM guests read: the host TSC
    tsc, vcpus = make(host, honours=False)
    tsc.reset()
    assert tsc.controllable is False
    host.ns += 100
    tsc.stop()
    host.ns += 1000
    tsc.start()  # no exception, no further attempts
    assert vcpus[0].guest_tsc() == 5 * 10**13 + 1100
