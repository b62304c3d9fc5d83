"""The host CPU that software vCPU threads share (:mod:`pyemu.accel.tcg.vcpu_placement`): who joins, what
is pinned and given back, and when the group moves -- against a scripted host, then against this one."""

from __future__ import annotations

import os
import threading

import pytest

from pyemu.accel.tcg.vcpu_placement import (
    CLOCK_TICK_S, CpuTicks, HostView, SharedCpu, cpu_ticks, current_cpu, thread_run_ns,
)

TICKS_PER_S = round(1 / CLOCK_TICK_S)


class ScriptedHost:
    """A host with CPUs 0-3 whose clocks, CPU ticks and thread run times the test moves by hand."""

    def __init__(self, cpus: set[int] | None = None, here: int = 1) -> None:
        self.cpus = cpus if cpus is not None else {0, 1, 2, 3}
        self.here = here
        self.now = 100.0
        self.busy = {cpu: 0 for cpu in self.cpus}
        self.idle = {cpu: 0 for cpu in self.cpus}
        self.run_ns: dict[int, int] = {}
        self.affinity: dict[int, set[int]] = {}   # 0 stands for "the calling thread", as in the syscall

    def view(self) -> HostView:
        return HostView(thread_run_ns=self.run_ns.get,
                        cpu_ticks=lambda: {cpu: CpuTicks(self.busy[cpu], self.idle[cpu]) for cpu in self.cpus},
                        current_cpu=lambda: self.here,
                        set_affinity=self._set, get_affinity=self._get, monotonic=lambda: self.now)

    def _key(self, tid: int) -> int:
        return threading.get_native_id() if tid == 0 else tid

    def _set(self, tid: int, cpus: set[int]) -> None:
        self.affinity[self._key(tid)] = set(cpus)

    def _get(self, tid: int) -> set[int]:
        return set(self.affinity.get(self._key(tid), self.cpus))

    def elapse(self, seconds: float, *, busy: dict[int, float], group_s: dict[int, float]) -> None:
        """``seconds`` pass: each CPU in ``busy`` runs that long, the others idle; each member tid in
        ``group_s`` runs that long."""
        self.now += seconds
        for cpu in self.cpus:
            ran = busy.get(cpu, 0.0)
            self.busy[cpu] += round(ran * TICKS_PER_S)
            self.idle[cpu] += round((seconds - ran) * TICKS_PER_S)
        for tid, ran in group_s.items():
            self.run_ns[tid] = self.run_ns.get(tid, 0) + round(ran * 1e9)


@pytest.fixture
def host() -> ScriptedHost:
    return ScriptedHost()


def _group(host: ScriptedHost) -> SharedCpu:
    group = SharedCpu(host.view())
    group.enabled = True
    return group


def test_a_member_runs_on_the_cpu_it_was_on_and_gets_its_own_affinity_back(host: ScriptedHost) -> None:
    group = _group(host)
    me = threading.get_native_id()
    host.run_ns[me] = 0
    try:
        with group.member():
            assert host.affinity[me] == {1}
            assert group.cpu == 1
        assert host.affinity[me] == {0, 1, 2, 3}
    finally:
        group.close()


def test_nested_membership_pins_once_and_restores_once(host: ScriptedHost) -> None:
    group = _group(host)
    me = threading.get_native_id()
    host.affinity[me] = {2, 3}   # the caller's own affinity was narrower than the process's
    try:
        with group.member():
            with group.member():
                assert host.affinity[me] == {1}
            assert host.affinity[me] == {1}
        assert host.affinity[me] == {2, 3}
    finally:
        group.close()


def test_disabled_or_single_cpu_groups_touch_nothing() -> None:
    for cpus, enabled in (({0, 1, 2, 3}, False), ({3}, True)):
        host = ScriptedHost(cpus, here=3)
        group = SharedCpu(host.view())
        group.enabled = enabled
        with group.member():
            pass
        assert host.affinity == {} and group.cpu is None


def test_members_on_other_threads_share_the_first_members_cpu(host: ScriptedHost) -> None:
    group = _group(host)
    inside = threading.Barrier(3)
    tids: list[int] = []

    def vcpu() -> None:
        tids.append(threading.get_native_id())
        with group.member():
            inside.wait(timeout=10)   # all three inside at once
            inside.wait(timeout=10)   # the main thread has looked

    threads = [threading.Thread(target=vcpu) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        inside.wait(timeout=10)
        assert [host.affinity[tid] for tid in tids] == [{1}, {1}]
        inside.wait(timeout=10)
        for thread in threads:
            thread.join(timeout=10)
    finally:
        group.close()


def _reviewed_by_hand(host: ScriptedHost) -> tuple[SharedCpu, int]:
    """An enabled group without its reviewer thread (the test calls review), and the calling thread's id
    with its run time at 0."""
    group = _group(host)
    group.close()
    me = threading.get_native_id()
    host.run_ns[me] = 0
    return group, me


def _run_period(host: ScriptedHost, group: SharedCpu, tid: int, *, busy: dict[int, float], group_s: float) -> None:
    host.elapse(group.review_s, busy=busy, group_s={tid: group_s})
    group.review()


def test_the_group_leaves_a_cpu_someone_else_keeps_busy_for_the_idlest_one(host: ScriptedHost) -> None:
    group, me = _reviewed_by_hand(host)
    with group.member():
        # The group ran half the period on CPU 1, another task the other half; CPU 3 idled most.
        _run_period(host, group, me, busy={1: 0.25, 0: 0.2, 2: 0.24, 3: 0.05}, group_s=0.125)
        assert group.cpu == 3 and group.moves == 1
        assert host.affinity[me] == {3}


def test_the_group_stays_when_its_own_threads_keep_the_cpu_busy(host: ScriptedHost) -> None:
    group, me = _reviewed_by_hand(host)
    with group.member():
        for _ in range(4):
            _run_period(host, group, me, busy={1: 0.25}, group_s=0.25)
        assert group.cpu == 1 and group.moves == 0


def test_the_group_stays_when_every_other_cpu_is_busy_too(host: ScriptedHost) -> None:
    group, me = _reviewed_by_hand(host)
    with group.member():
        _run_period(host, group, me, busy={0: 0.25, 1: 0.25, 2: 0.22, 3: 0.24}, group_s=0.12)
        assert group.cpu == 1 and group.moves == 0


def test_a_member_that_left_during_the_period_still_counts_as_the_groups_own_use(host: ScriptedHost) -> None:
    group, me = _reviewed_by_hand(host)
    left = threading.Event()
    done = threading.Event()

    def vcpu() -> None:
        tid = threading.get_native_id()
        host.run_ns[tid] = 0
        with group.member():
            host.elapse(0.0, busy={}, group_s={tid: 0.2})   # it ran 0.2 s of the period, then left
        left.set()
        done.wait(timeout=10)

    with group.member():
        thread = threading.Thread(target=vcpu)
        thread.start()
        assert left.wait(timeout=10)
        # CPU 1 busy the whole period: 0.2 s by the member that left, 0.05 s by this one.
        host.elapse(group.review_s, busy={1: 0.25}, group_s={me: 0.05})
        group.review()
        done.set()
        thread.join(timeout=10)
        assert group.cpu == 1 and group.moves == 0


def test_a_paused_group_starts_a_fresh_period_when_it_runs_again(host: ScriptedHost) -> None:
    group, me = _reviewed_by_hand(host)
    with group.member():
        pass
    host.elapse(10.0, busy={1: 10.0}, group_s={})   # someone else used CPU 1 while the VM was paused
    with group.member():
        _run_period(host, group, me, busy={1: 0.25}, group_s=0.25)
        assert group.cpu == 1 and group.moves == 0


def test_the_reviewer_thread_moves_the_group_and_stops_on_close(host: ScriptedHost) -> None:
    group = _group(host)
    group.review_s = 0.01
    me = threading.get_native_id()
    host.run_ns[me] = 0
    try:
        with group.member():
            reviewers = [thread for thread in threading.enumerate() if thread.name == "vcpu-placement"]
            assert reviewers
            for _ in range(1000):   # someone else keeps CPU 1 busy while CPU 0 idles
                host.now += 0.5
                host.busy[1] += TICKS_PER_S // 2
                host.idle[0] += TICKS_PER_S // 2
                threading.Event().wait(0.01)
                if group.moves:
                    break
            assert group.cpu == 0 and host.affinity[me] == {0}
    finally:
        group.close()
    assert not any(thread.is_alive() for thread in reviewers)


# -- this host's own readings ---------------------------------------------------------------------------
def test_this_hosts_readings_are_there_and_move_forward() -> None:
    tid = threading.get_native_id()
    before = thread_run_ns(tid)
    assert before is not None
    sum(range(300_000))
    after = thread_run_ns(tid)
    assert after is not None and after > before
    assert thread_run_ns(2**31 - 1) is None   # no such thread
    allowed = os.sched_getaffinity(0)
    ticks = cpu_ticks()
    assert allowed <= set(ticks)
    assert all(each.busy >= 0 and each.idle >= 0 for each in ticks.values())
    assert current_cpu() in allowed


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process allowed two host CPUs")
def test_on_this_host_a_member_thread_is_pinned_and_freed() -> None:
    group = SharedCpu()
    group.enabled = True
    seen: list[set[int]] = []

    def vcpu() -> None:
        with group.member():
            seen.append(os.sched_getaffinity(0))
        seen.append(os.sched_getaffinity(0))

    try:
        thread = threading.Thread(target=vcpu)
        thread.start()
        thread.join(timeout=10)
    finally:
        group.close()
    assert seen[0] == {group.cpu}
    assert seen[1] == os.sched_getaffinity(0)
