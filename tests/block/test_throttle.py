"""The throttle algorithm on a fake clock: exact rates, bursts, read/write buckets, iops-size, group turns,
and QEMU's validity messages. No wall clock anywhere."""

from __future__ import annotations

from typing import Callable

import pytest

from pyemu.block.throttle import (NS, FakeTimers, ThrottleConfig, ThrottleError, ThrottleGroup,
                                  ThrottleGroupMember, check_limits)


def make_group(**limits: int) -> tuple[ThrottleGroup, FakeTimers]:
    timers = FakeTimers()
    config = ThrottleConfig.from_limits({k.replace("_", "-"): v for k, v in limits.items()})
    return ThrottleGroup("g", config, clock=timers.clock, timers=timers), timers


class Client:
    """Keeps one request of ``size`` waiting at all times, like a guest running dd; logs grants."""

    def __init__(self, member: ThrottleGroupMember, timers: FakeTimers, *, size: int, write: bool = True) -> None:
        self.member, self.timers, self.size, self.write = member, timers, size, write
        self.granted: list[int] = []  # fake time of each grant
        self.stopped = False

    def start(self) -> None:
        while not self.stopped:
            ticket = self.member.admit(self.write, self.size, self._woken)
            if not ticket.granted:
                return
            self.granted.append(self.timers.now)

    def _woken(self) -> None:
        self.granted.append(self.timers.now)
        self.start()

    def bytes_between(self, start: float, end: float) -> int:
        return self.size * sum(1 for t in self.granted if start * NS <= t < end * NS)


def test_bps_limit_is_exact_over_a_window() -> None:
    group, timers = make_group(bps_total=1_000_000)
    client = Client(group.register("a"), timers, size=65536)
    client.start()
    timers.advance(20 * NS)
    # a tenth of a second's worth may go at once (QEMU's bucket), then exactly the rate
    total = client.bytes_between(0, 20)
    assert 20_000_000 <= total <= 20_000_000 + 100_000 + 2 * 65536
    steady = client.bytes_between(5, 15)
    assert abs(steady - 10_000_000) <= 2 * 65536


class LateTimers(FakeTimers):
    """Timers on a busy host: every callback runs ``late`` ns after the deadline it was armed for."""

    def __init__(self, late: int) -> None:
        super().__init__()
        self.late = late

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> object:
        return super().arm(deadline_ns + self.late, callback)


class SlowGuest(Client):
    """A guest that needs ``round_trip`` ns after each completion before its next request arrives, with
    ``depth`` requests in flight (fio's iodepth): a request granted at t is followed by one at t+round_trip."""

    def __init__(self, member: ThrottleGroupMember, timers: FakeTimers, *, size: int, round_trip: int,
                 depth: int = 1) -> None:
        super().__init__(member, timers, size=size)
        self.round_trip, self.depth = round_trip, depth

    def start(self) -> None:
        for _ in range(self.depth):
            self._issue()

    def _issue(self) -> None:
        if self.stopped:
            return
        ticket = self.member.admit(self.write, self.size, self._woken)
        if ticket.granted:
            self._woken()

    def _woken(self) -> None:
        self.granted.append(self.timers.now)
        # the guest's next request (its own clock is punctual: FakeTimers.arm even when the throttle's is late)
        FakeTimers.arm(self.timers, self.timers.now + self.round_trip, self._issue)


@pytest.mark.parametrize("late_ms, depth", [(30, 1), (150, 2), (200, 4)])
def test_a_late_timer_loses_no_allowance(late_ms: int, depth: int) -> None:
    # 2 MiB/s in 64 KiB requests (31 ms each) while every timer fires late; 150 and 200 ms are longer than
    # the bucket's tenth of a second, so a bucket leaking down to empty meanwhile used to throw that time
    # away (14.2 and ~10 MiB instead of 16 in the window). The requests that waited behind the late one are
    # granted as of their due times; the guest's next ones arrive after the late wake-up (a request's worth
    # plus the bucket's tenth of a second is what those cover: 162 ms at depth 2, 224 ms at depth 4).
    timers = LateTimers(late_ms * NS // 1000)
    group = ThrottleGroup("g", ThrottleConfig.from_limits({"bps-total": 2 << 20}), clock=timers.clock,
                          timers=timers)
    guest = SlowGuest(group.register("a"), timers, size=65536, round_trip=0, depth=depth)
    guest.start()
    timers.advance(20 * NS)
    window = guest.bytes_between(2, 18)
    assert abs(window - 16 * (2 << 20)) <= (late_ms * (2 << 20) // 1000) + 2 * 65536, window / (2 << 20)
    total = guest.bytes_between(0, 20)
    assert total <= 20 * (2 << 20) + (2 << 20) // 10 + 65536  # and never more than the limit allows


def test_late_timers_keep_group_turns_and_bursts() -> None:
    # Two members sharing 2 MiB/s while every timer is 150 ms late: the catch-up grants still go in turns
    # (an even split) and add up to the limit.
    timers = LateTimers(150_000_000)
    group = ThrottleGroup("g", ThrottleConfig.from_limits({"bps-total": 2 << 20}), clock=timers.clock,
                          timers=timers)
    a = SlowGuest(group.register("a"), timers, size=65536, round_trip=0, depth=2)
    b = SlowGuest(group.register("b"), timers, size=65536, round_trip=0, depth=2)
    a.start()
    b.start()
    timers.advance(20 * NS)
    share_a, share_b = a.bytes_between(2, 18), b.bytes_between(2, 18)
    assert share_a + share_b == pytest.approx(16 * (2 << 20), abs=(2 << 20) * 15 // 100 + 2 * 65536)
    assert abs(share_a - share_b) <= 3 * 65536
    # A burst (max 8 MiB/s, max-length 1: an 8 MiB bucket over 1 MiB/s; as in QEMU, a length of 1 has no
    # second bucket bounding the peak rate) with late timers: the bucket's worth plus the average in the
    # first second, never more, then the average.
    timers = LateTimers(150_000_000)
    group = ThrottleGroup("g", ThrottleConfig.from_limits({"bps-total": 1 << 20, "bps-total-max": 8 << 20,
                                                           "bps-total-max-length": 1}),
                          clock=timers.clock, timers=timers)
    guest = SlowGuest(group.register("a"), timers, size=65536, round_trip=0, depth=2)
    guest.start()
    timers.advance(12 * NS)
    assert (8 << 20) <= guest.bytes_between(0, 1) <= (8 << 20) + (1 << 20) + 2 * 65536
    assert guest.bytes_between(4, 12) == pytest.approx(8 * (1 << 20), abs=(1 << 20) * 15 // 100 + 2 * 65536)


def test_late_timer_grants_are_never_dated_before_the_request() -> None:
    # One request waits; the timer is 2 s late; a second request arrives 1.5 s into that lateness. The
    # first is due at its deadline, the second no earlier than its arrival: the bucket after both is the
    # level they make from those times, so the third waits its full share.
    timers = LateTimers(2 * NS)
    group = ThrottleGroup("g", ThrottleConfig.from_limits({"bps-total": 1_000_000}), clock=timers.clock,
                          timers=timers)
    member = group.register("a")
    assert member.admit(True, 100_000, None).granted   # the bucket's size (a tenth of a second)
    assert member.admit(True, 100_000, None).granted   # at or below the size: it goes, level 200000
    first = member.admit(True, 100_000, None)          # due at 0.1 s
    assert not first.granted and timers.next_deadline == 2 * NS + 100_000_001
    timers.advance(1_500_000_000)
    second = member.admit(True, 100_000, None)          # arrives at 1.5 s: the level has leaked away by then
    timers.advance(700_000_000)                         # the timer fires at 2.1 s
    assert first.granted and second.granted
    third = member.admit(True, 100_000, None)
    # first accounted at 0.1 s (level 200000), leaked to 1.5 s (0), second accounted (100000), leaked to
    # 2.1 s: empty -- nothing was lost, nothing was banked beyond the rules.
    assert third.granted


def test_guest_round_trip_shorter_than_a_request_keeps_the_rate() -> None:
    # One request in flight, 20 ms of guest time between a completion and the next request: 64 KiB at
    # 2 MiB/s is 31 ms, so the throttle, not the guest, sets the pace.
    group, timers = make_group(bps_total=2 << 20)
    guest = SlowGuest(group.register("a"), timers, size=65536, round_trip=20_000_000)
    guest.start()
    timers.advance(20 * NS)
    assert abs(guest.bytes_between(2, 18) - 16 * (2 << 20)) <= 2 * 65536


def test_depth_absorbs_guest_stalls_shorter_than_the_queue() -> None:
    # Four requests in flight, each followed by 100 ms of guest time (longer than a request's 31 ms and
    # than the bucket's tenth of a second): the other three keep the device busy, the rate holds.
    group, timers = make_group(bps_total=2 << 20)
    guest = SlowGuest(group.register("a"), timers, size=65536, round_trip=100_000_000, depth=4)
    guest.start()
    timers.advance(20 * NS)
    assert abs(guest.bytes_between(2, 18) - 16 * (2 << 20)) <= 2 * 65536


def test_a_request_between_timer_ticks_goes_when_the_bucket_allows() -> None:
    # No request waits: one that arrives once the bucket has leaked below its size starts at once, not at
    # some later tick.
    group, timers = make_group(bps_total=1_000_000)
    member = group.register("a")
    assert member.admit(True, 300_000, None).granted
    timers.advance(150_000_000)        # level 150000: still above the 100000 size
    early = member.admit(True, 4096, None)
    assert not early.granted and timers.next_deadline == 200_000_001
    timers.advance(60_000_000)
    assert early.granted
    timers.advance(200_000_000)        # idle: 104096 leaked 200000 -> empty
    assert member.admit(True, 4096, None).granted and timers.next_deadline is None


def test_unlimited_group_never_queues() -> None:
    group, timers = make_group()
    ticket = group.register("a").admit(True, 1 << 30, None)
    assert ticket.granted and timers.next_deadline is None


def test_iops_limit_and_iops_size() -> None:
    group, timers = make_group(iops_total=100)
    client = Client(group.register("a"), timers, size=4096)
    client.start()
    timers.advance(10 * NS)
    assert abs(len(client.granted) - 1000) <= 12  # 10 s at 100/s, plus a tenth of a second's worth

    group, timers = make_group(iops_total=100, iops_size=4096)
    client = Client(group.register("a"), timers, size=16384)  # each request counts as 4 operations
    client.start()
    timers.advance(10 * NS)
    assert abs(len(client.granted) - 250) <= 5


def test_read_and_write_buckets_are_separate() -> None:
    group, timers = make_group(bps_read=1_000_000, bps_write=250_000)
    member = group.register("a")
    reader = Client(member, timers, size=4096, write=False)
    writer = Client(member, timers, size=4096, write=True)
    reader.start()
    writer.start()
    timers.advance(10 * NS)
    assert abs(reader.bytes_between(2, 10) - 8_000_000) <= 3 * 4096
    assert abs(writer.bytes_between(2, 10) - 2_000_000) <= 3 * 4096


def test_total_bucket_counts_both_directions() -> None:
    group, timers = make_group(bps_total=1_000_000)
    member = group.register("a")
    reader, writer = Client(member, timers, size=4096, write=False), Client(member, timers, size=4096)
    reader.start()
    writer.start()
    timers.advance(10 * NS)
    both = reader.bytes_between(2, 10) + writer.bytes_between(2, 10)
    assert abs(both - 8_000_000) <= 3 * 4096


def test_burst_allows_a_peak_then_the_average() -> None:
    # 1 MB/s on average, peaks of 4 MB/s for up to 2 s: the first 2 s run at the peak, then the average.
    group, timers = make_group(bps_total=1_000_000, bps_total_max=4_000_000, bps_total_max_length=2)
    client = Client(group.register("a"), timers, size=65536)
    client.start()
    timers.advance(12 * NS)
    peak = client.bytes_between(0, 1)
    assert 3_900_000 <= peak <= 4_000_000 + 400_000 + 2 * 65536  # the peak rate, not more
    assert client.bytes_between(4, 12) == pytest.approx(8_000_000, abs=2 * 65536)
    # bucket of max * length = 8 MB: by the time it is full the client got 8 MB more than the average
    assert client.bytes_between(0, 4) == pytest.approx(4 * 1_000_000 + 8_000_000 * 0.75, rel=0.25)


def test_burst_refills_after_idle() -> None:
    group, timers = make_group(bps_total=1_000_000, bps_total_max=4_000_000, bps_total_max_length=2)
    member = group.register("a")
    client = Client(member, timers, size=65536)
    client.start()
    timers.advance(10 * NS)
    client.stopped = True
    timers.advance(20 * NS)  # idle: the buckets drain
    client.stopped = False
    client.granted.clear()
    client.start()
    timers.advance(1 * NS)
    assert client.bytes_between(30, 31) >= 3_900_000


def test_group_splits_one_limit_between_members_in_turns() -> None:
    group, timers = make_group(bps_total=2_000_000)
    a = Client(group.register("a"), timers, size=65536)
    b = Client(group.register("b"), timers, size=65536)
    a.start()
    b.start()
    timers.advance(20 * NS)
    share_a, share_b = a.bytes_between(2, 20), b.bytes_between(2, 20)
    assert share_a + share_b == pytest.approx(36_000_000, abs=3 * 65536)
    assert abs(share_a - share_b) <= 2 * 65536


def test_busy_member_cannot_starve_a_small_one() -> None:
    # a issues 1 MiB requests, b 4 KiB ones: turns are per request, so b is never held behind a's queue
    group, timers = make_group(bps_total=1_000_000)
    a = Client(group.register("a"), timers, size=1 << 20)
    b = Client(group.register("b"), timers, size=4096)
    a.start()
    b.start()
    timers.advance(20 * NS)
    assert abs(len(b.granted) - len(a.granted)) <= 2 and len(b.granted) >= 10  # one request each per turn


def test_new_limits_apply_to_waiting_requests() -> None:
    group, timers = make_group(bps_total=1000)
    member = group.register("a")
    assert member.admit(True, 100_000, None).granted
    woken: list[int] = []
    ticket = member.admit(True, 512, lambda: woken.append(timers.now))
    assert not ticket.granted and timers.next_deadline is not None and timers.next_deadline > 60 * NS
    group.configure(ThrottleConfig())  # limits removed: it goes at once
    assert ticket.granted and woken == [0]


def test_cancel_and_unregister_release_waiters() -> None:
    group, timers = make_group(bps_total=1000)
    a, b = group.register("a"), group.register("b")
    assert a.admit(True, 100_000, None).granted
    held = a.admit(True, 512, None)
    other = b.admit(True, 512, None)
    a.cancel(held)
    assert held.cancelled and not held.granted
    group.unregister(b)
    assert other.granted
    assert group.members == [a]


@pytest.mark.parametrize("limits, message", [
    ({"bps-total": 1, "bps-read": 1}, "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-size": 512}, "iops size requires an iops value to be set"),
    ({"bps-total": 10**15 + 1}, "bps/iops/max values must be within [0, 1000000000000000]"),
    ({"bps-total": 1, "bps-total-max": 2, "bps-total-max-length": 0}, "the burst length cannot be 0"),
    ({"bps-total": 1, "bps-total-max-length": 2}, "burst length set without burst rate"),
    ({"bps-total": 1, "bps-total-max": 10**15, "bps-total-max-length": 2}, "burst length too high for this burst rate"),
    ({"iops-read-max": 5}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"iops-write": 10, "iops-write-max": 5}, "bps_max/iops_max cannot be lower than bps/iops"),
    ({"bps-bogus": 1}, "Invalid parameter 'bps-bogus'"),
])
def test_qemu_validity_messages(limits: dict[str, int], message: str) -> None:
    with pytest.raises(ThrottleError) as caught:
        check_limits(limits)
    assert str(caught.value) == message
