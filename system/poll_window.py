"""An adaptive polling window: how long a thread that is about to sleep spins first.

Used by the software CPU's halt polling (:mod:`pyemu.accel.tcg.halt_poll`) and by the I/O threads
(:mod:`pyemu.system.iothread`): on this project's hosts, themselves virtual machines, waking a thread that
sleeps on another CPU costs the waker ~18 µs inside the waking system call and the sleeper ~20-30 µs
more before it runs. A thread that spins when the next event is near sees it within microseconds and the
sender wakes nobody; spinning costs a host CPU, so the window adapts.

The rule is KVM's ``halt_poll_ns`` and QEMU's ``poll-max-ns``/``poll-grow``/``poll-shrink`` (read for the
rule, not copied): a wait that ended within the window keeps it; one that ended after the window but
within the maximum grows it (``grow`` times, from a 10 µs start), so the next similar wait is caught; one
that lasted longer than the maximum (idle time) shrinks it (divided by ``shrink``; with ``shrink`` 0, the
default, by the owner's ``default_shrink``, or to 0 when that is 0 too), so an idle thread stops spinning.
"""

from __future__ import annotations

GROW_START_NS = 10_000
"""The first window after a short wait (KVM's ``halt_poll_ns_grow_start``)."""
DEFAULT_GROW = 2


class PollWindow:
    """The adaptive window of one waiting thread (only that thread uses it)."""

    __slots__ = ("max_ns", "grow", "shrink", "divisor", "window_ns", "polls", "poll_hits")

    def __init__(self, max_ns: int, *, grow: int = 0, shrink: int = 0, default_shrink: int = 0) -> None:
        self.max_ns = max(0, max_ns)
        self.grow = max(0, grow)
        """Factor a short wait grows the window by (QEMU's ``poll-grow``; 0: the default, 2)."""
        self.shrink = max(0, shrink)
        """Divisor a long wait shrinks the window by (QEMU's ``poll-shrink``; 0: the default, below)."""
        self.divisor = self.shrink or max(0, default_shrink)
        """What a long wait divides the window by; 0: back to no polling."""
        self.window_ns = 0
        self.polls = 0
        """Waits that spun first (statistics)."""
        self.poll_hits = 0
        """Waits whose event came while spinning (statistics)."""

    def budget_ns(self) -> int:
        """How long the next wait spins (0: it sleeps at once)."""
        return min(self.window_ns, self.max_ns)

    def record_idle(self) -> None:
        """A wait ended by something not worth spinning for: no spinning until short waits for what is
        worth it grow the window again (whatever the divisor: spinning for such events took the CPU their
        host-side peer needed, see :mod:`pyemu.system.iothread`)."""
        self.window_ns = 0

    def record(self, waited_ns: int, *, woken_while_polling: bool) -> None:
        """A wait is over: it lasted ``waited_ns`` in all (spinning and sleeping)."""
        if woken_while_polling:
            self.poll_hits += 1
            return
        if waited_ns > self.max_ns:
            shrunk = self.window_ns // self.divisor if self.divisor else 0
            self.window_ns = shrunk if shrunk >= GROW_START_NS else 0  # (KVM's rule: not below the start)
        elif self.window_ns < self.max_ns:
            self.window_ns = min(self.max_ns, max(GROW_START_NS, (self.grow or DEFAULT_GROW) * self.window_ns))
