"""One software vCPU runs at a time: round-robin turns between the engines of a VM.

Why not one engine per host core in parallel: Unicorn 2.1.4 translates guest atomics (``lock cmpxchg``,
``xchg``, ``lock xadd``) without host atomics, because its translator never runs in QEMU's parallel mode
(CF_PARALLEL is only set by multi-threaded TCG, which Unicorn does not have). Two engines running at once
on the same RAM would therefore lose updates to the guest's spinlocks and counters. Running one engine at
a time makes every guest instruction atomic with respect to the other vCPUs, exactly as QEMU's
``-accel tcg,thread=single`` does, and also lets the engines share translated-code bookkeeping without
locks (:class:`pyemu.accel.tcg.tlb_fill.CodeMap`).

How turns work: a vCPU thread takes a ticket and waits until it is served (FIFO, so nobody starves). A
waiting vCPU marks the running one *contended*, again every :attr:`RoundRobin.spin_look_s` while it waits:
its block gate then gives the turn up as soon as the guest spins in a PAUSE loop (it waits for something
only another vCPU can do; the gate looks for that in a short burst after each mark, since looking at every
block start all along cost a two-vCPU boot 11% of its time), and the first waiter preempts it
outright once its turn is older than :attr:`RoundRobin.slice_s`. A waiter with an interrupt or processor
event pending is *urgent* and preempts after only :attr:`RoundRobin.urgent_slice_s`: on hardware every
CPU takes its interrupts at once, and Linux counts its early periodic timer ticks (jiffies) one interrupt
at a time, so a tick held back for a whole turn is a tick lost (measured: with 4 ms turns and no urgency,
Linux's clocksource watchdog found jiffies 22% behind the TSC and declared the TSC unstable). A vCPU that halts or waits for a SIPI
does so without a turn, so an idle vCPU costs nothing. With one vCPU the turn is never contended.

A preemption is repeated every :attr:`RoundRobin.slice_s` while the turn stays overdue: the request is a
flag the owner's block gate shares with other engine work (code invalidation clears it between runs), so
one request can be consumed before the engine ever starts. Asked only once, a lost request let a vCPU
spinning with interrupts off in Linux's ``stop_machine`` keep its turn forever, waiting for the vCPU that
was waiting for the turn (seen on a loaded host: the boot hung when Linux switched to the TSC).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol


class Preemptible(Protocol):
    def preempt(self) -> None:
        """Stop running guest code at the next block start; the turn ends (any thread)."""
        ...

    def set_contended(self, contended: bool) -> None:
        """Another vCPU waits for the turn (any thread); said again every :attr:`RoundRobin.spin_look_s`
        while it waits, and each time the owner looks for a PAUSE spin for a short while."""
        ...


class RoundRobin:
    """The turn of the engines of one VM (see module docstring)."""

    def __init__(self, slice_s: float = 0.004, urgent_slice_s: float = 0.0005) -> None:
        self.slice_s = slice_s
        self.urgent_slice_s = urgent_slice_s
        self.spin_look_s = 0.0005
        """How often a waiter tells the owner again that it waits: the owner's block gate looks for a PAUSE
        spin only in a short burst after each time (see ``block_gate.c``), so a spin that begins later is
        found within this long."""
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._owner: Preemptible | None = None
        self._owner_since = 0.0
        self._preempted_at: float | None = None  # when the current turn was last asked to end
        self.turns = 0
        self.preemptions = 0
        """Turns that a waiter asked to end (once each, however often it had to ask)."""
        self.repeated_preemptions = 0
        """Requests repeated because the owner had not stopped a slice after the previous one."""

    @contextmanager
    def turn(self, vcpu: Preemptible, urgent: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the turn for the body: only this vCPU's engine runs until it ends. ``urgent()`` says,
        while waiting, whether the vCPU has an interrupt or event to take (see :meth:`nudge`)."""
        self._acquire(vcpu, urgent)
        try:
            yield
        finally:
            self._release()

    def nudge(self, woken: Preemptible | None = None) -> None:
        """A vCPU may have become urgent (an interrupt arrived): waiters look again (any thread).

        ``woken``: the vCPU the interrupt is for. If another vCPU holds the turn, it is told at once that
        the turn is wanted, as the woken vCPU would tell it once its thread runs. Why not wait for that:
        the vCPU threads share one host CPU (:mod:`pyemu.accel.tcg.vcpu_placement`), so a vCPU that sent
        an IPI and spins until it is handled keeps that CPU until the host preempts it, and the woken
        thread only then gets to ask (measured, two-vCPU Linux boot: 0.03 to 3 ms per IPI, ~700 IPIs).
        Told now, the owner's spin ends its turn at its next PAUSE (``pyemu_gate_pause``).

        Nothing to do without a ticket waiting and with the turn free or the woken vCPU's own (always so
        with one vCPU): that look takes no lock. A vCPU taking a ticket right after it still sees the
        interrupt, which was flagged before this call, when it looks under the lock."""
        owner = self._owner
        if self._next_ticket - self._serving <= (0 if owner is None else 1) and owner in (None, woken):
            return
        with self._cond:
            owner = self._owner
            if woken is not None and owner is not None and owner is not woken:
                owner.set_contended(True)
            self._cond.notify_all()

    def _acquire(self, vcpu: Preemptible, urgent: Callable[[], bool]) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                owner = self._owner
                if owner is None:
                    # The ticket before ours is about to take its turn: its acquire notifies us.
                    self._cond.wait(timeout=self.slice_s)
                    continue
                owner.set_contended(True)
                turn_s = self.urgent_slice_s if urgent() else self.slice_s
                now = time.monotonic()
                remaining = self._owner_since + turn_s - now
                asked = self._preempted_at
                if remaining <= 0 and (asked is None or now - asked >= self.slice_s):
                    if asked is None:
                        self.preemptions += 1
                    else:
                        self.repeated_preemptions += 1
                    self._preempted_at = now
                    owner.preempt()
                    remaining = self.slice_s
                self._cond.wait(timeout=min(max(remaining, 0.0005), self.spin_look_s))
            self._owner = vcpu
            self._owner_since = time.monotonic()
            self._preempted_at = None
            self.turns += 1
            vcpu.set_contended(self._next_ticket > self._serving + 1)
            self._cond.notify_all()  # waiters start timing this turn (for preemption) from now

    def _release(self) -> None:
        with self._cond:
            owner = self._owner
            if owner is not None:
                owner.set_contended(False)
            self._owner = None
            self._serving += 1
            self._cond.notify_all()
