"""The local APIC timer: a down-counter clocked at ``crystal_hz / divide``, and the TSC-deadline comparator.

Why a crystal clock: Linux reads CPUID leaf 0x15 (crystal frequency) and then trusts that the APIC timer
counts at crystal / divide, skipping its calibration loop against the PIT. So the counter is pure
arithmetic on virtual time: nothing ticks, the current count is computed when read, and one
:class:`~pyemu.system.timers.Timer` is armed for the next expiry.

The counter is described by an *anchor*: at virtual time ``anchor_ns`` it held ``anchor_count``. Loading the
initial count anchors it at the initial count; changing the divider while it runs re-anchors it at its
current value so the count continues from there at the new rate (rather than jumping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyemu.system.timers import TimerQueue

NS_PER_S = 1_000_000_000

MODE_ONESHOT = 0
MODE_PERIODIC = 1
MODE_TSC_DEADLINE = 2

# A guest may program a periodic timer with an initial count of 1 (40 ns at 25 MHz): that would turn the
# timer thread into a busy loop. Like KVM (which limits periodic timers to 200 us by default) the *interrupts*
# of a periodic timer are spaced at least this much; the count register still reads exact values.
MIN_PERIODIC_INTERRUPT_NS = 100_000


def divide_value(config: int) -> int:
    """The divisor encoded by the divide configuration register (bits 0, 1 and 3): 0b0000 -> 2 ... 0b1011 -> 1."""
    code = ((config >> 1) & 0b100) | (config & 0b11)
    return 1 << ((code + 1) & 7)


@dataclass(frozen=True)
class ApicTimerState:
    """The timer as data, for snapshots and tests."""

    mode: int
    divide_config: int
    initial_count: int
    running: bool
    anchor_ns: int
    anchor_count: int
    next_expiry: int
    tsc_deadline: int


class ApicTimer:
    """Counter, divider and deadline of one local APIC. ``expired`` is called at each expiry (the LAPIC then
    raises the LVT timer interrupt if that entry is unmasked; the counter runs even when it is masked)."""

    def __init__(
        self,
        queue: TimerQueue,
        expired: Callable[[], None],
        *,
        crystal_hz: int,
        tsc_hz: int,
        tsc_now: Callable[[], int] | None = None,
    ) -> None:
        self._queue = queue
        self._expired = expired
        self.crystal_hz = crystal_hz
        self.tsc_hz = tsc_hz
        self._tsc_now = tsc_now if tsc_now is not None else self._tsc_from_clock
        self._timer = queue.new_timer(self._on_timer, "lapic-timer")
        self.mode = MODE_ONESHOT
        self.divide_config = 0
        self.initial_count = 0
        self._running = False
        self._anchor_ns = 0
        self._anchor_count = 0
        self._next_expiry = 0  # index of the next expiry of a periodic timer, counted from the anchor
        self.tsc_deadline = 0

    # -- the divider and counter -------------------------------------------------------------------------
    @property
    def divide(self) -> int:
        return divide_value(self.divide_config)

    def _ticks_between(self, start_ns: int, end_ns: int) -> int:
        """Whole counter ticks in ``[start_ns, end_ns)`` at the current divider."""
        return max(0, end_ns - start_ns) * self.crystal_hz // (self.divide * NS_PER_S)

    def _tick_time(self, ticks: int) -> int:
        """Virtual time at which ``ticks`` ticks after the anchor have elapsed (rounded up to whole ns)."""
        return self._anchor_ns + -(-ticks * self.divide * NS_PER_S // self.crystal_hz)

    def current_count(self) -> int:
        """The current-count register: counts down from the anchor, reloads in periodic mode, stops at 0."""
        if not self._running or self.mode == MODE_TSC_DEADLINE:
            return 0
        ticks = self._ticks_between(self._anchor_ns, self._queue.now())
        if ticks < self._anchor_count:
            return self._anchor_count - ticks
        if self.mode == MODE_PERIODIC and self.initial_count:
            return self.initial_count - (ticks - self._anchor_count) % self.initial_count
        return 0

    def write_divide(self, config: int) -> None:
        config &= 0b1011
        if config == self.divide_config:
            return
        if self._running and self.mode != MODE_TSC_DEADLINE:
            count = self.current_count()
            self.divide_config = config
            self._anchor(count)
        else:
            self.divide_config = config

    def write_initial_count(self, count: int) -> None:
        """Load the counter (a write of 0 stops it). Ignored in TSC-deadline mode, as the SDM says."""
        if self.mode == MODE_TSC_DEADLINE:
            return
        self.initial_count = count & 0xFFFFFFFF
        if self.initial_count == 0:
            self._running = False
            self._timer.cancel()
            return
        self._anchor(self.initial_count)

    def _anchor(self, count: int) -> None:
        self._anchor_ns = self._queue.now()
        self._anchor_count = count
        self._next_expiry = 0
        self._running = count > 0
        if self._running:
            self._timer.mod(self._tick_time(count))
        else:
            self._timer.cancel()

    def set_mode(self, mode: int) -> None:
        """Follow the LVT timer mode bits. Entering or leaving TSC-deadline mode disarms the timer and clears
        both the initial count and the deadline (as KVM does); one-shot <-> periodic keeps counting."""
        if mode not in (MODE_ONESHOT, MODE_PERIODIC, MODE_TSC_DEADLINE):
            mode = MODE_ONESHOT
        if mode == self.mode:
            return
        if (mode == MODE_TSC_DEADLINE) != (self.mode == MODE_TSC_DEADLINE):
            self._timer.cancel()
            self._running = False
            self.initial_count = 0
            self.tsc_deadline = 0
            self.mode = mode
            return
        count = self.current_count()
        self.mode = mode
        if self._running:
            if count == 0 and mode == MODE_PERIODIC:
                count = self.initial_count
            self._anchor(count)

    # -- TSC deadline ------------------------------------------------------------------------------------
    def _tsc_from_clock(self) -> int:
        return self._queue.now() * self.tsc_hz // NS_PER_S

    def set_tsc_deadline(self, tsc_value: int) -> None:
        """IA32_TSC_DEADLINE: arm at a TSC value (0 disarms). Only effective in TSC-deadline mode."""
        if self.mode != MODE_TSC_DEADLINE:
            return
        self.tsc_deadline = tsc_value & 0xFFFFFFFFFFFFFFFF
        if self.tsc_deadline == 0:
            self._timer.cancel()
            return
        delta = self.tsc_deadline - self._tsc_now()
        delay = -(-delta * NS_PER_S // self.tsc_hz) if delta > 0 else 0
        self._timer.mod(self._queue.now() + delay)

    # -- expiry ------------------------------------------------------------------------------------------
    def _on_timer(self) -> None:
        if self.mode == MODE_TSC_DEADLINE:
            self.tsc_deadline = 0
        elif self.mode == MODE_PERIODIC and self.initial_count:
            now = self._queue.now()
            expired_at = self._tick_time(self._anchor_count + self._next_expiry * self.initial_count)
            # Expiry k happens at anchor_count + k * initial_count ticks; skip expiries the timer thread
            # was too late for (one interrupt, as a real LAPIC whose IRR bit is already set).
            elapsed = self._ticks_between(self._anchor_ns, now)
            passed = (elapsed - self._anchor_count) // self.initial_count if elapsed >= self._anchor_count else 0
            self._next_expiry = max(self._next_expiry + 1, passed + 1)
            deadline = self._tick_time(self._anchor_count + self._next_expiry * self.initial_count)
            self._timer.mod(max(deadline, expired_at + MIN_PERIODIC_INTERRUPT_NS))
        else:
            self._running = False
        self._expired()

    def stop(self) -> None:
        """Disarm and clear (reset)."""
        self._timer.cancel()
        self.mode = MODE_ONESHOT
        self.divide_config = 0
        self.initial_count = 0
        self._running = False
        self._anchor_ns = 0
        self._anchor_count = 0
        self._next_expiry = 0
        self.tsc_deadline = 0

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> ApicTimerState:
        return ApicTimerState(
            mode=self.mode,
            divide_config=self.divide_config,
            initial_count=self.initial_count,
            running=self._running,
            anchor_ns=self._anchor_ns,
            anchor_count=self._anchor_count,
            next_expiry=self._next_expiry,
            tsc_deadline=self.tsc_deadline,
        )

    def restore(self, state: ApicTimerState) -> None:
        self._timer.cancel()
        self.mode = state.mode
        self.divide_config = state.divide_config & 0b1011
        self.initial_count = state.initial_count & 0xFFFFFFFF
        self._running = state.running
        self._anchor_ns = state.anchor_ns
        self._anchor_count = state.anchor_count
        self._next_expiry = state.next_expiry
        self.tsc_deadline = state.tsc_deadline
        if self.mode == MODE_TSC_DEADLINE:
            if self.tsc_deadline:
                deadline, self.tsc_deadline = self.tsc_deadline, 0
                self.set_tsc_deadline(deadline)
        elif self._running:
            ticks = self._anchor_count
            if self.mode == MODE_PERIODIC:
                ticks += self._next_expiry * self.initial_count
            self._timer.mod(self._tick_time(ticks))
