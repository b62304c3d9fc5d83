"""8254 PIT on a fake clock: modes 0-5, access modes, latch and read-back, BCD, IRQ0 edges, port 0x61."""

from __future__ import annotations

import dataclasses

import pytest

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import StateError
from pyemu.hw.intc.pic import PicPair
from pyemu.hw.timer.pit import PIT_HZ, Pit
from pyemu.system.bus import pio_bus
from pyemu.system.timers import TimerQueue
from pyemu.testing.clock import FakeClock

NS_PER_S = 1_000_000_000


def tick_ns(ticks: int) -> int:
    """Virtual time at which ``ticks`` PIT clocks have elapsed since 0."""
    return -(-ticks * NS_PER_S // PIT_HZ)


class EdgeCounter:
    """An IRQ0 listener recording the time of every rising edge."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.level = 0
        self.rises: list[int] = []

    def __call__(self, level: int) -> None:
        if level and not self.level:
            self.rises.append(self.clock.ns)
        self.level = level


class Rig:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.queue = TimerQueue(clock=self.clock)
        self.edges = EdgeCounter(self.clock)
        self.pit = Pit(self.queue, IrqLine(self.edges, "irq0"))
        self.bus = pio_bus()
        self.bus.register(0x40, 4, self.pit)
        self.bus.register(0x61, 1, self.pit.speaker)

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, 1, value)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def advance(self, until: int) -> None:
        while (deadline := self.queue.next_deadline()) is not None and deadline <= until:
            self.clock.ns = max(self.clock.ns, deadline)
            self.queue.run_due()
        self.clock.ns = until

    def read_word(self, port: int) -> int:
        low = self.inb(port)
        return low | (self.inb(port) << 8)


LATCH_HZ100 = (PIT_HZ + 50) // 100  # Linux's LATCH for HZ=100: 11932


def test_mode2_rate_generator_gives_one_irq_edge_per_period() -> None:
    rig = Rig()
    rig.outb(0x43, 0x34)  # channel 0, LSB then MSB, mode 2, binary (Linux's periodic PIT)
    rig.outb(0x40, LATCH_HZ100 & 0xFF)
    rig.outb(0x40, LATCH_HZ100 >> 8)
    rig.edges.rises.clear()  # the control word itself raised OUT
    rig.advance(tick_ns(10 * LATCH_HZ100))
    assert rig.edges.rises == [tick_ns(k * LATCH_HZ100) for k in range(1, 11)]
    # OUT is low for exactly one clock before each reload.
    assert rig.pit.out(0) == 1
    rig.advance(tick_ns(11 * LATCH_HZ100 - 1))
    assert rig.pit.out(0) == 0


def test_mode2_count_decreases_with_virtual_time() -> None:
    rig = Rig()
    rig.outb(0x43, 0x34)
    rig.outb(0x40, 0x00)
    rig.outb(0x40, 0x10)  # 4096
    rig.advance(tick_ns(1000))
    rig.outb(0x43, 0x00)  # latch channel 0
    assert rig.read_word(0x40) == 4096 - 1000
    rig.advance(tick_ns(4096 + 96))
    assert rig.pit.count(0) == 4096 - 96  # reloaded


def test_mode3_square_wave_period_and_duty() -> None:
    rig = Rig()
    rig.outb(0x43, 0x36)  # channel 0, mode 3
    rig.outb(0x40, 1000 & 0xFF)
    rig.outb(0x40, 1000 >> 8)
    rig.edges.rises.clear()
    rig.advance(tick_ns(499))
    assert rig.pit.out(0) == 1
    rig.advance(tick_ns(500))
    assert rig.pit.out(0) == 0
    rig.advance(tick_ns(5000))
    assert rig.edges.rises == [tick_ns(k * 1000) for k in range(1, 6)]
    rig.advance(tick_ns(5100))
    assert rig.pit.count(0) == 1000 - 200  # decrements by two


def test_mode0_interrupt_on_terminal_count_once() -> None:
    rig = Rig()
    rig.outb(0x43, 0x30)  # mode 0
    assert rig.pit.out(0) == 0  # OUT low after the control word
    rig.outb(0x40, 100)
    rig.outb(0x40, 0)
    rig.edges.rises.clear()  # the reset state (mode 3) had OUT high
    rig.advance(tick_ns(100) - 1)
    assert rig.edges.rises == []
    rig.advance(tick_ns(100))
    assert rig.edges.rises == [tick_ns(100)]
    rig.advance(tick_ns(70000))
    assert len(rig.edges.rises) == 1  # one-shot; the count wraps and keeps going
    assert rig.pit.count(0) == (100 - 70000) % 0x10000


def test_mode4_strobe_is_low_for_one_clock() -> None:
    rig = Rig()
    rig.outb(0x43, 0x38)  # mode 4
    rig.outb(0x40, 50)
    rig.outb(0x40, 0)
    rig.edges.rises.clear()
    rig.advance(tick_ns(49))
    assert rig.pit.out(0) == 1
    rig.advance(tick_ns(50))
    assert rig.pit.out(0) == 0
    rig.advance(tick_ns(51))
    assert rig.pit.out(0) == 1
    assert rig.edges.rises == [tick_ns(51)]


def test_latch_holds_value_while_counting_continues() -> None:
    rig = Rig()
    rig.outb(0x43, 0x34)
    rig.outb(0x40, 0xFF)
    rig.outb(0x40, 0xFF)
    rig.advance(tick_ns(0x100))
    rig.outb(0x43, 0x00)
    rig.advance(tick_ns(0x300))
    rig.outb(0x43, 0x00)  # a second latch before reading is ignored
    assert rig.read_word(0x40) == 0xFFFF - 0x100
    assert rig.read_word(0x40) == 0xFFFF - 0x300  # live again


def test_lsb_only_and_msb_only_access_modes() -> None:
    rig = Rig()
    rig.outb(0x43, 0x54)  # channel 1, LSB only, mode 2
    rig.outb(0x41, 200)
    rig.advance(tick_ns(50))
    assert rig.inb(0x41) == 150
    rig.outb(0x43, 0x64)  # channel 1, MSB only, mode 2
    rig.outb(0x41, 0x02)  # count 0x200
    rig.advance(tick_ns(50 + 0x100))
    assert rig.inb(0x41) == 0x01


def test_read_back_status_and_count() -> None:
    rig = Rig()
    rig.outb(0x43, 0xB6)  # channel 2, word, mode 3
    rig.outb(0x43, 0xE8)  # read-back status of channel 2 (count bit set = no count latch)
    assert rig.inb(0x42) == 0x40 | 0x30 | 0x06 | 0x80  # null count, word, mode 3, OUT high
    rig.outb(0x61, 0x01)  # gate on
    rig.outb(0x42, 0x00)
    rig.outb(0x42, 0x01)  # 256
    rig.advance(tick_ns(10))
    rig.outb(0x43, 0xC8)  # latch status and count of channel 2
    assert rig.inb(0x42) == 0x80 | 0x30 | 0x06  # status first: count loaded
    assert rig.read_word(0x42) == 256 - 20


def test_bcd_counting() -> None:
    rig = Rig()
    rig.outb(0x43, 0x35)  # mode 2, BCD
    rig.outb(0x40, 0x00)
    rig.outb(0x40, 0x10)  # BCD 1000
    rig.advance(tick_ns(1))
    assert rig.read_word(0x40) == 0x0999
    rig.advance(tick_ns(1000 + 250))
    assert rig.read_word(0x40) == 0x0750
    rig.edges.rises.clear()
    rig.advance(tick_ns(3000))
    assert rig.edges.rises == [tick_ns(2000), tick_ns(3000)]


def test_channel2_via_port61_like_linux_pit_calibration() -> None:
    rig = Rig()
    assert rig.inb(0x61) & 0x20 == 0x20  # gate off, mode unprogrammed: OUT high (not mode 0)
    rig.outb(0x61, (rig.inb(0x61) & ~0x02) | 0x01)  # gate high, speaker off
    rig.outb(0x43, 0xB0)  # channel 2, word, mode 0
    assert rig.inb(0x61) & 0x20 == 0
    latch = PIT_HZ // 20  # 50 ms, as pit_calibrate_tsc
    rig.clock.ns = 1_000_000
    rig.outb(0x42, latch & 0xFF)
    rig.outb(0x42, latch >> 8)
    rig.advance(1_000_000 + tick_ns(latch) - 1)
    assert rig.inb(0x61) & 0x20 == 0
    rig.advance(1_000_000 + tick_ns(latch) + 1)
    assert rig.inb(0x61) & 0x20 == 0x20
    assert rig.inb(0x61) & 0x03 == 0x01


def test_channel2_gate_pauses_mode0_and_triggers_mode1() -> None:
    rig = Rig()
    rig.outb(0x43, 0xB0)
    rig.outb(0x42, 100)
    rig.outb(0x42, 0)  # gate still low: not counting
    rig.advance(tick_ns(500))
    assert rig.pit.count(2) == 100
    rig.outb(0x61, 0x01)
    rig.advance(tick_ns(540))
    rig.outb(0x61, 0x00)  # pause at 60
    assert rig.pit.count(2) == 60
    rig.advance(tick_ns(900))
    assert rig.pit.count(2) == 60
    rig.outb(0x43, 0xB2)  # mode 1: hardware-retriggerable one-shot
    rig.outb(0x42, 100)
    rig.outb(0x42, 0)
    rig.advance(tick_ns(1000))
    assert rig.pit.out(2) == 1 and rig.pit.count(2) == 100  # waits for the gate
    rig.outb(0x61, 0x01)  # trigger
    assert rig.pit.out(2) == 0
    rig.advance(tick_ns(1000) + tick_ns(99))
    assert rig.pit.out(2) == 0
    rig.advance(tick_ns(1000) + tick_ns(100))
    assert rig.pit.out(2) == 1


def test_reset_state_is_mode3_at_18hz() -> None:
    rig = Rig()
    rig.outb(0x43, 0xE2)  # read-back status of channel 0
    assert rig.inb(0x40) == 0x80 | 0x30 | 0x06
    rig.advance(tick_ns(3 * 0x10000))
    assert rig.edges.rises == [0, tick_ns(0x10000), tick_ns(2 * 0x10000), tick_ns(3 * 0x10000)]


def test_port61_refresh_bit_toggles_and_nmi_bits_stored() -> None:
    rig = Rig()
    rig.outb(0x61, 0x0C)
    assert rig.inb(0x61) & 0x0F == 0x0C
    first = rig.inb(0x61) & 0x10
    rig.advance(15_085)
    assert rig.inb(0x61) & 0x10 != first


def test_count_zero_means_65536_and_pulses_through_pic() -> None:
    rig = Rig()
    pic = PicPair()
    rig.pit.irq0 = pic.pin(0)
    pic.master.write(0, 1, 0x11)
    pic.master.write(1, 1, 0x20)
    pic.master.write(1, 1, 0x04)
    pic.master.write(1, 1, 0x01)
    rig.outb(0x43, 0x34)
    rig.outb(0x40, 0)
    rig.outb(0x40, 0)
    assert pic.acknowledge_interrupt() == 0x20  # OUT rose at the control word
    pic.master.write(0, 1, 0x20)
    rig.advance(tick_ns(0x10000) - 1)
    assert not pic.interrupt_pending()
    rig.advance(tick_ns(0x10000))
    assert pic.acknowledge_interrupt() == 0x20


def test_late_timer_thread_does_not_replay_every_missed_edge() -> None:
    rig = Rig()
    rig.outb(0x43, 0x34)
    rig.outb(0x40, 100)
    rig.outb(0x40, 0)
    rig.edges.rises.clear()
    rig.clock.ns = tick_ns(100 * 1000)  # the host stalled for 1000 periods
    rig.queue.run_due()
    rig.queue.run_due()
    assert 1 <= len(rig.edges.rises) <= 8


def test_state_round_trip_keeps_counting_and_irq_schedule() -> None:
    rig = Rig()
    rig.outb(0x43, 0x34)
    rig.outb(0x40, 0xE8)
    rig.outb(0x40, 0x03)  # 1000
    rig.advance(tick_ns(2500))
    saved = rig.pit.state()
    rig.pit.reset()
    rig.pit.from_state(saved)
    assert rig.pit.count(0) == 500
    rig.edges.rises.clear()
    rig.advance(tick_ns(4000))
    assert rig.edges.rises == [tick_ns(3000), tick_ns(4000)]
    with pytest.raises(StateError):
        rig.pit.from_state(dataclasses.replace(saved, channels=saved.channels[:2]))


def test_random_guest_accesses_never_raise_nor_storm() -> None:
    import random

    rnd = random.Random(7)
    rig = Rig()
    for _ in range(3000):
        port = rnd.choice((0x40, 0x41, 0x42, 0x43, 0x61))
        if rnd.random() < 0.6:
            rig.outb(port, rnd.getrandbits(8))
        else:
            assert 0 <= rig.inb(port) <= 0xFF
        if rnd.random() < 0.05:
            before = rig.clock.ns
            rig.clock.ns += rnd.choice((1_000, 100_000, 10_000_000))
            # a bounded number of callbacks per step, even for count 1-2 programming
            ran = rig.queue.run_due()
            assert ran <= 2 + 2 * (rig.clock.ns - before) // 20_000 + 8
