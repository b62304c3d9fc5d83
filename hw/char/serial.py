"""A 16550A UART as a register machine (the core; :mod:`pyemu.hw.char.serial_isa` binds it to ports).

Why a 16550A and these exact semantics: Linux's 8250 driver identifies the chip by probing it (scratch
register, IER width, loopback through MSR, FIFO bits in IIR) and then relies on a few behaviours that are
not obvious from the register list:

* the THRE interrupt is (re)asserted on the rising edge of IER.THRI while the transmitter is empty, and
  is cleared by reading IIR when it is the reported source or by writing THR. ``serial8250_startup``
  toggles IER twice and reads IIR to decide whether the chip "forgets" THRE (UART_BUG_THRE) and falls
  back to a polling timer if it does;
* with FIFOs enabled, received data below the trigger level is announced by a character-timeout
  interrupt (IIR 0xC) after about four character times without activity;
* on a PC the interrupt pin reaches the interrupt controller only while MCR.OUT2 is set (an external
  buffer on the board), and the driver sets OUT2 when it opens the port.

Transmission is immediate: a byte written to THR goes to ``transmit`` at once and THRE/TEMT are set again
before the write returns, as if the line were infinitely fast. Real FIFO hardware re-asserts THRE as soon
as the byte moves to the shift register, so the driver sees the same sequence, minus the waiting.

Threading: every method runs under the machine lock. The exit dispatcher and the timer queue take it
themselves; a character backend delivering input from its reader thread must take the same lock around
:meth:`Serial16550.can_receive` / :meth:`Serial16550.receive` (``CharBackend.attach`` in
:mod:`pyemu.chardev` does this).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, ClassVar

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_bits, check_bool, check_range, check_state
from pyemu.system import log
from pyemu.system.bus import RegisterFastPath
from pyemu.system.timers import TimerQueue

# Register offsets (DLAB=0 unless noted).
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REGISTER_COUNT = 8

# IER bits.
IER_RDI = 0x01  # received data available (and character timeout)
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F  # a 16550A implements only these; Linux checks that the upper bits read back as zero

# IIR values.
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C
IIR_FIFO_ENABLED = 0xC0

# FCR bits.
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_MASK = 0xC0
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

# LCR bits.
LCR_WORD_LENGTH = 0x03
LCR_STOP_BITS = 0x04
LCR_PARITY = 0x08
LCR_DLAB = 0x80

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits.
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERROR = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR bits.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F
MSR_LINES = 0xF0

FIFO_SIZE = 16
UART_CLOCK_HZ = 1_843_200  # the PC crystal; the baud rate is clock / 16 / divisor
TIMEOUT_CHARACTERS = 4
RESET_DIVISOR = 12  # 9600 baud, what firmware leaves behind on a PC
#: Modem inputs of a port whose peer is "there": CTS, DSR and DCD asserted, as QEMU presents them.
DEFAULT_MODEM_INPUTS = MSR_CTS | MSR_DSR | MSR_DCD

#: The longest character timeout any LCR/divisor setting gives (divisor 0xffff, 12-bit characters): a saved
#: timer with more time left than this cannot have come from a 16550.
MAX_TIMEOUT_NS = -(-TIMEOUT_CHARACTERS * 12 * 16 * 0xFFFF * 1_000_000_000 // UART_CLOCK_HZ)

TransmitCallback = Callable[[bytes], None]


@dataclass(frozen=True)
class SerialStats:
    """Host-side counters (bytes sent, received, lost to overrun). Not guest-visible, but kept in the state so
    the monitor's numbers survive a snapshot; immutable so the state stays hashable."""

    tx: int = 0
    rx: int = 0
    overruns: int = 0


@dataclass(frozen=True, kw_only=True)
class Serial16550State(DeviceState):
    """Everything the UART remembers, as plain data (snapshots, tests, QMP).

    ``timeout_remaining_ns`` is the character-timeout timer as time left on the timer clock when the state
    was taken (None: not armed), so a state restores correctly on a machine whose clock reads differently.
    """

    VERSION: ClassVar[int] = 1

    divisor: int = RESET_DIVISOR
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    fcr: int = 0
    scr: int = 0
    lsr_errors: int = 0  # OE/PE/FE/BI; DR, THRE and TEMT are derived
    msr_deltas: int = 0
    modem_inputs: int = DEFAULT_MODEM_INPUTS  # CTS/DSR/RI/DCD driven by the outside world
    rx_fifo: bytes = b""
    last_rx: int = 0  # what RBR returns when the receiver is empty
    thr_ipending: bool = True
    timeout_ipending: bool = False
    timeout_remaining_ns: int | None = None
    stats: SerialStats = SerialStats()

    @property
    def timeout_armed(self) -> bool:
        """Whether the character-timeout timer was running when the state was taken."""
        return self.timeout_remaining_ns is not None


class Serial16550:
    """The 16550A register machine.

    ``irq`` is the UART's interrupt output. ``timers`` provides the character-timeout timer.
    ``transmit`` receives every byte the guest sends (not called in loopback mode); ``None`` discards
    output. With ``out2_gates_irq`` (a PC: True) the interrupt output is driven only while MCR.OUT2 is set
    and the chip is not in loopback mode (loopback forces the OUT pins inactive).
    """

    def __init__(
        self,
        irq: IrqLine,
        timers: TimerQueue,
        transmit: TransmitCallback | None = None,
        *,
        out2_gates_irq: bool = True,
        name: str = "serial",
    ) -> None:
        self.irq = irq
        self.transmit = transmit
        self.out2_gates_irq = out2_gates_irq
        self.name = name
        self._timers = timers
        self._timeout_timer = timers.new_timer(self._character_timeout, f"{name}-rx-timeout")
        self._rx_space_notifier: Callable[[], None] | None = None
        self._lsr_path: RegisterFastPath | None = None
        self._thr_path: RegisterFastPath | None = None
        self._rx: deque[int] = deque()
        self._irq_level = 0
        self._stats: dict[str, int] = {}
        self._load(Serial16550State())
        self._update_irq(force=True)

    # -- wiring -----------------------------------------------------------------------------------------
    def set_fast_paths(self, lsr: RegisterFastPath | None, thr: RegisterFastPath | None) -> None:
        """Publish to ``lsr`` LSR's value while reading it has no side effect (no error bits to clear), and
        allow ``thr`` posted writes while a THR write only transmits: the console driver polls LSR and
        writes THR for every byte, and an accelerator can then serve both without calling the model. Both
        are published after every access and input, under the lock those run under."""
        for old in (self._lsr_path, self._thr_path):
            if old is not None:
                old.clear()
        self._lsr_path, self._thr_path = lsr, thr
        self._publish_fast_paths()

    def _publish_fast_paths(self) -> None:
        lsr, thr = self._lsr_path, self._thr_path
        if lsr is not None:
            lsr.publish_read(None if self._lsr_errors else self._lsr())
        if thr is not None:
            thr.post_writes(self._thr_only_transmits())

    def _thr_only_transmits(self) -> bool:
        """Whether a write to offset 0 changes no register and no interrupt: THRE stays pending-and-reported
        as it is (IER.THRI off), the byte is not looped back, and the port is THR, not the divisor latch."""
        return not (self._ier & IER_THRI or self._mcr & MCR_LOOP or self._lcr & LCR_DLAB)

    def write_burst(self, offset: int, data: bytes) -> None:
        """Posted one-byte writes, oldest first (:meth:`pyemu.accel.dispatch.ExitDispatcher.io_out_burst`):
        THR bytes go to the backend in one piece when they only transmit."""
        if offset != THR or not self._thr_only_transmits():
            for value in data:
                self.write(offset, 1, value)
            return
        self._stats["tx"] += len(data)
        if self.transmit is not None:
            self.transmit(bytes(data))
        self._thr_ipending = True
        self._update_irq()

    def set_rx_space_notifier(self, callback: Callable[[], None] | None) -> None:
        """``callback()`` is called (under the machine lock, must not block) whenever the receiver goes
        from full to accepting again, so a backend holding unread input can deliver it."""
        self._rx_space_notifier = callback

    # -- bus protocol -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """Read ``size`` consecutive byte registers (wider accesses are split, as QEMU does)."""
        if size == 1:
            value = self._read_register(offset)
        else:
            value = 0
            for i in range(size):
                value |= self._read_register(offset + i) << (8 * i)
        if offset <= LSR < offset + size or offset <= RBR < offset + size:
            self._publish_fast_paths()   # an LSR read cleared errors, an RBR read took a byte
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self._write_register(offset, value & 0xFF)
        else:
            for i in range(size):
                self._write_register(offset + i, (value >> (8 * i)) & 0xFF)
        if offset != THR or size != 1 or self._mcr & MCR_LOOP:
            self._publish_fast_paths()   # FIFO resets, IER/LCR/MCR changes, loopback input

    # -- input from the backend (machine lock held by the caller) ---------------------------------------
    def can_receive(self) -> int:
        """How many bytes :meth:`receive` can take without overrun. Zero in loopback mode, where the
        receiver is disconnected from the line: the backend keeps its input until loopback ends."""
        if self._mcr & MCR_LOOP:
            return 0
        return max(0, self._rx_capacity() - len(self._rx))

    def receive(self, data: bytes) -> None:
        """Bytes arriving on the line; the caller holds the machine lock (a backend's I/O thread takes it,
        see ``CharBackend.attach``). Bytes beyond :meth:`can_receive` overrun (LSR.OE): with FIFOs the
        new byte is lost, without FIFOs it replaces the unread one, as on the chip. Ignored in loopback."""
        if self._mcr & MCR_LOOP or not data:
            return
        for byte in data:
            self._push_rx(byte)
        self._received()
        self._update_irq()
        self._publish_fast_paths()

    def receive_break(self) -> None:
        """A break condition on the line: a zero character flagged with LSR.BI."""
        if self._mcr & MCR_LOOP:
            return
        self._push_rx(0)
        self._lsr_errors |= LSR_BI
        self._received()
        self._update_irq()
        self._publish_fast_paths()

    def set_modem_inputs(self, lines: int) -> None:
        """Drive the CTS/DSR/RI/DCD inputs (MSR bits 4-7), setting the delta bits for changes."""
        old = self._effective_modem_lines()
        self._modem_inputs = lines & MSR_LINES
        self._note_modem_change(old)
        self._update_irq()

    # -- reset and state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on state (machine reset). The FIFOs are emptied and the timeout timer stopped."""
        self._timeout_timer.cancel()
        had_no_room = self.can_receive() == 0
        self._load(Serial16550State())
        self._update_irq(force=True)
        self._publish_fast_paths()
        if had_no_room:
            self._notify_rx_space()

    def state(self) -> Serial16550State:
        """The UART's state now; the timeout timer is saved as time remaining on the timer clock."""
        expire_ns = self._timeout_timer.expire_ns
        return Serial16550State(
            divisor=self._divisor,
            ier=self._ier,
            lcr=self._lcr,
            mcr=self._mcr,
            fcr=self._fcr,
            scr=self._scr,
            lsr_errors=self._lsr_errors,
            msr_deltas=self._msr_deltas,
            modem_inputs=self._modem_inputs,
            rx_fifo=bytes(self._rx),
            last_rx=self._last_rx,
            thr_ipending=self._thr_ipending,
            timeout_ipending=self._timeout_ipending,
            timeout_remaining_ns=None if expire_ns is None else max(0, expire_ns - self._timers.now()),
            stats=SerialStats(tx=self._stats["tx"], rx=self._stats["rx"], overruns=self._stats["overruns"]),
        )

    def from_state(self, state: DeviceState) -> None:
        """Load ``state`` (from :meth:`state`), re-arming the timeout timer relative to now and re-driving the
        IRQ. Everything is checked first, so a bad state raises :class:`StateError` and changes nothing."""
        s = self._check_state(state)
        self._timeout_timer.cancel()
        self._load(s)
        if s.timeout_remaining_ns is not None:
            self._timeout_timer.mod_in(s.timeout_remaining_ns)
        self._update_irq(force=True)
        self._publish_fast_paths()
        self._notify_rx_space()

    def _check_state(self, state: object) -> Serial16550State:
        """``state`` if this UART can take it; every field must be a value the register machine can hold,
        because a state may come from a file or another host."""
        name = self.name
        s = check_state(name, state, Serial16550State)
        check_range(name, "divisor", s.divisor, 0, 0xFFFF)
        check_bits(name, "ier", s.ier, IER_MASK)
        check_range(name, "lcr", s.lcr, 0, 0xFF)
        check_bits(name, "mcr", s.mcr, MCR_MASK)
        check_bits(name, "fcr", s.fcr, FCR_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK)
        if s.fcr and not s.fcr & FCR_ENABLE:
            raise StateError(name, f"fcr={s.fcr:#x} has FIFO settings with the FIFOs disabled")
        check_range(name, "scr", s.scr, 0, 0xFF)
        check_bits(name, "lsr_errors", s.lsr_errors, LSR_ERRORS)
        check_bits(name, "msr_deltas", s.msr_deltas, MSR_DELTAS)
        check_bits(name, "modem_inputs", s.modem_inputs, MSR_LINES)
        if not isinstance(s.rx_fifo, bytes):
            raise StateError(name, f"rx_fifo must be bytes, not {type(s.rx_fifo).__name__}")
        fifo_enabled = bool(s.fcr & FCR_ENABLE)
        check_range(name, "len(rx_fifo)", len(s.rx_fifo), 0, FIFO_SIZE if fifo_enabled else 1)
        check_range(name, "last_rx", s.last_rx, 0, 0xFF)
        check_bool(name, "thr_ipending", s.thr_ipending)
        check_bool(name, "timeout_ipending", s.timeout_ipending)
        timeout_possible = fifo_enabled and bool(s.rx_fifo)  # the timeout only concerns data in the FIFO
        if s.timeout_ipending and not timeout_possible:
            raise StateError(name, "timeout_ipending without data in an enabled FIFO")
        if s.timeout_remaining_ns is not None:
            check_range(name, "timeout_remaining_ns", s.timeout_remaining_ns, 0, MAX_TIMEOUT_NS)
            if not timeout_possible:
                raise StateError(name, "character timeout armed without data in an enabled FIFO")
        if not isinstance(s.stats, SerialStats):
            raise StateError(name, f"stats must be SerialStats, not {type(s.stats).__name__}")
        for counter in ("tx", "rx", "overruns"):
            check_range(name, f"stats.{counter}", getattr(s.stats, counter), 0, 1 << 64)
        return s

    def _load(self, s: Serial16550State) -> None:
        """Set every register from a checked state (timer and IRQ are the caller's business)."""
        self._divisor = s.divisor
        self._ier = s.ier
        self._lcr = s.lcr
        self._mcr = s.mcr
        self._fcr = s.fcr
        self._scr = s.scr
        self._lsr_errors = s.lsr_errors
        self._msr_deltas = s.msr_deltas
        self._modem_inputs = s.modem_inputs
        self._rx = deque(s.rx_fifo)
        self._last_rx = s.last_rx
        self._thr_ipending = s.thr_ipending
        self._timeout_ipending = s.timeout_ipending
        self._stats = {"tx": s.stats.tx, "rx": s.stats.rx, "overruns": s.stats.overruns}

    # -- derived values ---------------------------------------------------------------------------------
    @property
    def fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_ENABLE)

    @property
    def rx_trigger_level(self) -> int:
        return RX_TRIGGER_LEVELS[self._fcr >> 6]

    @property
    def baud_rate(self) -> float:
        return UART_CLOCK_HZ / 16 / max(1, self._divisor)

    def character_time_ns(self) -> int:
        """Duration of one character on the line with the current LCR framing and divisor."""
        data_bits = 5 + (self._lcr & LCR_WORD_LENGTH)
        parity = 1 if self._lcr & LCR_PARITY else 0
        if self._lcr & LCR_STOP_BITS:
            stop = 1.5 if data_bits == 5 else 2.0
        else:
            stop = 1.0
        bits = 1 + data_bits + parity + stop
        return int(bits * 1_000_000_000 / self.baud_rate)

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _lsr(self) -> int:
        lsr = self._lsr_errors | LSR_THRE | LSR_TEMT
        if self._rx:
            lsr |= LSR_DR
        if self._fcr & FCR_ENABLE and self._lsr_errors & LSR_BI and self._rx:
            lsr |= LSR_FIFO_ERROR
        return lsr

    def _effective_modem_lines(self) -> int:
        """MSR bits 4-7: the real inputs, or in loopback the MCR outputs wired back internally."""
        if self._mcr & MCR_LOOP:
            lines = 0
            if self._mcr & MCR_RTS:
                lines |= MSR_CTS
            if self._mcr & MCR_DTR:
                lines |= MSR_DSR
            if self._mcr & MCR_OUT1:
                lines |= MSR_RI
            if self._mcr & MCR_OUT2:
                lines |= MSR_DCD
            return lines
        return self._modem_inputs

    def _iir(self) -> int:
        """The highest-priority pending interrupt: line status > received data / timeout > THR empty
        > modem status."""
        fifo_bits = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0
        if self._ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI | fifo_bits
        if self._ier & IER_RDI and self._rx:
            if not self._fcr & FCR_ENABLE:
                return IIR_RDI | fifo_bits
            if len(self._rx) >= self.rx_trigger_level:
                return IIR_RDI | fifo_bits
            if self._timeout_ipending:
                return IIR_CTI | fifo_bits
        if self._ier & IER_THRI and self._thr_ipending:
            return IIR_THRI | fifo_bits
        if self._ier & IER_MSI and self._msr_deltas:
            return IIR_MSI | fifo_bits
        return IIR_NO_INT | fifo_bits

    def _update_irq(self, force: bool = False) -> None:
        pending = not self._iir() & IIR_NO_INT
        if self.out2_gates_irq and (not self._mcr & MCR_OUT2 or self._mcr & MCR_LOOP):
            pending = False
        level = 1 if pending else 0
        if force or level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)

    # -- registers --------------------------------------------------------------------------------------
    def _read_register(self, offset: int) -> int:
        if offset == RBR:
            if self._lcr & LCR_DLAB:
                return self._divisor & 0xFF
            return self._read_rbr()
        if offset == IER:
            if self._lcr & LCR_DLAB:
                return self._divisor >> 8
            return self._ier
        if offset == IIR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self._thr_ipending = False  # reading IIR acknowledges THRE when it is the reported source
                self._update_irq()
            return iir
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            lsr = self._lsr()
            if self._lsr_errors:
                self._lsr_errors = 0
                self._update_irq()
            return lsr
        if offset == MSR:
            msr = self._effective_modem_lines() | self._msr_deltas
            if self._msr_deltas:
                self._msr_deltas = 0
                self._update_irq()
            return msr
        if offset == SCR:
            return self._scr
        return 0xFF  # beyond the eight registers (a wide access running off the end)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == THR:
            if self._lcr & LCR_DLAB:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif offset == IER:
            if self._lcr & LCR_DLAB:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        elif offset in (LSR, MSR):
            if log.enabled("guest_errors"):
                log.log("guest_errors", f"{self.name}: write {value:#04x} to read-only register {offset}")
        # offsets past the register file: ignored

    def _read_rbr(self) -> int:
        was_full = self.can_receive() == 0 and not self._mcr & MCR_LOOP
        if self._rx:
            self._last_rx = self._rx.popleft()
        self._timeout_ipending = False
        if self._fcr & FCR_ENABLE and self._rx:
            self._arm_timeout()  # the timeout counts from the last CPU read as well
        else:
            self._timeout_timer.cancel()
        self._update_irq()
        if was_full:
            self._notify_rx_space()
        return self._last_rx

    def _write_thr(self, value: int) -> None:
        self._thr_ipending = False  # writing THR acknowledges THRE ...
        self._stats["tx"] += 1
        if self._mcr & MCR_LOOP:
            self._push_rx(value)
            self._received()
        elif self.transmit is not None:
            self.transmit(bytes((value,)))
        # ... and the transmitter is empty again at once: THRE re-asserts as on a FIFO part whose byte
        # has moved to the shift register. One IRQ update for both, so each write is not an extra edge.
        self._thr_ipending = True
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        old = self._ier
        self._ier = value & IER_MASK
        if self._ier & IER_THRI and not old & IER_THRI:
            # Rising edge of THRI with the transmitter empty re-raises THRE even if an IIR read had
            # acknowledged it; Linux's startup THRE test depends on it.
            self._thr_ipending = True
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        had_no_room = self.can_receive() == 0 and not self._mcr & MCR_LOOP
        old = self._fcr
        enable_changed = (old ^ value) & FCR_ENABLE
        if enable_changed or (value & FCR_ENABLE and value & FCR_CLEAR_RX):
            self._clear_rx()
        # The transmitter is always empty here, so a TX FIFO reset changes nothing observable.
        if value & FCR_ENABLE:
            self._fcr = value & (FCR_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK)
        else:
            self._fcr = 0
        if not self._fcr & FCR_ENABLE:
            self._timeout_timer.cancel()
            self._timeout_ipending = False
        self._update_irq()
        if had_no_room and self.can_receive() > 0:
            self._notify_rx_space()

    def _write_mcr(self, value: int) -> None:
        old_lines = self._effective_modem_lines()
        was_loop = self._mcr & MCR_LOOP
        self._mcr = value & MCR_MASK
        self._note_modem_change(old_lines)
        self._update_irq()
        if was_loop and not self._mcr & MCR_LOOP and self.can_receive() > 0:
            self._notify_rx_space()

    # -- helpers ----------------------------------------------------------------------------------------
    def _push_rx(self, byte: int) -> None:
        self._stats["rx"] += 1
        if len(self._rx) >= self._rx_capacity():
            self._lsr_errors |= LSR_OE
            self._stats["overruns"] += 1
            if not self._fcr & FCR_ENABLE:
                self._rx[-1] = byte  # 16450 mode: the new character overwrites the unread one
        else:
            self._rx.append(byte)

    def _received(self) -> None:
        """After characters arrived: the timeout restarts (the FIFO just saw activity)."""
        if self._fcr & FCR_ENABLE:
            self._timeout_ipending = False
            self._arm_timeout()

    def _clear_rx(self) -> None:
        self._rx.clear()
        self._timeout_ipending = False
        self._timeout_timer.cancel()
        self._lsr_errors &= ~LSR_BI

    def _arm_timeout(self) -> None:
        self._timeout_timer.mod_in(TIMEOUT_CHARACTERS * self.character_time_ns())

    def _character_timeout(self) -> None:
        """Timer callback (machine lock held by the timer queue)."""
        if self._fcr & FCR_ENABLE and self._rx:
            self._timeout_ipending = True
            self._update_irq()

    def _note_modem_change(self, old_lines: int) -> None:
        new_lines = self._effective_modem_lines()
        changed = old_lines ^ new_lines
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if old_lines & MSR_RI and not new_lines & MSR_RI:
            self._msr_deltas |= MSR_TERI  # trailing edge of ring indicator only
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD

    def _notify_rx_space(self) -> None:
        if self._rx_space_notifier is not None and self.can_receive() > 0:
            self._rx_space_notifier()
