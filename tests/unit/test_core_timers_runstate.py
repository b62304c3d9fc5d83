"""Deadline timers on a fake clock, the timer thread, and the run-state machine."""

import threading

import pytest

from pyemu.system.runstate import RunState, RunStateError, RunStateMachine, ShutdownCause
from pyemu.system.timers import TimerQueue
from pyemu.testing.clock import FakeClock


def test_timers_fire_in_deadline_order_and_cancel():
    clock = FakeClock()
    queue = TimerQueue(clock=clock)
    fired = []
    a = queue.new_timer(lambda: fired.append("a"))
    b = queue.new_timer(lambda: fired.append("b"))
    c = queue.new_timer(lambda: fired.append("c"))
    a.mod(300)
    b.mod(100)
    c.mod(200)
    c.cancel()
    assert queue.next_deadline() == 100
    clock.ns = 250
    assert queue.run_due() == 1
    assert fired == ["b"]
    clock.ns = 1000
    queue.run_due()
    assert fired == ["b", "a"]
    assert not a.pending and queue.next_deadline() is None


def test_rearming_replaces_the_old_deadline_and_periodic_rearm_from_callback():
    clock = FakeClock()
    queue = TimerQueue(clock=clock)
    ticks = []

    def tick():
        ticks.append(clock.ns)
        if len(ticks) < 3:
            timer.mod(timer_deadline[0] + 10 * len(ticks))

    timer_deadline = [50]
    timer = queue.new_timer(tick)
    timer.mod(1000)
    timer.mod(50)  # re-arm earlier: only this deadline counts
    clock.ns = 50
    queue.run_due()
    clock.ns = 10_000
    queue.run_due()
    assert ticks == [50, 10_000, 10_000]


def test_timer_thread_runs_callbacks_under_the_lock():
    lock = threading.RLock()
    queue = TimerQueue(lock=lock)
    done = threading.Event()
    owned = []

    def callback():
        owned.append(lock._is_owned())
        done.set()

    queue.start()
    try:
        queue.new_timer(callback).mod_in(2_000_000)
        assert done.wait(2.0)
        assert owned == [True]
    finally:
        queue.stop()


def test_only_a_sooner_deadline_wakes_the_timer_thread_and_later_ones_still_fire():
    """Arming for later than the first deadline does not notify the sleeping timer thread (the notify is a
    cross-CPU wake-up the arming vCPU pays for); the thread finds such timers when it wakes anyway, also
    when the first entry is a timer since re-armed for later (a stale heap entry)."""
    queue = TimerQueue()
    notified = []
    original_notify = queue._wake.notify
    queue._wake.notify = lambda n=1: (notified.append(n), original_notify(n))  # type: ignore[method-assign]
    fired: list[str] = []
    done = threading.Event()
    both = threading.Event()
    first = queue.new_timer(lambda: (fired.append("first"), both.set()))
    later = queue.new_timer(lambda: (fired.append("later"), done.set()))
    queue.start()
    try:
        first.mod_in(40_000_000)
        assert len(notified) == 1                # the first deadline wakes the thread to sleep less
        later.mod_in(60_000_000)
        first.mod_in(80_000_000)                 # re-armed later: its old entry stays first, stale
        assert len(notified) == 1                # neither woke the thread
        assert done.wait(5.0)
        assert fired == ["later"]                # found when the thread woke for the stale entry
        assert both.wait(5.0)
        assert fired == ["later", "first"]
        soon = threading.Event()
        first.mod_in(1000 * 1_000_000_000)       # the thread now sleeps for 1000 s ...
        queue.new_timer(soon.set).mod_in(1_000_000)
        assert soon.wait(30.0)                   # ... unless a sooner deadline wakes it
    finally:
        queue.stop()


def test_runstate_transitions_and_first_shutdown_cause_wins():
    rs = RunStateMachine()
    seen = []
    rs.add_listener(lambda old, new: seen.append((old, new)))
    rs.transition(RunState.RUNNING)
    rs.transition(RunState.PAUSED)
    rs.transition(RunState.RUNNING)
    rs.shutdown(ShutdownCause.DEBUG_EXIT, exit_code=7)
    rs.shutdown(ShutdownCause.GUEST_SHUTDOWN, exit_code=0)
    assert rs.state is RunState.SHUTDOWN
    assert rs.shutdown_cause is ShutdownCause.DEBUG_EXIT and rs.exit_code == 7
    assert seen[0] == (RunState.PRELAUNCH, RunState.RUNNING)
    with pytest.raises(RunStateError):
        RunStateMachine().transition(RunState.INTERNAL_ERROR)


def test_a_due_timer_stays_armed_until_its_callback_holds_the_lock():
    """A state saved under the machine lock while the timer thread has already taken a due timer off the
    queue (but waits for the lock) must see that timer armed: the one-shot LAPIC timer once saved
    'counter running, timer not armed' this way and the migration destination refused the stream."""
    from pyemu.hw.intc.lapic_timer import ApicTimer

    clock = FakeClock()
    lock = threading.RLock()
    queue = TimerQueue(lock=lock, clock=clock)
    fired = []
    apic_timer = ApicTimer(queue, lambda: fired.append(clock.ns), crystal_hz=1_000_000_000, tsc_hz=1)
    apic_timer.write_initial_count(100)
    clock.ns = 500
    with lock:
        runner = threading.Thread(target=queue.run_due)
        runner.start()
        while queue._heap:  # the runner has popped the due timer and now waits for the lock
            runner.join(0.001)
        saved = ApicTimer.check_state(apic_timer.state())
        assert saved.running and saved.remaining_ns == 0 and fired == []
    runner.join(5)
    assert fired == [500] and not apic_timer.state().running


def test_a_due_timer_cancelled_while_its_callback_waits_for_the_lock_does_not_fire():
    clock = FakeClock()
    lock = threading.RLock()
    queue = TimerQueue(lock=lock, clock=clock)
    fired = []
    timer = queue.new_timer(lambda: fired.append(1))
    timer.mod(10)
    clock.ns = 20
    with lock:
        runner = threading.Thread(target=queue.run_due)
        runner.start()
        while queue._heap:
            runner.join(0.001)
        timer.cancel()
    runner.join(5)
    assert fired == [] and not timer.pending
