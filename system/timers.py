"""Deadline timers for device models (QEMU's QEMUTimer) on a virtual clock (QEMU_CLOCK_VIRTUAL).

Device models (PIT, RTC, LAPIC timer, UART transmit pacing) never start threads: they ask a
:class:`TimerQueue` for :class:`Timer` objects and arm them with absolute deadlines in nanoseconds of the
queue's clock. In a running machine one host thread sleeps until the earliest deadline and runs the
callback holding the machine lock, the same lock the exit dispatcher takes, so a callback never races a
register access. Tests drive a queue with a fake clock and :meth:`TimerQueue.run_due`, deterministically.

Why a virtual clock: a machine's queue runs on a :class:`VirtualClock`, which advances with the host's
monotonic clock only while the VM runs and stands still while it is stopped (paused, prelaunch, shut down
under ``-no-shutdown``). Deadlines are virtual, so no device timer fires during a pause, a timer due 5 ms
after the pause began fires 5 ms after the resume, and no device model needs to know that pauses exist.
The queue's thread sleeps without a timeout while its virtual clock is stopped and is woken when it
starts again, so a paused VM costs no wake-ups.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable

TimerCallback = Callable[[], None]
ClockListener = Callable[[bool], None]


class VirtualClock:
    """Nanoseconds that advance with ``host`` (the host's monotonic clock) while running and stand still
    while stopped; :meth:`start` resumes where :meth:`stop` left off. Created stopped at 0.

    :meth:`now` is called for every timer-register access of every device, so it takes no lock: the
    (base, since) pair is replaced as one tuple, which a reader sees whole. ``start``/``stop`` come from
    the machine's life cycle (one thread at a time, under ``_lock``); listeners (a :class:`TimerQueue`)
    hear each change.
    """

    def __init__(self, host: Callable[[], int] = time.monotonic_ns) -> None:
        self._host = host
        self._lock = threading.Lock()
        # (virtual ns at the last start/stop, host ns at the last start or None while stopped)
        self._state: tuple[int, int | None] = (0, None)
        self._listeners: list[ClockListener] = []

    def now(self) -> int:
        """Virtual nanoseconds now."""
        base, since = self._state
        if since is None:
            return base
        return base + max(0, self._host() - since)

    @property
    def running(self) -> bool:
        return self._state[1] is not None

    def start(self) -> None:
        """Let virtual time advance again (no-op when running)."""
        with self._lock:
            base, since = self._state
            if since is not None:
                return
            self._state = (base, self._host())
        self._notify(True)

    def stop(self) -> None:
        """Freeze virtual time at its current value (no-op when stopped)."""
        with self._lock:
            base, since = self._state
            if since is None:
                return
            self._state = (base + max(0, self._host() - since), None)
        self._notify(False)

    def set(self, value_ns: int) -> None:
        """Stand at ``value_ns`` (a restored VM's clock, so its timers resume relative to it). Only while
        stopped: a running clock moving under armed timers would fire or delay them arbitrarily."""
        with self._lock:
            if self._state[1] is not None:
                raise RuntimeError("VirtualClock.set: the clock is running")
            self._state = (value_ns, None)

    def add_listener(self, listener: ClockListener) -> None:
        """``listener(running)`` after each start and stop."""
        self._listeners.append(listener)

    def _notify(self, running: bool) -> None:
        for listener in list(self._listeners):
            listener(running)


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
    """The timers of one machine, run on one thread (or by hand in tests).

    ``clock`` is a :class:`VirtualClock` (a machine's: the thread waits without a timeout while it is
    stopped) or any callable returning nanoseconds (a test's fake clock, or the host's monotonic clock).
    """

    def __init__(self, lock: threading.RLock | None = None,
                 clock: VirtualClock | Callable[[], int] = time.monotonic_ns) -> None:
        self.lock = lock if lock is not None else threading.RLock()
        self._virtual = clock if isinstance(clock, VirtualClock) else None
        self._clock: Callable[[], int] = clock.now if isinstance(clock, VirtualClock) else clock
        self._heap: list[tuple[int, int, int, Timer]] = []
        self._seq = itertools.count()
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False
        if self._virtual is not None:
            self._virtual.add_listener(self._clock_changed)

    def now(self) -> int:
        """Current time of this queue's clock, in nanoseconds."""
        return self._clock()

    def _clock_changed(self, running: bool) -> None:
        """The virtual clock started or stopped: the thread recomputes how long to sleep."""
        with self._wake:
            self._wake.notify()

    def _clock_stopped(self) -> bool:
        return self._virtual is not None and not self._virtual.running

    def new_timer(self, callback: TimerCallback, name: str = "timer") -> Timer:
        return Timer(self, callback, name)

    # -- arming ------------------------------------------------------------------------------------------
    def _arm(self, timer: Timer, deadline_ns: int) -> None:
        """Queue ``timer`` for ``deadline_ns``; only a deadline sooner than the first one wakes the thread.

        Why: a waiting thread sleeps until the heap's first entry (see :meth:`_loop`), and that entry only
        moves earlier while it sleeps, each time with a notify; so a deadline at or after it is seen when
        the thread wakes anyway (a stale first entry, from a timer re-armed later, costs one early wake-up
        that finds nothing due). The notify is a cross-CPU wake-up that the arming thread pays for inside
        the syscall (~18 us here): a guest re-arming its LAPIC timer for later, as Linux does on every idle
        entry and exit, paid it on every TMICT or TSC-deadline write."""
        with self._wake:
            timer._generation += 1
            timer.expire_ns = deadline_ns
            sooner = not self._heap or deadline_ns < self._heap[0][0]
            heapq.heappush(self._heap, (deadline_ns, next(self._seq), timer._generation, timer))
            if sooner:
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
                _, _, generation, timer = heapq.heappop(self._heap)
            # The timer stays armed (expire_ns set) until the machine lock is held: a device saving its
            # state under that lock in between sees an expiry that is due now, never a running counter
            # whose timer is neither armed nor fired yet.
            with self.lock:
                with self._wake:
                    if timer._generation != generation:
                        continue  # cancelled or re-armed while we waited for the lock
                    timer.expire_ns = None
                    timer._generation += 1
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
                if self._heap and not self._clock_stopped():
                    delay = (self._heap[0][0] - self.now()) / 1e9
                    if delay > 0:
                        self._wake.wait(delay)
                else:
                    # Nothing armed, or virtual time stands still: only an arm or a clock start can
                    # make a timer due, and both notify.
                    self._wake.wait()
                if self._stopping:
                    return
