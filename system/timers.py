"""Deadline timers for device models (QEMU's QEMUTimer on the virtual clock).

Device models (PIT, RTC, LAPIC timer, UART transmit pacing) never start threads: they ask a
:class:`TimerQueue` for :class:`Timer` objects and arm them with absolute deadlines in nanoseconds of the
queue's clock. In a running machine one host thread sleeps until the earliest deadline and runs the
callback holding the machine lock, the same lock the exit dispatcher takes, so a callback never races a
register access. Tests drive a queue with a fake clock and :meth:`TimerQueue.run_due`, deterministically.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable

TimerCallback = Callable[[], None]


class Timer:
    """A one-shot timer; re-arm it from its own callback for periodic behaviour."""

    __slots__ = ("_queue", "callback", "name", "expire_ns", "_generation")

    def __init__(self, queue: "TimerQueue", callback: TimerCallback, name: str) -> None:
        self._queue = queue
        self.callback = callback
        self.name = name
        self.expire_ns: int | None = None
        self._generation = 0

    @property
    def pending(self) -> bool:
        return self.expire_ns is not None

    def mod(self, deadline_ns: int) -> None:
        """Arm (or re-arm) the timer to fire at absolute time ``deadline_ns``."""
        self._queue._arm(self, deadline_ns)

    def mod_in(self, delay_ns: int) -> None:
        """Arm the timer ``delay_ns`` from now."""
        self._queue._arm(self, self._queue.now() + max(0, delay_ns))

    def cancel(self) -> None:
        self._queue._cancel(self)


class TimerQueue:
    """The timers of one machine, run on one thread (or by hand in tests)."""

    def __init__(self, lock: threading.RLock | None = None, clock: Callable[[], int] = time.monotonic_ns):
        self.lock = lock if lock is not None else threading.RLock()
        self._clock = clock
        self._heap: list[tuple[int, int, int, Timer]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False

    def now(self) -> int:
        """Current time of this queue's clock, in nanoseconds."""
        return self._clock()

    def new_timer(self, callback: TimerCallback, name: str = "timer") -> Timer:
        return Timer(self, callback, name)

    # -- arming ------------------------------------------------------------------------------------------
    def _arm(self, timer: Timer, deadline_ns: int) -> None:
        with self._wake:
            timer._generation += 1
            timer.expire_ns = deadline_ns
            heapq.heappush(self._heap, (deadline_ns, next(self._seq), timer._generation, timer))
            self._wake.notify()

    def _cancel(self, timer: Timer) -> None:
        with self._wake:
            timer._generation += 1  # stale heap entries are skipped when popped
            timer.expire_ns = None

    def next_deadline(self) -> int | None:
        """Earliest live deadline, or None if no timer is armed."""
        with self._wake:
            self._drop_stale()
            return self._heap[0][0] if self._heap else None

    def _drop_stale(self) -> None:
        while self._heap and self._heap[0][2] != self._heap[0][3]._generation:
            heapq.heappop(self._heap)

    # -- running -----------------------------------------------------------------------------------------
    def run_due(self, now: int | None = None) -> int:
        """Run every timer whose deadline is at or before ``now``; returns how many ran."""
        ran = 0
        while True:
            with self._wake:
                self._drop_stale()
                current = self.now() if now is None else now
                if not self._heap or self._heap[0][0] > current:
                    return ran
                _, _, _, timer = heapq.heappop(self._heap)
                timer.expire_ns = None
                timer._generation += 1
            with self.lock:
                timer.callback()
            ran += 1

    def start(self) -> None:
        """Run timers on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pyemu-timers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def _loop(self) -> None:
        while True:
            self.run_due()
            with self._wake:
                if self._stopping:
                    return
                self._drop_stale()
                if self._heap:
                    delay = (self._heap[0][0] - self.now()) / 1e9
                    if delay > 0:
                        self._wake.wait(delay)
                else:
                    self._wake.wait()
                if self._stopping:
                    return
