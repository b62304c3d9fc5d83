"""How an I/O thread waits (pyemu.system.iothread_wait): it sets the wake-up flags its handlers left once
they are done (pyemu.system.wake_publish), spins over its descriptors for its adaptive window, then
sleeps; the window follows QEMU's poll-max-ns / poll-grow / poll-shrink rule (pyemu.system.poll_window)."""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

from pyemu.errors import ConfigError
from pyemu.system import iothread_wait, wake_publish
from pyemu.system.event_notifier import EventNotifier
from pyemu.system.iothread import DEFAULT_POLL_MAX_NS, DEFAULT_POLL_SHRINK, IoThread, default_poll_max_ns
from pyemu.system.objects import IoThreadOptions, parse_iothread
from pyemu.system.poll_window import GROW_START_NS, PollWindow


class RecordingWaiter:
    """Stands in for the C wait: records what it was given, then waits on the epoll set as it does."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[int, ...], int]] = []
        self.published = threading.Event()

    def __call__(self, epoll_fd: int, flags, spin_ns: int) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
        self.calls.append((epoll_fd, tuple(flags), spin_ns))
        if flags:
            self.published.set()
        started = time.monotonic_ns()
        poller = select.epoll.fromfd(os.dup(epoll_fd))
        try:
            return [fd for fd, _mask in poller.poll()], time.monotonic_ns() - started
        finally:
            poller.close()


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> RecordingWaiter:
    waiter = RecordingWaiter()
    monkeypatch.setattr(iothread_wait, "waiter", lambda: waiter)
    return waiter


def test_flags_left_by_a_handler_are_published_after_it_returns(recording: RecordingWaiter) -> None:
    iothread = IoThread("publish-test", poll_max_ns=0)
    iothread.start()
    try:
        seen_during_handler: list[int] = []

        def handler() -> None:
            assert wake_publish.publish_on_sleep((0x1000, 0x2000))
            assert wake_publish.publish_on_sleep((0x3000,))
            seen_during_handler.append(sum(1 for call in recording.calls if call[1]))

        iothread.call_soon(handler)
        assert recording.published.wait(10)
        assert seen_during_handler == [0]
        published = [call for call in recording.calls if call[1]]
        assert len(published) == 1
        epoll_fd, flags, _spin = published[0]
        assert flags == (0x1000, 0x2000, 0x3000)
        assert epoll_fd == iothread._selector.fileno()  # it waits on the thread's own set
        # Published once: the next round of work, with nothing left, waits with no flags.
        done = threading.Event()
        iothread.call_soon(done.set)
        assert done.wait(10)
        assert len([call for call in recording.calls if call[1]]) == 1
    finally:
        iothread.close()


def test_without_the_c_wait_or_off_an_io_thread_the_caller_sets_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert wake_publish.publish_on_sleep((0x1000,)) is False  # the test's own thread is no I/O thread
    monkeypatch.setattr(iothread_wait, "waiter", lambda: None)
    iothread = IoThread("no-c-wait")
    iothread.start()
    try:
        answers: list[bool] = []
        done = threading.Event()
        iothread.call_soon(lambda: (answers.append(wake_publish.publish_on_sleep((0x1000,))), done.set()))
        assert done.wait(10)
        assert answers == [False]
    finally:
        iothread.close()


@pytest.fixture
def epoll_with_pipe():
    poller = select.epoll()
    ready_r, ready_w = os.pipe()
    poller.register(ready_r, select.EPOLLIN)
    yield poller, ready_r, ready_w
    poller.close()
    os.close(ready_r)
    os.close(ready_w)


def test_the_c_wait_sets_every_flag_before_it_waits(epoll_with_pipe) -> None:
    poller, ready_r, ready_w = epoll_with_pipe
    module = iothread_wait._module.get()
    assert module is not None
    flags = module.ffi.new("int32_t[3]")
    addresses = [int(module.ffi.cast("intptr_t", flags + i)) for i in range(3)]
    wait = iothread_wait.waiter()
    assert wait is not None
    os.write(ready_w, b"x")  # a ready descriptor: the wait returns at once, naming it
    fds, _waited = wait(poller.fileno(), addresses[:2], 0)
    assert fds == [ready_r]
    assert list(flags) == [1, 1, 0]


def test_an_event_during_the_spin_ends_it_and_the_spin_lets_python_run(epoll_with_pipe) -> None:
    poller, ready_r, ready_w = epoll_with_pipe
    wait = iothread_wait.waiter()
    assert wait is not None
    result: list[tuple[list[int], int]] = []
    spin_ns = 30_000_000_000  # longer than the test: only the event can end the wait
    waiting = threading.Thread(target=lambda: result.append(wait(poller.fileno(), (), spin_ns)))
    started = time.monotonic_ns()
    waiting.start()
    spins = 0
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:  # this thread runs Python while the other spins in C
        spins += 1
    assert waiting.is_alive()  # still waiting: only the event can end it
    os.write(ready_w, b"x")
    waiting.join(timeout=10)
    ended = time.monotonic_ns()
    assert not waiting.is_alive()
    (fds, waited), = result
    assert fds == [ready_r]
    # Ended by the event, within the spin. (Not "at least 50 ms": on a busy host the waiting thread's C
    # call may begin some milliseconds after this thread's clock started.)
    assert 0 < waited <= ended - started and waited < spin_ns
    assert spins > 1000


def test_after_the_spin_the_wait_sleeps_until_the_event(epoll_with_pipe) -> None:
    poller, ready_r, ready_w = epoll_with_pipe
    wait = iothread_wait.waiter()
    assert wait is not None
    result: list[tuple[list[int], int]] = []
    waiting = threading.Thread(target=lambda: result.append(wait(poller.fileno(), (), 1_000_000)))
    waiting.start()
    time.sleep(0.2)
    assert waiting.is_alive()
    os.write(ready_w, b"x")
    waiting.join(timeout=10)
    (fds, waited), = result
    assert fds == [ready_r]
    assert waited >= 200_000_000


def test_the_window_grows_on_short_waits_and_resets_on_idle() -> None:
    window = PollWindow(400_000)
    assert window.budget_ns() == 0
    window.record(50_000, woken_while_polling=False)
    assert window.budget_ns() == GROW_START_NS
    sizes = []
    for _ in range(8):
        window.record(300_000, woken_while_polling=False)
        sizes.append(window.budget_ns())
    assert sizes[:3] == [2 * GROW_START_NS, 4 * GROW_START_NS, 8 * GROW_START_NS]
    assert sizes[-1] == 400_000
    window.record(1_000, woken_while_polling=True)
    assert window.budget_ns() == 400_000 and window.poll_hits == 1
    window.record(400_001, woken_while_polling=False)  # idle time: stop spinning
    assert window.budget_ns() == 0


def test_poll_grow_and_poll_shrink_as_qemu() -> None:
    window = PollWindow(1_000_000, grow=4, shrink=2)
    window.record(10, woken_while_polling=False)
    window.record(500_000, woken_while_polling=False)
    assert window.budget_ns() == 4 * GROW_START_NS
    window.record(2_000_000, woken_while_polling=False)
    assert window.budget_ns() == 2 * GROW_START_NS  # halved, not dropped
    assert PollWindow(0).budget_ns() == 0
    off = PollWindow(0)
    off.record(10, woken_while_polling=False)
    assert off.budget_ns() == 0  # poll-max-ns=0: never spins


def test_an_owner_defaultdivisor_halves_on_idle_time_and_other_events_still_stop_the_spin() -> None:
    window = PollWindow(400_000, default_shrink=2)
    for _ in range(7):
        window.record(300_000, woken_while_polling=False)
    assert window.budget_ns() == 400_000
    window.record(500_000, woken_while_polling=False)  # one long gap between requests
    assert window.budget_ns() == 200_000
    window.record(300_000, woken_while_polling=False)
    assert window.budget_ns() == 400_000  # one miss, not six, to catch such waits again
    assert window.shrink == 0  # what query-iothreads shows: not given
    sizes = []
    for _ in range(6):
        window.record(10_000_000, woken_while_polling=False)
        sizes.append(window.budget_ns())
    # idle: each long wait halves what is left, and below the 10 µs start it is nothing (KVM's rule)
    assert sizes == [200_000, 100_000, 50_000, 25_000, 12_500, 0]
    window.record(300_000, woken_while_polling=False)
    window.record_idle()
    assert window.budget_ns() == 0
    assert PollWindow(400_000, shrink=4, default_shrink=2).divisor == 4  # a given poll-shrink wins


def test_an_iothread_halves_its_window_after_a_long_wait_unless_told_otherwise() -> None:
    for name, given, divisor in (("halving", 0, DEFAULT_POLL_SHRINK), ("given", 3, 3)):
        iothread = IoThread(name, poll_shrink=given)
        assert iothread.poll.divisor == divisor and iothread.poll.shrink == given
        iothread.close()
    assert DEFAULT_POLL_SHRINK == 2


def _serve_events(iothread: IoThread, polled: bool, count: int = 6) -> int:
    """``count`` events, each after the previous one was served, from one source registered ``polled``;
    returns the spin window after them (taking the source away is a wake-up of its own)."""
    notifier = EventNotifier("poll-test")
    served = threading.Semaphore(0)

    def handler() -> None:
        notifier.test_and_clear()
        served.release()
    iothread.add_reader(notifier, handler, polled=polled)
    try:
        for _ in range(count):
            notifier.set()
            assert served.acquire(timeout=10)
        return iothread.poll.budget_ns()
    finally:
        iothread.remove_reader(notifier)
        notifier.close()


def test_events_of_a_polled_source_close_together_open_the_window() -> None:
    iothread = IoThread("spin-test", poll_max_ns=200_000_000)
    iothread.start()
    try:
        assert _serve_events(iothread, polled=True) > 0
        assert iothread.poll.polls > 0
    finally:
        iothread.close()


def test_events_of_other_sources_keep_the_thread_from_spinning() -> None:
    iothread = IoThread("no-spin-test", poll_max_ns=200_000_000)
    iothread.start()
    try:
        assert _serve_events(iothread, polled=True) > 0
        assert _serve_events(iothread, polled=False) == 0  # a TAP descriptor, say: another process's work
        for _ in range(4):
            done = threading.Event()
            iothread.call_soon(done.set)  # the thread's own wake-ups are not worth spinning for either
            assert done.wait(10)
        assert iothread.poll.budget_ns() == 0
    finally:
        iothread.close()


def test_iothread_options_as_qemu() -> None:
    assert parse_iothread("io0", ()) == IoThreadOptions("io0")
    assert parse_iothread("io0", (("poll-max-ns", "0"), ("poll-grow", "3"), ("poll-shrink", "0x2"),
                                  ("aio-max-batch", "4"))) == IoThreadOptions("io0", 0, 3, 2, 4)
    with pytest.raises(ConfigError, match=r"^poll-max-ns value must be in range \[0, 9223372036854775807\]$"):
        parse_iothread("io0", (("poll-max-ns", "-1"),))
    with pytest.raises(ConfigError, match="Parameter 'poll-grow' expects an int64 value"):
        parse_iothread("io0", (("poll-grow", "x"),))
    with pytest.raises(ConfigError, match="Parameter 'poll-max-ns' expects an int64 value"):
        parse_iothread("io0", (("poll-max-ns", "99999999999999999999"),))
    with pytest.raises(ConfigError, match="Property 'iothread.polls' not found"):
        parse_iothread("io0", (("polls", "1"),))


def test_the_default_window_needs_a_second_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_poll_max_ns() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_poll_max_ns() == DEFAULT_POLL_MAX_NS
    for name, given, expected in (("defaults", None, DEFAULT_POLL_MAX_NS), ("given", 5, 5)):
        iothread = IoThread(name, poll_max_ns=given)
        assert iothread.poll.max_ns == expected
        iothread.close()
