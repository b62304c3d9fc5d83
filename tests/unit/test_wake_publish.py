"""I/O threads set the wake-up flags their handlers leave to them once the handler is done, on the way to
sleep (pyemu.system.wake_publish); anywhere else the caller is told to set them itself."""

from __future__ import annotations

import os
import select
import threading

import pytest

from pyemu.system import wake_publish
from pyemu.system.iothread import IoThread


class RecordingPublisher:
    """Stands in for the C publisher: records what it was given, then waits on the epoll set as it does."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.published = threading.Event()

    def __call__(self, epoll_fd: int, flags) -> list[int]:  # type: ignore[no-untyped-def]
        self.calls.append((epoll_fd, tuple(flags)))
        self.published.set()
        poller = select.epoll.fromfd(os.dup(epoll_fd))
        try:
            return [fd for fd, _mask in poller.poll()]
        finally:
            poller.close()


@pytest.fixture
def publisher(monkeypatch: pytest.MonkeyPatch) -> RecordingPublisher:
    recording = RecordingPublisher()
    monkeypatch.setattr(wake_publish, "_publisher", recording)
    return recording


def test_flags_left_by_a_handler_are_published_after_it_returns(publisher: RecordingPublisher) -> None:
    iothread = IoThread("publish-test")
    iothread.start()
    try:
        seen_during_handler: list[int] = []

        def handler() -> None:
            assert wake_publish.publish_on_sleep((0x1000, 0x2000))
            assert wake_publish.publish_on_sleep((0x3000,))
            seen_during_handler.append(len(publisher.calls))

        iothread.call_soon(handler)
        assert publisher.published.wait(10)
        assert seen_during_handler == [0]
        assert len(publisher.calls) == 1
        epoll_fd, flags = publisher.calls[0]
        assert flags == (0x1000, 0x2000, 0x3000)
        assert epoll_fd == iothread._selector.fileno()  # it waits on the thread's own set
        # Published once: the next round of work, with nothing left, goes back to the plain wait.
        done = threading.Event()
        iothread.call_soon(done.set)
        assert done.wait(10)
        assert len(publisher.calls) == 1
    finally:
        iothread.close()


def test_no_io_thread_or_no_publisher_means_the_caller_sets_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wake_publish, "_publisher", RecordingPublisher())
    assert wake_publish.publish_on_sleep((0x1000,)) is False  # the test's own thread is no I/O thread
    monkeypatch.setattr(wake_publish, "_publisher", None)
    iothread = IoThread("no-publisher")
    iothread.start()
    try:
        answers: list[bool] = []
        done = threading.Event()
        iothread.call_soon(lambda: (answers.append(wake_publish.publish_on_sleep((0x1000,))), done.set()))
        assert done.wait(10)
        assert answers == [False]
    finally:
        iothread.close()


def test_the_c_publisher_sets_every_flag_before_it_waits() -> None:
    from pyemu.accel.tcg.block_gate import load_gate_module, wake_publisher

    module = load_gate_module()
    flags = module.ffi.new("int32_t[3]")
    addresses = [int(module.ffi.cast("intptr_t", flags + i)) for i in range(3)]
    poller = select.epoll()
    ready_r, ready_w = os.pipe()
    poller.register(ready_r, select.EPOLLIN)
    try:
        os.write(ready_w, b"x")  # a ready descriptor: the wait returns at once, naming it
        assert wake_publisher(module)(poller.fileno(), addresses[:2]) == [ready_r]
        assert list(flags) == [1, 1, 0]
    finally:
        poller.close()
        os.close(ready_r)
        os.close(ready_w)
