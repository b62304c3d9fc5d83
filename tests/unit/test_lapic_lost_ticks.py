"""Lost-tick compensation of the LAPIC's periodic timer (QEMU's ``lost_tick_policy=delay``, KVM's pending
timer count), on a fake clock.

Why it matters: until Linux trusts its TSC it counts jiffies by periodic timer interrupts, and its
clocksource watchdog compares the TSC against those jiffies. Each periodic expiry the guest does not get
as an interrupt -- because the timer thread ran late, or because the previous interrupt was still waiting
in IRR when the next period ended -- is a jiffy lost, and on a loaded host enough of them made Linux mark
the TSC unstable. So every period must reach the guest as one interrupt, late but not lost, within a
bound, and only for the timer programming that produced it.
"""

from __future__ import annotations

import dataclasses

import pytest

from pyemu.hw.core.state import StateError
from pyemu.hw.intc.lapic import (
    LVT_MASKED,
    REG_EOI,
    REG_LVT_TIMER,
    REG_SVR,
    REG_TIMER_DIVIDE,
    REG_TIMER_INITIAL,
    LapicState,
    LocalApic,
)
from pyemu.hw.intc.lapic_timer import (
    MAX_BACKLOG_NS,
    MODE_ONESHOT,
    MODE_PERIODIC,
    ApicTimer,
    ApicTimerState,
)
from pyemu.system.timers import TimerQueue, VirtualClock
from pyemu.target.x86.cpuid import TSC_CRYSTAL_HZ
from pyemu.testing.apic import ApicRegisters
from pyemu.testing.clock import FakeClock

VECTOR = 0xEC
PERIODIC = 1 << 17
INITIAL = 25_000  # at divide 4 and a 25 MHz crystal: 4 ms, Linux's HZ=250 tick
PERIOD_NS = INITIAL * 4 * 1_000_000_000 // TSC_CRYSTAL_HZ


class Rig(ApicRegisters):
    """One LAPIC on a timer queue whose clock the test moves."""

    def __init__(self, clock: FakeClock | VirtualClock | None = None) -> None:
        self.clock = clock if clock is not None else FakeClock()
        self.queue = TimerQueue(clock=self.clock)
        self.kicks = 0
        self.apic = LocalApic(self.queue, kick=self._kick)

    def periodic(self, initial: int = INITIAL, *, masked: bool = False) -> None:
        """Enable the APIC and start a periodic timer on VECTOR at divide 4."""
        self.enable()
        self.wr(REG_TIMER_DIVIDE, 0b0001)
        self.wr(REG_LVT_TIMER, PERIODIC | VECTOR | (LVT_MASKED if masked else 0))
        self.wr(REG_TIMER_INITIAL, initial)

    def late_to(self, ns: int) -> None:
        """The timer thread wakes only at ``ns`` (a host that did not schedule it): one run of the queue."""
        assert isinstance(self.clock, FakeClock)
        self.clock.ns = ns
        self.queue.run_due()

    def on_time_to(self, ns: int) -> None:
        """The timer thread runs each expiry at its deadline up to ``ns`` (the vCPU need not run)."""
        assert isinstance(self.clock, FakeClock)
        while (deadline := self.queue.next_deadline()) is not None and deadline <= ns:
            self.clock.ns = max(self.clock.ns, deadline)
            self.queue.run_due()
        self.clock.ns = ns

    def take_all(self, limit: int = 10_000) -> int:
        """The guest takes and EOIs timer interrupts as long as one is pending; how many it took."""
        taken = 0
        while self.apic.interrupt_pending():
            assert self.apic.acknowledge_interrupt() == VECTOR
            self.wr(REG_EOI, 0)
            taken += 1
            assert taken <= limit
        return taken


def test_an_expiry_three_periods_late_gives_three_interrupts_back_to_back() -> None:
    rig = Rig()
    rig.periodic()
    rig.late_to(3 * PERIOD_NS)  # expiries at 1, 2 and 3 periods are all due at once
    assert rig.apic.timer.backlog == 2
    # One at a time: the next is requested when the guest accepts the previous, taken after its EOI.
    assert rig.apic.acknowledge_interrupt() == VECTOR
    assert not rig.apic.interrupt_pending()
    rig.wr(REG_EOI, 0)
    assert rig.take_all() == 2
    assert rig.apic.timer.backlog == 0
    # The timer keeps its phase: the next interrupt comes at 4 periods, not 3 + 1 periods after the wake.
    rig.on_time_to(4 * PERIOD_NS - 1)
    assert not rig.apic.interrupt_pending()
    rig.on_time_to(4 * PERIOD_NS)
    assert rig.take_all() == 1


def test_expiries_while_the_previous_interrupt_waits_in_irr_are_not_merged() -> None:
    """The timer thread is punctual but the vCPU does not run for three periods."""
    rig = Rig()
    rig.periodic()
    rig.on_time_to(3 * PERIOD_NS)
    assert rig.take_all() == 3
    rig.on_time_to(10 * PERIOD_NS)
    assert rig.take_all() == 7  # the count of interrupts tracks the virtual clock


def test_an_expiry_during_the_handler_is_an_ordinary_interrupt() -> None:
    """In service but no longer requested: the next expiry sets IRR as on real hardware, nothing owed."""
    rig = Rig()
    rig.periodic()
    rig.on_time_to(PERIOD_NS)
    assert rig.apic.acknowledge_interrupt() == VECTOR
    rig.on_time_to(2 * PERIOD_NS)
    assert rig.apic.timer.backlog == 0
    rig.wr(REG_EOI, 0)
    assert rig.take_all() == 1


def test_the_backlog_is_bounded_to_one_second_of_periods() -> None:
    rig = Rig()
    rig.periodic()
    rig.late_to(5 * MAX_BACKLOG_NS)
    bound = MAX_BACKLOG_NS // PERIOD_NS
    assert rig.apic.timer.max_backlog() == bound == 250
    assert rig.apic.timer.backlog == bound
    assert rig.take_all() == bound + 1
    # Coalesced expiries are bounded the same way.
    rig.on_time_to(rig.clock.ns + 2 * MAX_BACKLOG_NS)
    assert rig.apic.timer.backlog == bound


@pytest.mark.parametrize("reprogram", ["initial count", "initial count 0", "divide", "one-shot", "mask",
                                       "software disable"])
def test_reprogramming_or_masking_the_timer_drops_the_backlog(reprogram: str) -> None:
    rig = Rig()
    rig.periodic()
    rig.late_to(5 * PERIOD_NS)
    assert rig.apic.timer.backlog == 4
    if reprogram == "initial count":
        rig.wr(REG_TIMER_INITIAL, INITIAL)
    elif reprogram == "initial count 0":
        rig.wr(REG_TIMER_INITIAL, 0)
    elif reprogram == "divide":
        rig.wr(REG_TIMER_DIVIDE, 0b0010)
    elif reprogram == "one-shot":
        rig.wr(REG_LVT_TIMER, VECTOR)
    elif reprogram == "mask":
        rig.wr(REG_LVT_TIMER, PERIODIC | VECTOR | LVT_MASKED)
    else:
        rig.wr(REG_SVR, 0xFF)
    assert rig.apic.timer.backlog == 0
    # The interrupt already requested stays requested (real hardware keeps IRR); nothing more follows.
    if rig.apic.interrupt_pending():
        assert rig.apic.acknowledge_interrupt() == VECTOR
        rig.wr(REG_EOI, 0)
    assert not rig.apic.interrupt_pending()


def test_a_masked_periodic_timer_owes_nothing() -> None:
    rig = Rig()
    rig.periodic(masked=True)
    rig.late_to(5 * PERIOD_NS)
    assert rig.apic.timer.backlog == 0
    rig.wr(REG_LVT_TIMER, PERIODIC | VECTOR)  # unmasked: the next expiry is the first interrupt
    assert not rig.apic.interrupt_pending()
    rig.on_time_to(6 * PERIOD_NS)
    assert rig.take_all() == 1


def test_a_late_one_shot_timer_fires_once() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TIMER_DIVIDE, 0b0001)
    rig.wr(REG_LVT_TIMER, VECTOR)
    rig.wr(REG_TIMER_INITIAL, INITIAL)
    rig.late_to(10 * PERIOD_NS)
    assert rig.apic.timer.backlog == 0
    assert rig.take_all() == 1


def test_a_timer_faster_than_the_interrupt_rate_limit_owes_nothing() -> None:
    """Its interrupts are spaced on purpose (MIN_PERIODIC_INTERRUPT_NS): the skipped periods are not lost
    ticks, or the backlog would grow without end."""
    rig = Rig()
    rig.periodic(initial=100)  # 16 us
    rig.on_time_to(10_000_000)
    assert rig.apic.timer.max_backlog() == 0
    assert rig.apic.timer.backlog == 0


def test_a_stopped_virtual_clock_makes_no_missed_ticks() -> None:
    """A paused VM: its virtual clock stands still, so the pause is no period of the guest's."""
    host = FakeClock()
    clock = VirtualClock(host)
    clock.start()
    rig = Rig(clock)
    rig.periodic()
    host.ns = PERIOD_NS
    rig.queue.run_due()
    clock.stop()
    host.ns += 10 * MAX_BACKLOG_NS
    clock.start()
    host.ns += PERIOD_NS
    rig.queue.run_due()
    assert rig.apic.timer.backlog == 1  # the one expiry (index 1) still waiting in IRR, no pause ticks
    assert rig.take_all() == 2


def test_the_backlog_is_saved_and_restored_with_the_timer() -> None:
    rig = Rig()
    rig.periodic()
    rig.late_to(4 * PERIOD_NS)
    saved = rig.apic.state()
    assert saved.version == LapicState.VERSION == 2
    assert saved.timer.version == ApicTimerState.VERSION == 2
    assert saved.timer.backlog == 3
    other = Rig()
    other.apic.from_state(saved)
    assert other.apic.timer.backlog == 3
    assert other.take_all() == 4


def test_hostile_backlogs_are_refused() -> None:
    rig = Rig()
    rig.periodic()
    rig.late_to(4 * PERIOD_NS)
    saved = rig.apic.state()
    for backlog in (-1, 10**9, True):
        with pytest.raises(StateError):
            ApicTimer.check_state(dataclasses.replace(saved.timer, backlog=backlog))
    # Owed ticks outside a running periodic timer would be interrupts the guest never programmed.
    stopped = dataclasses.replace(saved.timer, mode=MODE_ONESHOT, backlog=1)
    with pytest.raises(StateError):
        ApicTimer.check_state(stopped)
    # A layout-1 timer (no backlog field) is refused by version, not misread.
    with pytest.raises(StateError, match="version 1"):
        ApicTimer.check_state(dataclasses.replace(saved.timer, version=1))
    # A restore clamps a backlog within the static bound to this APIC's own (period-dependent) bound.
    big = dataclasses.replace(saved, timer=dataclasses.replace(saved.timer, backlog=5000))
    other = Rig()
    other.apic.from_state(big)
    assert other.apic.timer.backlog == other.apic.timer.max_backlog() == 250
    assert saved.timer.mode == MODE_PERIODIC
