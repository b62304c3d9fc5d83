"""MC146818 RTC/CMOS on a fake clock: time formats, registers A-D, interrupts, setting the time, CMOS RAM."""

from __future__ import annotations

import calendar

import pytest

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.timer.cmos import pc_cmos_memory_layout
from pyemu.hw.core.state import StateError
from pyemu.hw.timer.errors import CmosContentsError
from pyemu.hw.timer.rtc import Rtc, periodic_cycles
from pyemu.system.bus import pio_bus
from pyemu.system.timers import TimerQueue
from pyemu.testing.clock import FakeClock

NS_PER_S = 1_000_000_000
# Thursday 2024-02-29 13:45:56.250 UTC
HOST_TIME_NS = calendar.timegm((2024, 2, 29, 13, 45, 56, 0, 0, 0)) * NS_PER_S + 250_000_000


class Rig:
    def __init__(self, cmos: dict[int, int] | None = None) -> None:
        self.clock = FakeClock()
        self.queue = TimerQueue(clock=self.clock)
        self.rises: list[int] = []
        self.irq = IrqLine(self._irq, "irq8")
        self.rtc = Rtc(self.queue, self.irq, cmos=cmos, host_time_ns=lambda: HOST_TIME_NS)
        self.bus = pio_bus()
        self.bus.register(0x70, 2, self.rtc)

    def _irq(self, level: int) -> None:
        if level:
            self.rises.append(self.clock.ns)

    def cmos_read(self, index: int) -> int:
        self.bus.write(0x70, 1, index)
        return self.bus.read(0x71, 1)

    def cmos_write(self, index: int, value: int) -> None:
        self.bus.write(0x70, 1, index)
        self.bus.write(0x71, 1, value)

    def advance(self, until: int) -> None:
        while (deadline := self.queue.next_deadline()) is not None and deadline <= until:
            self.clock.ns = max(self.clock.ns, deadline)
            self.queue.run_due()
        self.clock.ns = until

    def time_regs(self) -> tuple[int, ...]:
        return tuple(self.cmos_read(i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32))


def test_reset_registers() -> None:
    rig = Rig()
    assert rig.cmos_read(0x0A) == 0x26
    assert rig.cmos_read(0x0B) == 0x02
    assert rig.cmos_read(0x0C) == 0x00
    assert rig.cmos_read(0x0D) == 0x80


def test_bcd_time_of_day_from_host_clock() -> None:
    rig = Rig()
    # seconds, minutes, hours, day of week (Thursday = 5), day, month, year, century
    assert rig.time_regs() == (0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20)


def test_binary_mode_and_12_hour_mode() -> None:
    rig = Rig()
    rig.cmos_write(0x0B, 0x06)  # binary, 24 h
    assert rig.time_regs() == (56, 45, 13, 5, 29, 2, 24, 20)
    rig.cmos_write(0x0B, 0x04)  # binary, 12 h
    assert rig.cmos_read(0x04) == 0x80 | 1  # 1 PM
    rig.cmos_write(0x0B, 0x00)  # BCD, 12 h
    assert rig.cmos_read(0x04) == 0x81


def test_clock_advances_with_virtual_time() -> None:
    rig = Rig()
    rig.advance(3 * NS_PER_S + 800_000_000)  # 56.25 + 3.8 = 60.05 s
    assert rig.cmos_read(0x00) == 0x00
    assert rig.cmos_read(0x02) == 0x46


def test_index_bit7_is_nmi_disable_not_index() -> None:
    rig = Rig()
    rig.bus.write(0x70, 1, 0x80 | 0x0A)
    assert rig.bus.read(0x71, 1) == 0x26
    assert rig.rtc.nmi_disabled
    rig.bus.write(0x70, 1, 0x0A)
    assert not rig.rtc.nmi_disabled


def test_uip_is_set_just_before_each_update() -> None:
    rig = Rig()
    rig.advance(750_000_000 - 244_000 - 1)  # 56.999756 s - 1 ns
    assert not rig.cmos_read(0x0A) & 0x80
    rig.advance(750_000_000 - 244_000)
    assert rig.cmos_read(0x0A) & 0x80
    rig.advance(750_000_000)
    assert not rig.cmos_read(0x0A) & 0x80
    assert rig.cmos_read(0x00) == 0x57


def test_register_c_flags_cleared_on_read_and_lower_irq() -> None:
    rig = Rig()
    rig.cmos_write(0x0B, 0x02 | 0x10)  # UIE
    rig.advance(750_000_000)  # next second boundary
    assert rig.rises == [750_000_000]
    assert rig.irq.level == 1
    assert rig.cmos_read(0x0C) == 0x80 | 0x40 | 0x10  # IRQF | UF, and PF (set at 1024 Hz even without PIE)
    assert rig.irq.level == 0
    assert rig.cmos_read(0x0C) == 0x00


def test_flags_latch_without_enables_and_no_irq() -> None:
    rig = Rig()
    rig.cmos_read(0x0C)
    rig.advance(2 * NS_PER_S)
    assert rig.cmos_read(0x0C) == 0x40 | 0x10  # PF and UF set, IRQF clear: sources disabled
    assert rig.rises == []


@pytest.mark.parametrize("rate, hz", [(0x6, 1024), (0x3, 8192), (0xF, 2), (0x1, 256)])
def test_periodic_interrupt_rate(rate: int, hz: int) -> None:
    rig = Rig()
    assert periodic_cycles(rate) * hz == 32768
    rig.cmos_write(0x0A, 0x20 | rate)
    rig.cmos_write(0x0B, 0x02 | 0x40)  # PIE
    rig.rises.clear()
    window_ns = NS_PER_S  # one second: exactly hz interrupts when the driver reads C each time

    count = 0
    while rig.clock.ns < window_ns:
        deadline = rig.queue.next_deadline()
        assert deadline is not None
        if deadline > window_ns:
            break
        rig.advance(deadline)
        assert rig.cmos_read(0x0C) & 0xC0 == 0xC0  # IRQF | PF
        count += 1
    assert count == hz
    gaps = {b - a for a, b in zip(rig.rises, rig.rises[1:])}
    period_ns = NS_PER_S / hz
    assert all(abs(gap - period_ns) <= 1 for gap in gaps)


def test_periodic_irq_stays_high_until_c_is_read() -> None:
    rig = Rig()
    rig.cmos_write(0x0B, 0x02 | 0x40)  # PIE at the reset rate (1024 Hz)
    rig.advance(10_000_000)
    assert rig.rises and len(rig.rises) == 1  # one rise; the line stays high until C is read
    rig.cmos_read(0x0C)
    rig.advance(11_000_000)
    assert len(rig.rises) == 2


def test_enabling_pie_with_pf_set_raises_at_once() -> None:
    rig = Rig()
    rig.advance(5_000_000)
    rig.cmos_write(0x0B, 0x02 | 0x40)
    assert rig.irq.level == 1 and rig.rises == [5_000_000]


def test_alarm_interrupt_and_dont_care_fields() -> None:
    rig = Rig()
    rig.cmos_write(0x01, 0x59)  # 13:45:59
    rig.cmos_write(0x03, 0x45)
    rig.cmos_write(0x05, 0x13)
    rig.cmos_write(0x0B, 0x02 | 0x20)  # AIE
    rig.advance(3 * NS_PER_S)
    assert rig.rises == [2 * NS_PER_S + 750_000_000]
    assert rig.cmos_read(0x0C) & 0xA0 == 0xA0  # IRQF | AF
    rig.cmos_write(0x01, 0x30)
    rig.cmos_write(0x03, 0xC0)  # every minute at :30
    rig.cmos_write(0x05, 0xC0)
    rig.advance(40 * NS_PER_S)
    assert len(rig.rises) == 2
    rig.cmos_read(0x0C)
    rig.advance(95 * NS_PER_S)
    assert len(rig.rises) == 3


def test_set_bit_freezes_and_written_time_sticks_as_offset() -> None:
    rig = Rig()
    rig.cmos_write(0x0B, 0x82)  # SET, 24 h BCD
    for index, value in ((0x00, 0x30), (0x02, 0x15), (0x04, 0x08), (0x07, 0x01), (0x08, 0x01), (0x09, 0x99),
                         (0x32, 0x19)):
        rig.cmos_write(index, value)
    rig.advance(5 * NS_PER_S)
    assert rig.cmos_read(0x00) == 0x30  # frozen while SET
    rig.cmos_write(0x0B, 0x02)
    assert rig.time_regs()[:3] == (0x30, 0x15, 0x08)
    assert rig.cmos_read(0x09) == 0x99 and rig.cmos_read(0x32) == 0x19
    assert rig.cmos_read(0x06) == 0x06  # 1999-01-01 was a Friday
    rig.advance(65 * NS_PER_S)
    assert rig.time_regs()[:3] == (0x30, 0x16, 0x08)
    expected = calendar.timegm((1999, 1, 1, 8, 16, 30, 0, 0, 0))
    assert rig.rtc.guest_time_ns() // NS_PER_S == expected


def test_invalid_written_time_is_ignored() -> None:
    rig = Rig()
    rig.cmos_write(0x0B, 0x82)
    rig.cmos_write(0x08, 0x13)  # month 13
    rig.cmos_write(0x0B, 0x02)
    assert rig.cmos_read(0x08) == 0x02  # clock unchanged


def test_setting_set_clears_uie() -> None:
    rig = Rig()
    rig.cmos_write(0x0B, 0x80 | 0x10 | 0x02)
    assert rig.cmos_read(0x0B) == 0x82


def test_cmos_ram_and_board_contents() -> None:
    layout = pc_cmos_memory_layout(512 * 1024 * 1024, 2 * 1024**3)
    rig = Rig(cmos=layout)
    assert rig.cmos_read(0x34) | rig.cmos_read(0x35) << 8 == (512 - 16) * 16  # 64 KiB units above 16 MiB
    assert rig.cmos_read(0x5B) | rig.cmos_read(0x5C) << 8 | rig.cmos_read(0x5D) << 16 == 2 * 1024 * 16
    assert rig.cmos_read(0x15) | rig.cmos_read(0x16) << 8 == 640
    assert rig.cmos_read(0x17) | rig.cmos_read(0x18) << 8 == 0xFFFF  # capped
    rig.cmos_write(0x40, 0xA5)
    rig.cmos_write(0x7F, 0x5A)
    assert rig.cmos_read(0x40) == 0xA5 and rig.cmos_read(0x7F) == 0x5A
    rig.cmos_write(0x0D, 0x00)  # read-only
    rig.cmos_write(0x0C, 0xFF)
    assert rig.cmos_read(0x0D) == 0x80 and rig.cmos_read(0x0C) == 0
    rig.rtc.reset()
    assert rig.cmos_read(0x40) == 0 and rig.cmos_read(0x34) == layout[0x34]


def test_bad_cmos_contents_raise() -> None:
    with pytest.raises(CmosContentsError):
        Rig(cmos={0x0A: 1})
    with pytest.raises(CmosContentsError):
        Rig(cmos={0x40: 256})


def test_state_round_trip() -> None:
    rig = Rig()
    rig.cmos_write(0x50, 0x77)
    rig.cmos_write(0x0B, 0x02 | 0x10)
    rig.advance(NS_PER_S)
    saved = rig.rtc.state()
    rig.rtc.reset()
    rig.rtc.from_state(saved)
    assert rig.cmos_read(0x50) == 0x77
    assert rig.irq.level == 1
    assert rig.cmos_read(0x0C) == 0xD0  # IRQF | PF | UF
    rig.advance(2 * NS_PER_S)
    assert rig.cmos_read(0x0C) & 0x90 == 0x90  # the update timer was re-armed
    with pytest.raises(StateError):
        rig.rtc.from_state(type(saved)(**{**saved.__dict__, "cmos": b"\0" * 64}))


def test_random_guest_accesses_never_raise() -> None:
    import random

    rnd = random.Random(5)
    rig = Rig()
    for _ in range(3000):
        if rnd.random() < 0.6:
            rig.cmos_write(rnd.getrandbits(8), rnd.getrandbits(8))
        else:
            assert 0 <= rig.cmos_read(rnd.getrandbits(8)) <= 0xFF
        if rnd.random() < 0.05:
            rig.advance(rig.clock.ns + rnd.choice((1_000, 1_000_000, NS_PER_S)))
