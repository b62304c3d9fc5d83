"""The virtual clock (QEMU_CLOCK_VIRTUAL) and the timer queue on it, across pause and resume, driven by a
fake host clock; plus the software CPU's guest-TSC offset bookkeeping with a fake host TSC."""

from __future__ import annotations

import threading
import time

from pyemu.accel.tcg.guest_tsc import GuestTsc
from pyemu.system.timers import TimerQueue, VirtualClock
from pyemu.testing.clock import FakeClock

MASK = (1 << 64) - 1


def test_clock_starts_stopped_at_zero_and_only_advances_while_running() -> None:
    host = FakeClock(1_000_000)
    clock = VirtualClock(host)
    assert clock.now() == 0 and not clock.running
    host.ns += 500
    assert clock.now() == 0
    clock.start()
    host.ns += 300
    assert clock.now() == 300
    clock.stop()
    host.ns += 10_000_000_000  # a long pause
    assert clock.now() == 300
    clock.start()
    assert clock.now() == 300  # resumes where it stopped
    host.ns += 50
    assert clock.now() == 350


def test_start_and_stop_are_idempotent_and_notify_listeners() -> None:
    host = FakeClock()
    clock = VirtualClock(host)
    heard: list[bool] = []
    clock.add_listener(heard.append)
    clock.start()
    host.ns += 10
    clock.start()  # no restart: time is not lost or counted twice
    assert clock.now() == 10
    clock.stop()
    clock.stop()
    assert heard == [True, False]


def test_timer_deadlines_are_virtual_across_a_pause() -> None:
    host = FakeClock()
    clock = VirtualClock(host)
    queue = TimerQueue(clock=clock)
    fired: list[int] = []
    timer = queue.new_timer(lambda: fired.append(clock.now()))
    clock.start()
    timer.mod_in(1_000)
    host.ns += 600
    clock.stop()
    host.ns += 5_000  # paused far past the deadline
    assert queue.run_due() == 0 and fired == []
    clock.start()
    host.ns += 399
    assert queue.run_due() == 0
    host.ns += 1
    assert queue.run_due() == 1 and fired == [1_000]


def test_timer_thread_sleeps_through_a_pause_and_fires_after_resume() -> None:
    """Real threads and the host clock: a timer armed 50 ms ahead does not fire during a 300 ms pause,
    and fires after the resume once its remaining virtual time has passed."""
    clock = VirtualClock()
    queue = TimerQueue(clock=clock)
    fired = threading.Event()
    at: list[int] = []

    def on_timer() -> None:
        at.append(clock.now())
        fired.set()

    timer = queue.new_timer(on_timer)
    queue.start()
    try:
        timer.mod(50_000_000)  # virtual 50 ms; the clock has not started yet (prelaunch)
        assert not fired.wait(0.3)
        clock.start()
        time.sleep(0.01)
        clock.stop()
        assert not fired.wait(0.3)
        clock.start()
        assert fired.wait(10)
        assert at and at[0] >= 50_000_000
    finally:
        queue.stop()


def test_timer_thread_does_not_spin_while_the_clock_is_stopped() -> None:
    """While virtual time stands still with a timer armed, the thread waits without a timeout: the queue
    is asked for the time only a bounded number of times however long the pause lasts."""
    calls = 0
    host_clock = time.monotonic_ns

    def counting_host() -> int:
        nonlocal calls
        calls += 1
        return host_clock()

    clock = VirtualClock(counting_host)
    queue = TimerQueue(clock=clock)
    timer = queue.new_timer(lambda: None)
    clock.start()
    timer.mod_in(10_000_000_000)
    queue.start()
    try:
        clock.stop()
        time.sleep(0.05)
        before = calls
        time.sleep(0.3)
        assert calls == before
    finally:
        queue.stop()


def test_guest_tsc_starts_at_zero_stops_and_resets() -> None:
    host = FakeClock(7_000_000)
    tsc = GuestTsc(host)
    assert tsc.value() == 0
    host.ns += 100
    assert tsc.value() == 100
    assert (host.ns + tsc.offset) & MASK == 100  # what RDTSC adds
    tsc.stop()
    host.ns += 1_000_000
    assert tsc.value() == 100
    tsc.start()
    assert tsc.value() == 100 and (host.ns + tsc.offset) & MASK == 100
    host.ns += 5
    assert tsc.value() == 105
    tsc.stop()
    tsc.reset()
    host.ns += 99
    assert tsc.value() == 0
    tsc.start()
    host.ns += 3
    assert tsc.value() == 3
    tsc.reset()
    assert tsc.value() == 0
    tsc.set(1 << 40)
    host.ns += 2
    assert tsc.value() == (1 << 40) + 2
