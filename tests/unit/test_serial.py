"""The 16550A model against what Linux's 8250 driver does to it, with a fake clock for timeouts."""

from __future__ import annotations

import pytest

from pyemu.hw.char import serial as s
from pyemu.hw.char.serial import Serial16550
from pyemu.hw.char.serial_isa import IsaSerial
from pyemu.hw.core.irq import IrqLine
from pyemu.system.bus import pio_bus
from pyemu.system.timers import TimerQueue


class Clock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class Rig:
    """A UART with a recording IRQ line, a captured transmit side and a fake-clock timer queue."""

    def __init__(self, out2_gates_irq: bool = True) -> None:
        self.clock = Clock()
        self.timers = TimerQueue(clock=self.clock)
        self.levels: list[int] = []
        self.irq = IrqLine(self.levels.append, "com1")
        self.sent = bytearray()
        self.uart = Serial16550(self.irq, self.timers, self.sent.extend, out2_gates_irq=out2_gates_irq)
        self.levels.clear()

    def rd(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def wr(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)

    def advance(self, ns: int) -> int:
        self.clock.ns += ns
        return self.timers.run_due()


@pytest.fixture
def rig() -> Rig:
    return Rig()


def linux_autoconfig_type(rig: Rig) -> str:
    """The decision path of Linux's 8250 autoconfig() for a port at a standard COM address."""
    # Existence test: IER must hold exactly its low four bits.
    saved_ier = rig.rd(s.IER)
    rig.wr(s.IER, 0)
    scratch2 = rig.rd(s.IER) & 0x0F
    rig.wr(s.IER, 0x0F)
    scratch3 = rig.rd(s.IER) & 0x0F
    rig.wr(s.IER, saved_ier)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none"
    save_mcr, save_lcr = rig.rd(s.MCR), rig.rd(s.LCR)
    # Loopback test: RTS and OUT2 come back as CTS and DCD.
    rig.wr(s.MCR, s.MCR_LOOP | 0x0A)
    status = rig.rd(s.MSR) & 0xF0
    rig.wr(s.MCR, save_mcr)
    if status != 0x90:
        return "none"
    # EFR reset attempt (on a 16550A this is an FCR write), then FIFO detection through IIR bits 6-7.
    rig.wr(s.LCR, 0xBF)
    rig.wr(2, 0)
    rig.wr(s.LCR, 0)
    rig.wr(s.FCR, s.FCR_ENABLE)
    kind = rig.rd(s.IIR) >> 6
    if kind != 3:
        return {0: "8250/16450", 1: "unknown", 2: "16550"}[kind]
    # 16550A variants: no EFR behind LCR 0x80 / 0xBF (IIR reads non-zero there) ...
    rig.wr(s.LCR, 0x80)
    if rig.rd(2) == 0:
        return "16650"
    rig.wr(s.LCR, 0xBF)
    if rig.rd(2) == 0:
        return "EFR"
    # ... not a National SuperIO (IIR bit 4 does not follow MCR.LOOP) ...
    rig.wr(s.LCR, 0)
    mcr = rig.rd(s.MCR)
    rig.wr(s.LCR, 0xE0)
    before = rig.rd(2)
    rig.wr(s.LCR, 0)
    rig.wr(s.MCR, mcr ^ s.MCR_LOOP)
    rig.wr(s.LCR, 0xE0)
    after = rig.rd(2)
    rig.wr(s.LCR, 0)
    rig.wr(s.MCR, mcr)
    if (before ^ mcr) & s.MCR_LOOP == 0 and (after ^ mcr) & s.MCR_LOOP:
        return "NS16550A"
    # ... no 64-byte FIFO bit (16750) ...
    rig.wr(s.FCR, s.FCR_ENABLE | 0x20)
    status1 = rig.rd(s.IIR) & 0xE0
    rig.wr(s.FCR, s.FCR_ENABLE)
    rig.wr(s.LCR, 0x80)
    rig.wr(s.FCR, s.FCR_ENABLE | 0x20)
    status2 = rig.rd(s.IIR) & 0xE0
    rig.wr(s.FCR, s.FCR_ENABLE)
    rig.wr(s.LCR, 0)
    if status1 == 0xC0 and status2 == 0xE0:
        return "16750"
    # ... and no XScale UUE bit in IER.
    ier = rig.rd(s.IER)
    rig.wr(s.IER, ier | 0x40)
    if rig.rd(s.IER) & 0x40:
        return "xscale"
    rig.wr(s.IER, ier)
    rig.wr(s.LCR, save_lcr)
    return "16550A"


def test_linux_autoconfig_identifies_a_16550a(rig: Rig) -> None:
    assert linux_autoconfig_type(rig) == "16550A"


def test_scratch_register_holds_any_byte(rig: Rig) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF):
        rig.wr(s.SCR, value)
        assert rig.rd(s.SCR) == value


def test_loopback_maps_outputs_to_modem_inputs_and_sets_deltas(rig: Rig) -> None:
    rig.rd(s.MSR)  # clear any start-up deltas
    rig.wr(s.MCR, s.MCR_LOOP)
    assert rig.rd(s.MSR) & 0xF0 == 0
    rig.wr(s.MCR, s.MCR_LOOP | s.MCR_DTR | s.MCR_RTS | s.MCR_OUT1 | s.MCR_OUT2)
    msr = rig.rd(s.MSR)
    assert msr & 0xF0 == s.MSR_CTS | s.MSR_DSR | s.MSR_RI | s.MSR_DCD
    assert msr & 0x0F == s.MSR_DCTS | s.MSR_DDSR | s.MSR_DDCD  # RI rising edge is no TERI
    assert rig.rd(s.MSR) & 0x0F == 0  # deltas clear on read
    rig.wr(s.MCR, s.MCR_LOOP)  # RI falls: trailing edge
    assert rig.rd(s.MSR) & s.MSR_TERI


def test_loopback_data_returns_to_the_receiver_and_not_to_the_backend(rig: Rig) -> None:
    rig.wr(s.FCR, s.FCR_ENABLE)
    rig.wr(s.MCR, s.MCR_LOOP)
    rig.wr(s.THR, 0x5A)
    assert rig.sent == b""
    assert rig.rd(s.LSR) & s.LSR_DR
    assert rig.rd(s.RBR) == 0x5A
    assert rig.uart.can_receive() == 0  # line input is disconnected in loopback


def test_fifo_bits_follow_fcr_enable(rig: Rig) -> None:
    assert rig.rd(s.IIR) & 0xC0 == 0
    rig.wr(s.FCR, s.FCR_ENABLE)
    assert rig.rd(s.IIR) & 0xC0 == 0xC0
    rig.wr(s.FCR, 0)
    assert rig.rd(s.IIR) & 0xC0 == 0


def test_transmit_goes_to_backend_with_thre_and_temt_set(rig: Rig) -> None:
    for byte in b"hi\n":
        rig.wr(s.THR, byte)
        assert rig.rd(s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT
    assert bytes(rig.sent) == b"hi\n"


def test_thre_interrupt_reasserts_on_ier_rising_edge_like_linux_startup_test(rig: Rig) -> None:
    # serial8250_do_startup: IER=THRI, read IIR (THRE), IER=0, IER=THRI, read IIR must show THRE again.
    rig.wr(s.IER, s.IER_THRI)
    iir1 = rig.rd(s.IIR)
    assert iir1 & 0x0F == s.IIR_THRI
    assert rig.rd(s.IIR) & s.IIR_NO_INT  # acknowledged by the read
    rig.wr(s.IER, 0)
    rig.wr(s.IER, s.IER_THRI)
    iir2 = rig.rd(s.IIR)
    assert iir2 & 0x0F == s.IIR_THRI  # so Linux does not set UART_BUG_THRE


def test_thre_not_reasserted_by_rewriting_same_ier(rig: Rig) -> None:
    rig.wr(s.IER, s.IER_THRI)
    assert rig.rd(s.IIR) & 0x0F == s.IIR_THRI
    rig.wr(s.IER, s.IER_THRI)
    assert rig.rd(s.IIR) & s.IIR_NO_INT


def test_thr_write_clears_then_rearms_thre_after_immediate_transmit(rig: Rig) -> None:
    rig.wr(s.IER, s.IER_THRI)
    assert rig.rd(s.IIR) & 0x0F == s.IIR_THRI
    assert rig.rd(s.IIR) & s.IIR_NO_INT
    rig.wr(s.THR, ord("x"))  # the byte leaves at once: the holding register is empty again
    assert rig.rd(s.IIR) & 0x0F == s.IIR_THRI


def test_interrupt_priority_order(rig: Rig) -> None:
    rig.wr(s.MCR, s.MCR_OUT2)
    rig.uart.receive(b"a")  # data (no FIFO: trigger is one byte)
    rig.uart.receive(b"b")  # overrun: line status
    rig.uart.set_modem_inputs(s.MSR_DSR | s.MSR_DCD)  # CTS dropped: modem status delta
    rig.wr(s.IER, s.IER_RDI | s.IER_THRI | s.IER_RLSI | s.IER_MSI)
    assert rig.rd(s.IIR) == s.IIR_RLSI
    assert rig.rd(s.LSR) & s.LSR_OE  # reading LSR clears the line status interrupt
    assert rig.rd(s.IIR) == s.IIR_RDI
    assert rig.rd(s.RBR) == ord("b")  # without FIFO the overrunning byte replaced the unread one
    assert rig.rd(s.IIR) == s.IIR_THRI
    assert rig.rd(s.IIR) == s.IIR_MSI  # the THRE read acknowledged it
    assert rig.rd(s.MSR) & s.MSR_DCTS
    assert rig.rd(s.IIR) == s.IIR_NO_INT
    assert rig.levels[-1] == 0


@pytest.mark.parametrize("bits,level", [(0x00, 1), (0x40, 4), (0x80, 8), (0xC0, 14)])
def test_rx_fifo_trigger_levels(rig: Rig, bits: int, level: int) -> None:
    rig.wr(s.FCR, s.FCR_ENABLE | bits)
    rig.wr(s.IER, s.IER_RDI)
    rig.uart.receive(bytes(level - 1))
    if level > 1:
        assert rig.rd(s.IIR) & 0x0F == s.IIR_NO_INT
    rig.uart.receive(b"!")
    assert rig.rd(s.IIR) == s.IIR_FIFO_ENABLED | s.IIR_RDI
    rig.rd(s.RBR)
    if level > 1:
        assert rig.rd(s.IIR) & 0x0F == s.IIR_NO_INT  # below the trigger again


def test_character_timeout_interrupt_below_trigger_level(rig: Rig) -> None:
    rig.wr(s.LCR, s.LCR_DLAB)
    rig.wr(s.DLL, 1)  # 115200 baud
    rig.wr(s.DLM, 0)
    rig.wr(s.LCR, 0x03)  # 8N1: 10 bits a character
    rig.wr(s.FCR, s.FCR_ENABLE | 0xC0)  # trigger at 14
    rig.wr(s.MCR, s.MCR_OUT2)
    rig.wr(s.IER, s.IER_RDI)
    char_ns = rig.uart.character_time_ns()
    assert char_ns == pytest.approx(10 / 115200 * 1e9, rel=1e-3)
    rig.uart.receive(b"ab")
    assert rig.rd(s.IIR) & 0x0F == s.IIR_NO_INT
    assert rig.advance(3 * char_ns) == 0
    assert rig.levels == []
    rig.advance(char_ns + 1)
    assert rig.rd(s.IIR) == s.IIR_FIFO_ENABLED | s.IIR_CTI
    assert rig.levels == [1]
    assert rig.rd(s.RBR) == ord("a")  # a read clears the timeout ...
    assert rig.rd(s.IIR) & 0x0F == s.IIR_NO_INT
    assert rig.levels == [1, 0]
    rig.advance(4 * char_ns + 1)  # ... and restarts it for the byte left behind
    assert rig.rd(s.IIR) == s.IIR_FIFO_ENABLED | s.IIR_CTI
    assert rig.rd(s.RBR) == ord("b")
    assert rig.rd(s.IIR) & 0x0F == s.IIR_NO_INT
    assert rig.timers.next_deadline() is None  # empty FIFO: no timer left


def test_new_data_restarts_the_timeout(rig: Rig) -> None:
    rig.wr(s.FCR, s.FCR_ENABLE | 0xC0)
    rig.wr(s.IER, s.IER_RDI)
    char_ns = rig.uart.character_time_ns()
    rig.uart.receive(b"a")
    rig.advance(3 * char_ns)
    rig.uart.receive(b"b")
    rig.advance(3 * char_ns)
    assert rig.rd(s.IIR) & 0x0F == s.IIR_NO_INT
    rig.advance(char_ns + 1)
    assert rig.rd(s.IIR) & 0x0F == s.IIR_CTI


def test_fifo_overrun_keeps_the_fifo_and_flags_oe(rig: Rig) -> None:
    rig.wr(s.FCR, s.FCR_ENABLE)
    rig.wr(s.IER, s.IER_RLSI)
    assert rig.uart.can_receive() == 16
    rig.uart.receive(bytes(range(17)))
    assert rig.uart.can_receive() == 0
    assert rig.rd(s.IIR) & 0x0F == s.IIR_RLSI
    lsr = rig.rd(s.LSR)
    assert lsr & s.LSR_OE and lsr & s.LSR_DR
    assert not rig.rd(s.LSR) & s.LSR_OE  # cleared by the read
    assert bytes(rig.rd(s.RBR) for _ in range(16)) == bytes(range(16))
    assert not rig.rd(s.LSR) & s.LSR_DR
    assert rig.uart.state().stats.overruns == 1


def test_fcr_resets_clear_the_receiver(rig: Rig) -> None:
    rig.wr(s.FCR, s.FCR_ENABLE)
    rig.uart.receive(b"junk")
    rig.wr(s.FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX | s.FCR_CLEAR_TX)
    assert not rig.rd(s.LSR) & s.LSR_DR
    rig.uart.receive(b"x")
    rig.wr(s.FCR, 0)  # leaving FIFO mode empties the FIFOs too
    assert not rig.rd(s.LSR) & s.LSR_DR
    assert rig.uart.can_receive() == 1


def test_divisor_latch_access(rig: Rig) -> None:
    rig.wr(s.IER, 0x05)
    rig.wr(s.LCR, s.LCR_DLAB | 0x03)
    rig.wr(s.DLL, 0x34)
    rig.wr(s.DLM, 0x12)
    assert rig.rd(s.DLL) == 0x34 and rig.rd(s.DLM) == 0x12
    rig.wr(s.LCR, 0x03)
    assert rig.rd(s.IER) == 0x05  # the real IER was not touched
    assert rig.uart.state().divisor == 0x1234
    rig.wr(s.THR, ord("k"))  # and THR is THR again
    assert rig.sent == b"k"
    assert rig.uart.baud_rate == pytest.approx(115200 / 0x1234)


def test_irq_line_is_gated_by_out2_and_loopback(rig: Rig) -> None:
    rig.wr(s.IER, s.IER_THRI)
    assert rig.levels == []  # pending internally, but OUT2 is off ...
    assert rig.rd(s.IIR) == s.IIR_THRI  # ... as IIR shows
    rig.wr(s.IER, 0)
    rig.wr(s.MCR, s.MCR_OUT2)
    rig.wr(s.IER, s.IER_THRI)
    assert rig.levels == [1]
    rig.wr(s.MCR, s.MCR_OUT2 | s.MCR_LOOP)
    assert rig.levels == [1, 0]  # loopback forces the OUT pins inactive
    rig.wr(s.MCR, s.MCR_OUT2)
    assert rig.levels == [1, 0, 1]
    rig.rd(s.IIR)
    assert rig.levels == [1, 0, 1, 0]


def test_irq_line_ungated_when_not_a_pc() -> None:
    rig = Rig(out2_gates_irq=False)
    rig.wr(s.IER, s.IER_THRI)
    assert rig.levels == [1]


def test_transmit_burst_does_not_toggle_the_line_per_byte(rig: Rig) -> None:
    rig.wr(s.MCR, s.MCR_OUT2)
    rig.wr(s.IER, s.IER_THRI)
    assert rig.rd(s.IIR) & 0x0F == s.IIR_THRI  # the driver's handler acknowledges ...
    for byte in b"0123456789abcdef":  # ... and fills the FIFO
        rig.wr(s.THR, byte)
    rig.wr(s.IER, 0)  # nothing left: __stop_tx
    assert rig.levels == [1, 0, 1, 0]
    assert bytes(rig.sent) == b"0123456789abcdef"


def test_modem_input_change_raises_modem_status_interrupt(rig: Rig) -> None:
    rig.wr(s.MCR, s.MCR_OUT2)
    rig.wr(s.IER, s.IER_MSI)
    assert rig.levels == []
    rig.uart.set_modem_inputs(s.MSR_CTS | s.MSR_DSR)  # carrier lost
    assert rig.levels == [1]
    msr = rig.rd(s.MSR)
    assert msr & s.MSR_DDCD and not msr & s.MSR_DCD
    assert rig.levels == [1, 0]


def test_can_receive_flow_control_and_space_notification(rig: Rig) -> None:
    notes: list[int] = []
    rig.uart.set_rx_space_notifier(lambda: notes.append(rig.uart.can_receive()))
    assert rig.uart.can_receive() == 1  # 16450 mode: one holding register
    rig.uart.receive(b"a")
    assert rig.uart.can_receive() == 0
    rig.rd(s.RBR)
    assert notes == [1]
    rig.wr(s.FCR, s.FCR_ENABLE)
    rig.uart.receive(bytes(16))
    rig.rd(s.RBR)
    assert notes == [1, 1]
    rig.rd(s.RBR)  # not full before: no notification needed
    assert notes == [1, 1]
    rig.wr(s.MCR, s.MCR_LOOP)
    rig.wr(s.MCR, 0)  # leaving loopback reconnects the receiver
    assert notes[-1] > 0 and len(notes) == 3


def test_break_sets_bi_and_queues_a_zero(rig: Rig) -> None:
    rig.wr(s.IER, s.IER_RLSI)
    rig.uart.receive_break()
    assert rig.rd(s.IIR) & 0x0F == s.IIR_RLSI
    assert rig.rd(s.LSR) & (s.LSR_BI | s.LSR_DR) == s.LSR_BI | s.LSR_DR
    assert rig.rd(s.RBR) == 0


def test_state_round_trip_restores_registers_fifo_and_timer(rig: Rig) -> None:
    rig.wr(s.LCR, s.LCR_DLAB)
    rig.wr(s.DLL, 3)
    rig.wr(s.LCR, 0x03)
    rig.wr(s.FCR, s.FCR_ENABLE | 0x80)
    rig.wr(s.MCR, s.MCR_OUT2 | s.MCR_DTR)
    rig.wr(s.IER, s.IER_RDI)
    rig.wr(s.SCR, 0x42)
    rig.uart.receive(b"xyz")
    saved = rig.uart.state()
    assert saved.rx_fifo == b"xyz" and saved.timeout_armed

    other = Rig()
    other.uart.from_state(saved)
    assert other.uart.state() == saved
    assert other.rd(s.SCR) == 0x42
    other.advance(4 * other.uart.character_time_ns() + 1)
    assert other.rd(s.IIR) == s.IIR_FIFO_ENABLED | s.IIR_CTI
    assert bytes(other.rd(s.RBR) for _ in range(3)) == b"xyz"

    clone = Serial16550(IrqLine(), rig.timers)
    clone.from_state(saved)
    assert clone.state().divisor == 3


def test_reset_returns_to_power_on_state(rig: Rig) -> None:
    rig.wr(s.FCR, s.FCR_ENABLE)
    rig.wr(s.MCR, s.MCR_OUT2)
    rig.wr(s.IER, s.IER_THRI)
    rig.uart.receive(b"q")
    assert rig.levels[-1] == 1
    rig.uart.reset()
    assert rig.levels[-1] == 0
    assert rig.rd(s.IER) == 0 and rig.rd(s.MCR) == 0 and rig.rd(s.IIR) == s.IIR_NO_INT
    assert not rig.rd(s.LSR) & s.LSR_DR
    assert rig.timers.next_deadline() is None


def test_wide_accesses_split_into_byte_registers(rig: Rig) -> None:
    rig.uart.write(s.LCR, 2, 0x0B03)  # LCR=0x03 and MCR=0x0B in one 16-bit write
    assert rig.rd(s.LCR) == 0x03 and rig.rd(s.MCR) == 0x0B
    assert rig.uart.read(s.LCR, 2) == 0x0B03
    assert rig.uart.read(7, 2) >> 8 == 0xFF  # past the register file


def test_isa_binding_on_the_pio_bus() -> None:
    clock = Clock()
    timers = TimerQueue(clock=clock)
    sent = bytearray()
    com1 = IsaSerial.create(IrqLine(), timers, sent.extend)
    assert (com1.iobase, com1.irq) == (0x3F8, 4)
    bus = pio_bus()
    com1.register(bus)
    bus.write(0x3F8 + s.SCR, 1, 0xA5)
    assert bus.read(0x3F8 + s.SCR, 1) == 0xA5
    bus.write(0x3F8, 1, ord("Z"))
    assert sent == b"Z"
    com2 = IsaSerial.create(IrqLine(), timers, index=1)
    assert (com2.iobase, com2.irq) == (0x2F8, 3)


# -- LSR's and THR's fast paths (system/bus.py RegisterFastPath) --------------------------------------


def _with_fast_paths(rig: Rig):  # type: ignore[no-untyped-def]
    bus = pio_bus()
    lsr, thr = bus.fast_path(0x3F8 + s.LSR), bus.fast_path(0x3F8 + s.THR)
    rig.uart.set_fast_paths(lsr, thr)
    return lsr, thr


def _check_lsr(rig: Rig, lsr) -> None:  # type: ignore[no-untyped-def]
    """The published value is what an LSR read returns, and the read then changes nothing -- or it is None
    and the read has something to clear."""
    published = lsr.read_value
    read = rig.rd(s.LSR)
    if published is None:
        assert read & (s.LSR_OE | s.LSR_BI), f"read value withheld, but LSR {read:#x} has nothing to clear"
    else:
        assert read == published, f"published {published:#x}, LSR reads {read:#x}"
        assert rig.rd(s.LSR) == read and lsr.read_value == published


def test_lsr_read_value_follows_every_change_and_is_withheld_while_a_read_would_clear_errors(rig: Rig) -> None:
    lsr, _thr = _with_fast_paths(rig)
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT
    rig.uart.receive(b"a")                       # input from the backend: DR
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT | s.LSR_DR
    _check_lsr(rig, lsr)
    assert rig.rd(s.RBR) == ord("a")
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT
    rig.uart.receive(b"cd")                      # no FIFO: the second byte overruns the first
    assert lsr.read_value is None                # a read must reach the model to clear OE
    _check_lsr(rig, lsr)
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT | s.LSR_DR
    rig.wr(s.FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX)  # FIFO on and emptied
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT
    rig.uart.receive(b"ab")
    assert rig.rd(s.RBR) == ord("a")
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT | s.LSR_DR   # one byte left
    _check_lsr(rig, lsr)
    assert rig.rd(s.RBR) == ord("b")
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT
    rig.uart.receive_break()
    assert lsr.read_value is None
    _check_lsr(rig, lsr)
    rig.wr(s.MCR, s.MCR_LOOP)
    rig.rd(s.RBR)
    rig.wr(s.THR, ord("x"))                      # loopback: the byte comes back as input
    assert lsr.read_value is not None and lsr.read_value & s.LSR_DR
    _check_lsr(rig, lsr)
    saved = rig.uart.state()
    rig.uart.reset()
    assert lsr.read_value == s.LSR_THRE | s.LSR_TEMT
    rig.uart.from_state(saved)
    assert lsr.read_value is not None and lsr.read_value & s.LSR_DR
    rig.uart.set_fast_paths(None, None)          # detached: the old paths stop serving
    assert lsr.read_value is None


def test_thr_writes_may_be_posted_only_while_they_just_transmit(rig: Rig) -> None:
    _lsr, thr = _with_fast_paths(rig)
    assert thr.posted_writes
    for register, value in ((s.IER, s.IER_THRI), (s.MCR, s.MCR_LOOP), (s.LCR, s.LCR_DLAB)):
        rig.wr(register, value)                  # THRE interrupts, loopback, the divisor latch at 0
        assert not thr.posted_writes, register
        rig.wr(register, 0)
        assert thr.posted_writes, register
    saved = rig.uart.state()
    rig.wr(s.IER, s.IER_THRI)
    rig.uart.from_state(saved)
    assert thr.posted_writes


def test_a_burst_of_posted_thr_bytes_is_one_transmit_and_leaves_what_single_writes_leave(rig: Rig) -> None:
    _with_fast_paths(rig)
    single = Rig()
    for byte in b"hello":
        single.wr(s.THR, byte)
    transmitted: list[bytes] = []
    rig.uart.transmit = transmitted.append
    rig.uart.write_burst(s.THR, b"hello")
    assert transmitted == [b"hello"]
    assert rig.uart.state() == single.uart.state()
    rig.wr(s.LCR, s.LCR_DLAB)                    # not posted any more: a burst that arrives anyway is
    rig.uart.write_burst(s.THR, bytes([0x01, 0x00]))   # written byte by byte (here the divisor latch)
    rig.wr(s.LCR, 0)
    assert rig.uart.state().divisor & 0xFF == 0x00 and transmitted == [b"hello"]


def test_isa_binding_gives_lsr_and_thr_fast_paths_on_its_bus() -> None:
    timers = TimerQueue(clock=Clock())
    com1 = IsaSerial.create(IrqLine(), timers)
    bus = pio_bus()
    seen: dict[int, object] = {}
    bus.bind_fast_paths(lambda address, value, posted: seen.__setitem__(address, (value, posted)))
    com1.register(bus)
    assert seen == {0x3FD: (s.LSR_THRE | s.LSR_TEMT, False), 0x3F8: (None, True)}
