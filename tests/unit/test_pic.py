"""8259A pair: Linux's init sequence, priorities, cascade, EOIs, ELCR, AEOI, poll, spurious IRQs."""

from __future__ import annotations

import pytest

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.intc.errors import InvalidPinError
from pyemu.hw.intc.lapic import REG_LVT_LINT0, REG_SVR, LocalApic
from pyemu.hw.intc.pic import PicPair
from pyemu.system.bus import pio_bus
from pyemu.system.timers import TimerQueue


class Board:
    """The pair on a real PIO bus at the PC addresses."""

    def __init__(self) -> None:
        self.kicks = 0
        self.intr_levels: list[int] = []
        self.pic = PicPair(int_output=IrqLine(self.intr_levels.append), kick=self._kick)
        self.bus = pio_bus()
        self.bus.register(0x20, 2, self.pic.master)
        self.bus.register(0xA0, 2, self.pic.slave)
        self.bus.register(0x4D0, 2, self.pic.elcr)

    def _kick(self) -> None:
        self.kicks += 1

    def outb(self, port: int, value: int) -> None:
        self.bus.write(port, 1, value)

    def inb(self, port: int) -> int:
        return self.bus.read(port, 1)

    def init_like_linux(self, auto_eoi: bool = False) -> None:
        """arch/x86/kernel/i8259.c init_8259A, then unmask the cascade like Linux does."""
        self.outb(0x21, 0xFF)
        self.outb(0xA1, 0xFF)
        self.outb(0x20, 0x11)  # ICW1: edge, cascade, ICW4 needed
        self.outb(0x21, 0x30)  # ICW2: IRQ0-7 -> vectors 0x30-0x37
        self.outb(0x21, 0x04)  # ICW3: slave on IR2
        self.outb(0x21, 0x03 if auto_eoi else 0x01)  # ICW4: 8086 mode (+AEOI)
        self.outb(0xA0, 0x11)
        self.outb(0xA1, 0x38)  # IRQ8-15 -> 0x38-0x3f
        self.outb(0xA1, 0x02)  # slave ID 2
        self.outb(0xA1, 0x01)
        self.outb(0x21, 0xFB)  # everything masked but the cascade
        self.outb(0xA1, 0xFF)

    def read_isr(self, cmd_port: int) -> int:
        self.outb(cmd_port, 0x0B)
        value = self.inb(cmd_port)
        self.outb(cmd_port, 0x0A)
        return value


def test_linux_probe_reads_back_mask() -> None:
    board = Board()
    board.outb(0x21, 0xFF)
    assert board.inb(0x21) == 0xFF
    board.outb(0x21, 0xA5)
    assert board.inb(0x21) == 0xA5


def test_init_sequence_programs_vector_bases_and_masks() -> None:
    board = Board()
    board.init_like_linux()
    assert board.pic.master.irq_base == 0x30 and board.pic.slave.irq_base == 0x38
    assert board.inb(0x21) == 0xFB and board.inb(0xA1) == 0xFF
    board.pic.pin(1).raise_irq()
    assert not board.pic.interrupt_pending()  # masked
    assert board.inb(0x20) == 0x02  # but requested (IRR read by default)
    board.outb(0x21, 0xF9)  # unmask IRQ1
    assert board.pic.interrupt_pending()
    assert board.intr_levels[-1] == 1 and board.kicks == 1
    assert board.pic.acknowledge_interrupt() == 0x31
    assert board.intr_levels[-1] == 0


def test_ack_keeps_isr_until_eoi() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x21, 0x00)
    board.pic.pin(3).pulse()
    assert board.pic.acknowledge_interrupt() == 0x33
    assert board.read_isr(0x20) == 0x08  # Linux's spurious check reads this
    assert board.inb(0x20) == 0x00  # IRR cleared by INTA
    board.outb(0x20, 0x63)  # specific EOI for IR3
    assert board.read_isr(0x20) == 0


def test_priority_order_and_nesting() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x21, 0x00)
    board.pic.pin(5).pulse()
    board.pic.pin(3).pulse()
    assert board.pic.acknowledge_interrupt() == 0x33  # lower IR number wins
    assert not board.pic.interrupt_pending()  # IR5 waits while IR3 is in service
    board.pic.pin(1).pulse()
    assert board.pic.acknowledge_interrupt() == 0x31  # higher priority nests
    board.outb(0x20, 0x20)  # non-specific EOI ends the highest in service (IR1)
    assert board.read_isr(0x20) == 0x08
    board.outb(0x20, 0x20)
    assert board.pic.acknowledge_interrupt() == 0x35


def test_cascade_delivers_slave_vector_and_needs_both_eois() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0xA1, 0xFB)  # unmask IRQ10
    board.pic.pin(10).pulse()
    assert board.pic.interrupt_pending()
    assert board.pic.acknowledge_interrupt() == 0x3A
    assert board.read_isr(0x20) == 0x04 and board.read_isr(0xA0) == 0x04
    board.pic.pin(9).pulse()
    board.outb(0xA1, 0xF9)  # unmask IRQ9 too
    assert not board.pic.interrupt_pending()  # master IR2 still in service
    board.outb(0xA0, 0x62)  # Linux: specific EOI to the slave, then for IR2 on the master
    board.outb(0x20, 0x62)
    assert board.pic.acknowledge_interrupt() == 0x39


def test_spurious_irq7_does_not_set_isr() -> None:
    board = Board()
    board.init_like_linux()
    assert not board.pic.interrupt_pending()
    assert board.pic.acknowledge_interrupt() == 0x37
    assert board.read_isr(0x20) == 0


def test_spurious_irq15_when_slave_request_vanishes() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x4D1, 0x08)  # IRQ11 level-triggered
    board.outb(0xA1, 0xF7)
    line = board.pic.pin(11)
    line.raise_irq()
    assert board.pic.master.irr & 0x04  # the cascade input latched
    line.lower_irq()
    assert board.pic.acknowledge_interrupt() == 0x3F  # IR2 acknowledged, slave has nothing: IRQ15
    assert board.read_isr(0xA0) == 0


def test_elcr_level_triggered_irr_follows_line() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x4D0, 0xFF)
    assert board.inb(0x4D0) == 0xF8  # IRQ0-2 are always edge
    board.outb(0x4D1, 0xFF)
    assert board.inb(0x4D1) == 0xDE  # IRQ8 and IRQ13 too
    assert board.bus.read(0x4D0, 2) == 0xDEF8
    board.outb(0x21, 0x00)
    line = board.pic.pin(5)
    line.raise_irq()
    assert board.pic.acknowledge_interrupt() == 0x35
    board.outb(0x20, 0x65)
    assert board.pic.interrupt_pending()  # still high: requested again
    assert board.pic.acknowledge_interrupt() == 0x35
    line.lower_irq()
    board.outb(0x20, 0x65)
    assert not board.pic.interrupt_pending()


def test_edge_input_needs_a_new_rising_edge() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x21, 0x00)
    line = board.pic.pin(4)
    line.raise_irq()
    assert board.pic.acknowledge_interrupt() == 0x34
    board.outb(0x20, 0x20)
    line.raise_irq()  # held high: no new request
    assert not board.pic.interrupt_pending()
    line.lower_irq()
    line.raise_irq()
    assert board.pic.interrupt_pending()


def test_auto_eoi_leaves_isr_clear() -> None:
    board = Board()
    board.init_like_linux(auto_eoi=True)
    board.outb(0x21, 0x00)
    board.pic.pin(6).pulse()
    assert board.pic.acknowledge_interrupt() == 0x36
    assert board.read_isr(0x20) == 0
    board.pic.pin(7).pulse()
    assert board.pic.acknowledge_interrupt() == 0x37  # nothing blocks the next one


def test_poll_command() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x21, 0x00)
    board.outb(0x20, 0x0C)  # OCW3 poll
    assert board.inb(0x20) == 0x00  # nothing requested
    board.pic.pin(6).pulse()
    board.outb(0x20, 0x0C)
    assert board.inb(0x20) == 0x86
    assert board.read_isr(0x20) == 0x40


def test_rotate_on_non_specific_eoi_makes_serviced_irq_lowest() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x21, 0x00)
    board.pic.pin(1).pulse()
    assert board.pic.acknowledge_interrupt() == 0x31
    board.outb(0x20, 0xA0)  # rotate on non-specific EOI: IR1 becomes lowest, IR2 highest
    board.pic.pin(0).pulse()
    board.pic.pin(3).pulse()
    assert board.pic.acknowledge_interrupt() == 0x33  # IR3 now outranks IR0
    board.outb(0x20, 0xC7)  # set priority: IR7 lowest (back to the default order)
    board.outb(0x20, 0x63)
    board.pic.pin(3).pulse()
    assert board.pic.acknowledge_interrupt() == 0x30


def test_special_mask_mode_allows_lower_priority_while_in_service() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x21, 0x00)
    board.pic.pin(3).pulse()
    assert board.pic.acknowledge_interrupt() == 0x33
    board.outb(0x21, 0x08)  # mask IR3 (in service)
    board.outb(0x20, 0x68)  # OCW3: set special mask mode
    board.pic.pin(5).pulse()
    assert board.pic.acknowledge_interrupt() == 0x35


def test_pins_out_of_range_raise() -> None:
    with pytest.raises(InvalidPinError):
        Board().pic.pin(16)


def test_pic_reaches_cpu_through_lapic_lint0() -> None:
    board = Board()
    lapic_kicks = []
    queue = TimerQueue(clock=lambda: 0)
    lapic = LocalApic(queue, pic=board.pic, kick=lambda: lapic_kicks.append(1))
    board.pic.int_output = lapic.lint(0)
    board.init_like_linux()
    board.outb(0x21, 0xFA)  # unmask IRQ0
    board.pic.pin(0).pulse()
    assert lapic_kicks  # INTR on LINT0 woke the CPU
    assert lapic.interrupt_pending()
    assert lapic.acknowledge_interrupt() == 0x30
    assert board.read_isr(0x20) == 0x01
    board.outb(0x20, 0x60)
    lapic.write(REG_SVR, 4, 0x1FF)
    lapic.write(REG_LVT_LINT0, 4, 0x10700)  # Linux masks LINT0 once the IOAPIC routes IRQs
    board.pic.pin(0).pulse()
    assert not lapic.interrupt_pending()


def test_state_round_trip() -> None:
    board = Board()
    board.init_like_linux()
    board.outb(0x21, 0x00)
    board.pic.pin(4).pulse()
    board.pic.acknowledge_interrupt()
    board.pic.pin(6).pulse()
    other = PicPair()
    other.from_state(board.pic.state())
    assert other.master.isr == 0x10 and other.master.irr == 0x40
    assert other.master.irq_base == 0x30 and other.slave.irq_base == 0x38
    other.master.write(0, 1, 0x20)
    assert other.acknowledge_interrupt() == 0x36


def test_random_guest_accesses_never_raise() -> None:
    import random

    rnd = random.Random(99)
    board = Board()
    ports = (0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1)
    for _ in range(3000):
        port = rnd.choice(ports)
        if rnd.random() < 0.6:
            board.outb(port, rnd.getrandbits(8))
        else:
            assert 0 <= board.inb(port) <= 0xFF
        if rnd.random() < 0.1:
            board.pic.pin(rnd.randrange(16)).set_level(rnd.randrange(2))
        if rnd.random() < 0.05:
            assert 0 <= board.pic.acknowledge_interrupt() <= 0xFF
