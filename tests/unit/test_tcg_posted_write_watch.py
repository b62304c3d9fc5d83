"""The watch that ends a vCPU's run when its posted port writes stop moving (accel/tcg/port_fast_paths.py),
one look at a time: only a queue that stayed non-empty and unchanged since the last look is preempted."""

from __future__ import annotations

import time

from pyemu.accel.tcg.port_fast_paths import PostedWriteWatch, review_posted


class FakeVcpu:
    def __init__(self, pending: int = 0) -> None:
        self.posted_pending = pending
        self.preempted = 0

    def preempt(self) -> None:
        self.preempted += 1


def test_only_a_queue_that_did_not_move_since_the_last_look_is_preempted() -> None:
    busy, idle, stuck = FakeVcpu(3), FakeVcpu(0), FakeVcpu(5)
    vcpus = [busy, idle, stuck]
    seen: dict[int, int] = {}
    assert review_posted(vcpus, seen) == 0        # first look: nothing is known to be stuck yet
    busy.posted_pending = 7                       # the guest went on posting
    assert review_posted(vcpus, seen) == 1
    assert (busy.preempted, idle.preempted, stuck.preempted) == (0, 0, 1)
    stuck.posted_pending = 0                      # its run ended and delivered them
    busy.posted_pending = 9
    assert review_posted(vcpus, seen) == 0 and stuck.preempted == 1
    assert review_posted(vcpus, seen) == 1 and busy.preempted == 1   # now busy stopped posting


def test_the_watch_thread_looks_every_period_and_stops_on_close() -> None:
    stuck = FakeVcpu(2)
    watch = PostedWriteWatch(lambda: [stuck])
    deadline = time.monotonic() + 10.0
    while stuck.preempted == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    watch.close()
    assert stuck.preempted >= 1 and watch.preemptions == stuck.preempted
    after = stuck.preempted
    time.sleep(3 * PostedWriteWatch.PERIOD_S)
    assert stuck.preempted == after
