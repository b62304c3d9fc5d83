"""The software CPU's round-robin turns (accel/tcg/scheduler.py), with fake vCPUs on real threads."""

from __future__ import annotations

import threading
import time

from pyemu.accel.tcg.scheduler import RoundRobin


class FakeVcpu:
    """Holds the turn until preempted (or released by the test); records what the scheduler did."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.preempted = threading.Event()
        self.contended: list[bool] = []

    def preempt(self) -> None:
        self.preempted.set()

    def set_contended(self, contended: bool) -> None:
        self.contended.append(contended)


def test_turns_are_served_in_arrival_order():
    rr = RoundRobin()
    order: list[str] = []
    owner = FakeVcpu("owner")
    release = threading.Event()
    started = threading.Event()

    def hold() -> None:
        with rr.turn(owner):
            started.set()
            release.wait(5)
        order.append("owner")

    def take(vcpu: FakeVcpu) -> None:
        with rr.turn(vcpu):
            order.append(vcpu.name)

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(5)
    waiters = []
    for name in ("a", "b", "c"):
        thread = threading.Thread(target=take, args=(FakeVcpu(name),))
        thread.start()
        waiters.append(thread)
        time.sleep(0.05)  # arrival order a, b, c
    release.set()
    for thread in [holder, *waiters]:
        thread.join(5)
    assert order == ["owner", "a", "b", "c"]


def test_a_waiter_preempts_a_turn_older_than_the_slice_and_marks_it_contended():
    rr = RoundRobin(slice_s=0.05, urgent_slice_s=0.05)
    owner, waiter = FakeVcpu("owner"), FakeVcpu("waiter")
    got_turn = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with rr.turn(owner):
            holding.set()
            assert owner.preempted.wait(5)  # a real vCPU stops at the next block start

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    start = time.monotonic()

    def take() -> None:
        with rr.turn(waiter):
            got_turn.set()

    thread = threading.Thread(target=take)
    thread.start()
    assert got_turn.wait(5)
    waited = time.monotonic() - start
    holder.join(5)
    thread.join(5)
    assert owner.contended[0] is False  # alone when its turn began
    assert True in owner.contended  # the waiter told it
    assert owner.contended[-1] is False  # cleared when the turn ended
    assert rr.preemptions == 1
    assert waited < 2.0


def test_an_urgent_waiter_preempts_sooner_than_the_slice():
    rr = RoundRobin(slice_s=10.0, urgent_slice_s=0.01)
    owner = FakeVcpu("owner")
    holding = threading.Event()
    urgent = threading.Event()

    def hold() -> None:
        with rr.turn(owner):
            holding.set()
            owner.preempted.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    got_turn = threading.Event()

    def take() -> None:
        with rr.turn(FakeVcpu("waiter"), urgent.is_set):
            got_turn.set()

    thread = threading.Thread(target=take)
    thread.start()
    assert not got_turn.wait(0.3)  # not urgent: the 10 s slice protects the owner
    assert not owner.preempted.is_set()
    urgent.set()
    rr.nudge()  # what a vCPU's kick() does when an interrupt arrives
    assert got_turn.wait(5)
    holder.join(5)
    thread.join(5)
    assert owner.preempted.is_set()


def test_a_lone_vcpu_is_never_preempted():
    rr = RoundRobin(slice_s=0.001)
    vcpu = FakeVcpu("only")
    for _ in range(3):
        with rr.turn(vcpu):
            time.sleep(0.01)
    assert not vcpu.preempted.is_set()
    assert rr.turns == 3 and rr.preemptions == 0
    assert vcpu.contended == [False, False, False, False, False, False]


class DeafVcpu(FakeVcpu):
    """Loses the first preemption request (its block gate's flag was consumed by other engine work)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.requests = 0

    def preempt(self) -> None:
        self.requests += 1
        if self.requests > 1:
            super().preempt()


def test_a_lost_preemption_request_is_repeated():
    rr = RoundRobin(slice_s=0.02, urgent_slice_s=0.02)
    owner = DeafVcpu("owner")
    holding = threading.Event()

    def hold() -> None:
        with rr.turn(owner):
            holding.set()
            owner.preempted.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    got_turn = threading.Event()

    def take() -> None:
        with rr.turn(FakeVcpu("waiter")):
            got_turn.set()

    thread = threading.Thread(target=take)
    thread.start()
    assert got_turn.wait(30)  # without the repeat, the owner would hold the turn for good
    holder.join(5)
    thread.join(5)
    assert owner.requests >= 2
    assert rr.preemptions == 1 and rr.repeated_preemptions >= 1


def test_an_interrupt_for_a_waiting_vcpu_tells_the_owner_at_once():
    """nudge(woken) marks the turn's owner contended right away (its PAUSE spin then ends the turn), without
    waiting for the woken vCPU's thread to run and ask; an interrupt for the owner itself, or with no owner,
    marks nothing."""
    rr = RoundRobin(slice_s=10.0, urgent_slice_s=10.0)
    owner, woken = FakeVcpu("owner"), FakeVcpu("woken")
    rr.nudge(woken)                       # nobody holds the turn
    with rr.turn(owner):
        before = list(owner.contended)
        rr.nudge(owner)                   # the owner's own interrupt
        assert owner.contended == before
        rr.nudge(woken)
        assert owner.contended[len(before):] == [True]
    assert woken.contended == []
