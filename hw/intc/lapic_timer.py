"""The local APIC timer: a down-counter clocked at ``crystal_hz / divide``, and the TSC-deadline comparator.

Why a crystal clock: Linux reads CPUID leaf 0x15 (crystal frequency) and then trusts that the APIC timer
counts at crystal / divide, skipping its calibration loop against the PIT. So the counter is pure
arithmetic on virtual time: nothing ticks, the current count is computed when read, and one
:class:`~pyemu.system.timers.Timer` is armed for the next expiry.

The counter is described by an *anchor*: at virtual time ``anchor_ns`` it held ``anchor_count``. Loading the
initial count anchors it at the initial count; changing the divider while it runs re-anchors it at its
current value so the count continues from there at the new rate (rather than jumping).

Lost ticks: a periodic timer whose expiry runs late (the host did not schedule the timer thread) or whose
previous interrupt is still waiting in IRR (the vCPU did not run) would give the guest fewer interrupts
than periods. Linux counts jiffies by periodic timer interrupts until its TSC has passed the clocksource
watchdog, and the watchdog compares the TSC against those jiffies: on a loaded host the missing ticks made
it mark the TSC unstable. So, like QEMU's ``lost_tick_policy=delay`` and KVM's pending-timer count, the
missed ticks are kept as a *backlog* and re-delivered back to back, each once the guest has accepted the
previous one (:meth:`ApicTimer.take_missed`). The backlog is bounded by :data:`MAX_BACKLOG_NS` worth of
periods and cleared whenever the guest reprograms the timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.system.timers import TimerQueue

NS_PER_S = 1_000_000_000

MODE_ONESHOT = 0
MODE_PERIODIC = 1
MODE_TSC_DEADLINE = 2

# A guest may program a periodic timer with an initial count of 1 (40 ns at 25 MHz): that would turn the
# timer thread into a busy loop. Like KVM (which limits periodic timers to 200 us by default) the *interrupts*
# of a periodic timer are spaced at least this much; the count register still reads exact values.
MIN_PERIODIC_INTERRUPT_NS = 100_000

#: Missed periodic ticks are re-delivered up to this much virtual time's worth; older ones are dropped (a
#: guest that did not run for longer than this cannot catch up by interrupts alone, and a storm of a
#: thousand back-to-back interrupts would only stall it further). KVM's PIT reinjection bounds it likewise.
MAX_BACKLOG_NS = 1_000_000_000


def divide_value(config: int) -> int:
    """The divisor encoded by the divide configuration register (bits 0, 1 and 3): 0b0000 -> 2 ... 0b1011 -> 1."""
    code = ((config >> 1) & 0b100) | (config & 0b11)
    return 1 << ((code + 1) & 7)


#: Upper bound for saved durations and counters that grow with time (about 292 years of nanoseconds).
_MAX_NS = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class ApicTimerState(DeviceState):
    """The timer as data, for snapshots and tests.

    Times are relative to the moment the state was taken, never absolute readings of the timer clock, so a
    state restores correctly on a machine (or host) whose clock reads differently: ``anchor_age_ns`` is how
    long before that moment the counter was anchored at ``anchor_count``, and ``remaining_ns`` is how long
    after it the armed expiry was due (None: not armed; 0: due or overdue).
    """

    VERSION: ClassVar[int] = 2  # 2: ``backlog``

    mode: int
    divide_config: int
    initial_count: int
    running: bool
    anchor_age_ns: int
    anchor_count: int
    next_expiry: int
    tsc_deadline: int
    remaining_ns: int | None
    backlog: int = 0
    """Missed periodic ticks still to be delivered (only in periodic mode)."""


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
        self._backlog = 0

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
            self._backlog = 0
            self._timer.cancel()
            return
        self._anchor(self.initial_count)

    def _anchor(self, count: int) -> None:
        self._anchor_ns = self._queue.now()
        self._anchor_count = count
        self._next_expiry = 0
        self._backlog = 0  # ticks missed under the old programming are not owed under the new one
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
        self._backlog = 0
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
        """The guest TSC when no ``tsc_now`` was given: virtual time x ``tsc_hz``. A board passes the
        accelerator's ``guest_tsc`` instead, which is what RDTSC returns: it starts at 0 at each machine
        reset and stops while the VM is paused, like the virtual clock the deadline is converted to, so
        ``deadline - tsc_now()`` cycles are the virtual nanoseconds until the interrupt either way."""
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

    # -- lost-tick compensation --------------------------------------------------------------------------
    @property
    def period_ns(self) -> int:
        """One period of the counter as programmed (initial count x divide at the crystal rate)."""
        return self.initial_count * self.divide * NS_PER_S // self.crystal_hz

    @property
    def backlog(self) -> int:
        """Missed periodic ticks not yet re-delivered."""
        return self._backlog

    def max_backlog(self) -> int:
        """How many missed ticks may wait: :data:`MAX_BACKLOG_NS` worth of periods, none for a timer faster
        than :data:`MIN_PERIODIC_INTERRUPT_NS` (its interrupts are rate-limited on purpose, so the periods
        it skips are not lost ticks) and none outside a running periodic timer."""
        if self.mode != MODE_PERIODIC or not self._running or not self.initial_count:
            return 0
        period = self.period_ns
        if period < MIN_PERIODIC_INTERRUPT_NS:
            return 0
        return MAX_BACKLOG_NS // period

    def add_missed(self, ticks: int) -> None:
        """Owe the guest ``ticks`` more timer interrupts (the LAPIC calls this when an expiry finds the
        previous interrupt still pending in IRR); beyond :meth:`max_backlog` they are dropped."""
        if ticks > 0:
            self._backlog = min(self._backlog + ticks, self.max_backlog())

    def take_missed(self) -> bool:
        """One owed tick, if any: the LAPIC calls this when the guest accepts a timer interrupt and raises
        the next one at once, so the owed ticks arrive back to back, each after the previous one."""
        if self._backlog <= 0:
            return False
        self._backlog -= 1
        return True

    def clear_backlog(self) -> None:
        """Forget the owed ticks (the LVT entry got masked: a masked timer's periods are no one's ticks)."""
        self._backlog = 0

    # -- expiry ------------------------------------------------------------------------------------------
    def _on_timer(self) -> None:
        if self.mode == MODE_TSC_DEADLINE:
            self.tsc_deadline = 0
        elif self.mode == MODE_PERIODIC and self.initial_count:
            now = self._queue.now()
            expired_at = self._tick_time(self._anchor_count + self._next_expiry * self.initial_count)
            # Expiry k happens at anchor_count + k * initial_count ticks. Expiries the timer thread was too
            # late for get one interrupt now and go to the backlog for the rest.
            elapsed = self._ticks_between(self._anchor_ns, now)
            passed = (elapsed - self._anchor_count) // self.initial_count if elapsed >= self._anchor_count else 0
            self.add_missed(passed - self._next_expiry)
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
        self._backlog = 0

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> ApicTimerState:
        """The timer now, its anchor and armed expiry relative to the current time."""
        now = self._queue.now()
        expire_ns = self._timer.expire_ns
        return ApicTimerState(
            mode=self.mode,
            divide_config=self.divide_config,
            initial_count=self.initial_count,
            running=self._running,
            anchor_age_ns=now - self._anchor_ns,
            anchor_count=self._anchor_count,
            next_expiry=self._next_expiry,
            tsc_deadline=self.tsc_deadline,
            remaining_ns=None if expire_ns is None else max(0, expire_ns - now),
            backlog=self._backlog,
        )

    def from_state(self, state: DeviceState) -> None:
        """Check, then load a saved timer, re-arming it relative to now (StateError: nothing changes)."""
        self.apply_state(self.check_state(state))

    @staticmethod
    def check_state(state: object) -> ApicTimerState:
        """``state`` if a timer can take it: values the registers hold, and an armed expiry exactly when the
        mode says the timer runs (anything else would fire an interrupt the guest never programmed). Separate
        from :meth:`apply_state` so the LAPIC can check its whole state before it applies any."""
        s = check_state("lapic-timer", state, ApicTimerState)
        check_range("lapic-timer", "mode", s.mode, MODE_ONESHOT, MODE_TSC_DEADLINE)
        check_range("lapic-timer", "divide_config", s.divide_config, 0, 0b1011)
        if s.divide_config & ~0b1011:
            raise StateError("lapic-timer", f"divide_config={s.divide_config:#x} sets bits outside 0b1011")
        check_range("lapic-timer", "initial_count", s.initial_count, 0, 0xFFFFFFFF)
        if not isinstance(s.running, bool):
            raise StateError("lapic-timer", f"running={s.running!r} is not a bool")
        check_range("lapic-timer", "anchor_age_ns", s.anchor_age_ns, 0, _MAX_NS)
        check_range("lapic-timer", "anchor_count", s.anchor_count, 0, 0xFFFFFFFF)
        check_range("lapic-timer", "next_expiry", s.next_expiry, 0, _MAX_NS)
        check_range("lapic-timer", "tsc_deadline", s.tsc_deadline, 0, 0xFFFFFFFFFFFFFFFF)
        armed = s.remaining_ns is not None
        if s.remaining_ns is not None:
            check_range("lapic-timer", "remaining_ns", s.remaining_ns, 0, _MAX_NS)
        if s.mode == MODE_TSC_DEADLINE:
            if s.running or s.initial_count:
                raise StateError("lapic-timer", "the counter cannot run in TSC-deadline mode")
            if armed != bool(s.tsc_deadline):
                raise StateError("lapic-timer", f"TSC deadline {s.tsc_deadline:#x} with the timer "
                                                f"{'armed' if armed else 'not armed'}")
        else:
            if s.tsc_deadline:
                raise StateError("lapic-timer", "a TSC deadline outside TSC-deadline mode")
            if armed != s.running:
                raise StateError("lapic-timer", f"counter {'running' if s.running else 'stopped'} with the "
                                                f"timer {'armed' if armed else 'not armed'}")
        # The exact bound depends on the crystal rate, which the state does not carry: apply_state clamps
        # to it; here only the widest one (periods no shorter than MIN_PERIODIC_INTERRUPT_NS).
        periodic = s.mode == MODE_PERIODIC and s.running and s.initial_count > 0
        limit = MAX_BACKLOG_NS // MIN_PERIODIC_INTERRUPT_NS if periodic else 0
        check_range("lapic-timer", "backlog", s.backlog, 0, limit)
        return s

    def apply_state(self, s: ApicTimerState) -> None:
        """Load a state that :meth:`check_state` accepted."""
        self._timer.cancel()
        now = self._queue.now()
        self.mode = s.mode
        self.divide_config = s.divide_config
        self.initial_count = s.initial_count
        self._running = s.running
        self._anchor_ns = now - s.anchor_age_ns
        self._anchor_count = s.anchor_count
        self._next_expiry = s.next_expiry
        self.tsc_deadline = s.tsc_deadline
        self._backlog = min(s.backlog, self.max_backlog())
        if s.remaining_ns is not None:
            self._timer.mod(now + s.remaining_ns)
