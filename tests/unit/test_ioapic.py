"""IOAPIC: indirect registers, redirection entries, edge/level delivery, remote IRR and EOI, MSI encoding."""

from __future__ import annotations

import pytest

from pyemu.hw.core.state import StateError
from pyemu.hw.intc.errors import InvalidPinError, InvalidPropertyError
from pyemu.hw.intc.ioapic import IoApic
from pyemu.hw.intc.lapic import REG_EOI, REG_SVR, LocalApic
from pyemu.system.timers import TimerQueue


class RecordingSink:
    def __init__(self) -> None:
        self.messages: list[tuple[int, int]] = []

    def deliver_msi(self, address: int, data: int) -> None:
        self.messages.append((address, data))


def wr(io: IoApic, index: int, value: int) -> None:
    io.write(0x00, 4, index)
    io.write(0x10, 4, value)


def rd(io: IoApic, index: int) -> int:
    io.write(0x00, 4, index)
    return io.read(0x10, 4)


def program(io: IoApic, pin: int, low: int, dest: int = 0) -> None:
    wr(io, 0x11 + 2 * pin, dest << 24)
    wr(io, 0x10 + 2 * pin, low)


EDGE = 0
LEVEL = 1 << 15
MASKED = 1 << 16
REMOTE_IRR = 1 << 14


def test_identification_registers() -> None:
    io = IoApic(RecordingSink(), ioapic_id=2)
    assert rd(io, 0x00) == 2 << 24
    assert rd(io, 0x01) == 0x170020  # 24 pins (max entry 23), version 0x20
    assert rd(io, 0x02) == 2 << 24
    wr(io, 0x00, 5 << 24)
    assert rd(io, 0x00) == 5 << 24
    wr(io, 0x01, 0)  # read-only
    assert rd(io, 0x01) == 0x170020
    assert IoApic(RecordingSink(), version=0x11).version_register == 0x170011
    assert io.read(0x00, 4) == 0x01  # IOREGSEL reads back the last index


def test_reset_state_and_writable_bits() -> None:
    io = IoApic(RecordingSink())
    for pin in range(24):
        assert rd(io, 0x10 + 2 * pin) == MASKED
        assert rd(io, 0x11 + 2 * pin) == 0
    wr(io, 0x10, 0xFFFFFFFF)
    assert rd(io, 0x10) == 0x1AFFF  # delivery status and remote IRR are read-only
    wr(io, 0x11, 0xFFFFFFFF)
    assert rd(io, 0x11) == 0xFFFF0000
    assert rd(io, 0x10 + 2 * 24) == 0  # beyond the table: reads zero, no error


def test_bad_board_inputs_raise_typed_errors() -> None:
    io = IoApic(RecordingSink())
    with pytest.raises(InvalidPinError):
        io.pin(24)
    with pytest.raises(InvalidPropertyError):
        IoApic(RecordingSink(), ioapic_id=16)
    with pytest.raises(StateError):
        IoApic(RecordingSink(), pins=8).from_state(io.state())


def test_edge_pin_sends_one_msi_per_rising_edge() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 4, EDGE | 0x24, dest=1)
    line = io.pin(4)
    line.raise_irq()
    line.raise_irq()  # still high: no new edge
    line.lower_irq()
    line.pulse()
    assert sink.messages == [(0xFEE01000, 0x24), (0xFEE01000, 0x24)]


def test_msi_encoding_logical_destination_and_delivery_mode() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 1, EDGE | (1 << 11) | (1 << 8) | 0x31, dest=0x0F)  # logical, lowest priority
    io.pin(1).pulse()
    program(io, 2, LEVEL | (4 << 8) | 0x00, dest=0)  # NMI, level
    io.pin(2).raise_irq()
    assert sink.messages == [(0xFEE0F004, 0x131), (0xFEE00000, 0x400 | 0x8000 | 0x4000)]


def test_masked_edge_is_latched_until_unmask() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 3, MASKED | EDGE | 0x23)
    io.pin(3).pulse()
    assert sink.messages == []
    program(io, 3, EDGE | 0x23)
    assert sink.messages == [(0xFEE00000, 0x23)]
    program(io, 3, EDGE | 0x23)  # rewriting does not deliver it again
    assert len(sink.messages) == 1


def test_level_pin_remote_irr_and_redelivery_after_eoi() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 10, LEVEL | 0x3A)
    line = io.pin(10)
    line.raise_irq()
    assert len(sink.messages) == 1
    assert rd(io, 0x10 + 20) & REMOTE_IRR
    line.raise_irq()  # held: no re-delivery while remote IRR is set
    assert len(sink.messages) == 1
    io.eoi(0x3B)  # another vector: no effect
    assert rd(io, 0x10 + 20) & REMOTE_IRR
    io.eoi(0x3A)  # still asserted: delivered again
    assert len(sink.messages) == 2
    assert rd(io, 0x10 + 20) & REMOTE_IRR
    line.lower_irq()
    io.eoi(0x3A)
    assert len(sink.messages) == 2
    assert not rd(io, 0x10 + 20) & REMOTE_IRR


def test_eoi_register_at_0x40() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 9, LEVEL | 0x29)
    io.pin(9).raise_irq()
    io.write(0x40, 4, 0x29)
    assert len(sink.messages) == 2


def test_masked_level_pin_delivers_on_unmask() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 11, MASKED | LEVEL | 0x2B)
    io.pin(11).raise_irq()
    assert sink.messages == []
    program(io, 11, LEVEL | 0x2B)
    assert sink.messages == [(0xFEE00000, 0x2B | 0xC000)]


def test_switching_to_edge_clears_remote_irr() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 5, LEVEL | 0x25)
    io.pin(5).raise_irq()
    assert rd(io, 0x10 + 10) & REMOTE_IRR
    wr(io, 0x10 + 10, EDGE | 0x25)  # Linux's EOI trick for version-0x11 IOAPICs
    assert not rd(io, 0x10 + 10) & REMOTE_IRR


def test_polarity_bit_is_stored_and_levels_stay_logical() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 16, LEVEL | (1 << 13) | 0x50)
    assert rd(io, 0x10 + 32) & (1 << 13)
    assert sink.messages == []  # an idle (0) line is not an assertion
    io.pin(16).raise_irq()
    assert len(sink.messages) == 1


def test_level_interrupt_through_lapic_with_eoi_broadcast() -> None:
    queue = TimerQueue(clock=lambda: 0)
    lapic = LocalApic(queue)
    io = IoApic(lapic)
    lapic.eoi_broadcast = io.eoi
    lapic.write(REG_SVR, 4, 0x1FF)
    program(io, 20, LEVEL | 0x61)
    line = io.pin(20)
    line.raise_irq()
    assert lapic.acknowledge_interrupt() == 0x61
    lapic.write(REG_EOI, 4, 0)  # EOI broadcast: pin still asserted, so it comes back
    assert lapic.acknowledge_interrupt() == 0x61
    line.lower_irq()
    lapic.write(REG_EOI, 4, 0)
    assert not lapic.interrupt_pending()
    assert not rd(io, 0x10 + 40) & REMOTE_IRR


def test_state_round_trip() -> None:
    sink = RecordingSink()
    io = IoApic(sink)
    program(io, 7, LEVEL | 0x27, dest=3)
    io.pin(7).raise_irq()
    copy = IoApic(RecordingSink())
    copy.from_state(io.state())
    assert rd(copy, 0x10 + 14) == LEVEL | REMOTE_IRR | 0x27
    assert rd(copy, 0x11 + 14) == 3 << 24
    copy.eoi(0x27)  # the restored input level is still asserted
    assert copy.msi_sink.messages == [(0xFEE03000, 0x27 | 0xC000)]  # type: ignore[attr-defined]


def test_board_wiring_pit_through_ioapic_and_pic_to_lapic() -> None:
    """The wiring a PC-style board uses: ISA IRQ0 fans out to PIC IRQ0 and IOAPIC pin 2 (MADT override)."""
    from pyemu.hw.core.irq import fanout
    from pyemu.hw.intc.lapic import REG_LVT_LINT0
    from pyemu.hw.intc.pic import PicPair
    from pyemu.hw.timer.pit import PIT_HZ, Pit

    now = [0]
    queue = TimerQueue(clock=lambda: now[0])
    kicks: list[int] = []
    pic = PicPair()
    lapic = LocalApic(queue, pic=pic, kick=lambda: kicks.append(now[0]))
    pic.int_output = lapic.lint(0)
    io = IoApic(lapic)
    lapic.eoi_broadcast = io.eoi
    pit = Pit(queue, fanout(pic.pin(0), io.pin(2)))

    # Early boot: the PIC is initialised and IRQ0 reaches the CPU through LINT0 (ExtINT, APIC disabled).
    for port_value in ((0, 0x11), (1, 0x30), (1, 0x04), (1, 0x01), (1, 0xFE)):
        pic.master.write(port_value[0], 1, port_value[1])
    pit.write(3, 1, 0x34)
    pit.write(0, 1, 1193 & 0xFF)
    pit.write(0, 1, 1193 >> 8)
    if pic.interrupt_pending():  # the edge from programming the control word
        assert lapic.acknowledge_interrupt() == 0x30
        pic.master.write(0, 1, 0x20)
    period_ns = -(-1193 * 1_000_000_000 // PIT_HZ)
    now[0] = period_ns
    queue.run_due()
    assert kicks and lapic.acknowledge_interrupt() == 0x30
    pic.master.write(0, 1, 0x20)

    # Later: APIC enabled, PIC masked off LINT0, IRQ0 routed through IOAPIC pin 2 as vector 0x40.
    lapic.write(REG_SVR, 4, 0x1FF)
    lapic.write(REG_LVT_LINT0, 4, 0x10700)
    program(io, 2, EDGE | 0x40)
    for k in range(2, 5):
        now[0] = k * period_ns
        queue.run_due()
        assert lapic.acknowledge_interrupt() == 0x40
        lapic.write(REG_EOI, 4, 0)
    assert not lapic.interrupt_pending()


def test_route_changes_are_reported_for_an_in_kernel_lapic():
    class Sink:
        def deliver_msi(self, address, data):
            pass

    io = IoApic(Sink())
    routes = []
    io.route_changed = lambda pin, message: routes.append((pin, message))
    io.write(0x00, 4, 0x10 + 2 * 5)          # low half of pin 5's entry
    io.write(0x10, 4, 0x31 | (1 << 15))      # vector 0x31, level-triggered, unmasked
    io.write(0x00, 4, 0x10 + 2 * 5 + 1)
    io.write(0x10, 4, 3 << 24)               # destination APIC 3
    io.write(0x00, 4, 0x10 + 2 * 5)
    io.write(0x10, 4, 0x31 | (1 << 16))      # masked again
    assert routes[0][0] == 5 and routes[0][1][1] & 0xFF == 0x31 and routes[0][1][1] & (1 << 15)
    assert routes[1] == (5, (0xFEE00000 | (3 << 12), routes[1][1][1]))
    assert routes[2] == (5, None)
