"""The 8259A programmable interrupt controller pair of the PC (master at 0x20, slave at 0xa0 on IR2).

Each chip is its own 2-byte register machine (:class:`I8259`) so the board registers two bus devices; the
:class:`PicPair` couples them (slave INT -> master IR2), owns the 16 input pins and the ELCR, and is the
:class:`~pyemu.hw.intc.api.InterruptController` the local APIC consults through LINT0 (or a tiny board's
CPU directly).

Behaviour that matters to Linux:

* the INTA cycle keeps the in-service bit (unless auto-EOI): Linux's ``mask_and_ack_8259A`` reads the ISR
  to tell a real IRQ7/IRQ15 from a spurious one, and an ISR bit that vanished on delivery makes it report
  spurious interrupts;
* an acknowledge with nothing requested yields IR7 of the chip (spurious IRQ 7, or 15 through the
  cascade) without setting its ISR bit, as the hardware does;
* edge-triggered inputs latch on rising edges only (a pulse is enough); level-triggered inputs (ELCR bit
  set) request service while high.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.hw.intc.errors import InvalidPinError
from pyemu.system import log

PIC_MASTER_BASE = 0x20
PIC_SLAVE_BASE = 0xA0
PIC_PORT_COUNT = 2
ELCR_BASE = 0x4D0
ELCR_PORT_COUNT = 2
CASCADE_IRQ = 2

# Bits of the ELCR that may be set: IRQ0/1/2 (timer, keyboard, cascade) and IRQ8/13 are always edge.
ELCR_MASK_MASTER = 0xF8
ELCR_MASK_SLAVE = 0xDE


@dataclass(frozen=True, kw_only=True)
class I8259State(DeviceState):
    """One chip as data: the 8-bit registers, the ICW/OCW mode bits and where the init sequence stands."""

    VERSION: ClassVar[int] = 1

    last_irr: int
    irr: int
    imr: int
    isr: int
    priority_add: int
    irq_base: int
    read_isr: bool
    poll: bool
    special_mask: bool
    init_state: int
    auto_eoi: bool
    rotate_on_auto_eoi: bool
    special_fully_nested: bool
    needs_icw4: bool
    single_mode: bool
    icw3: int
    elcr: int


class I8259:
    """One 8259A: command port at offset 0, data port at offset 1. ``changed()`` is called after every
    change that may alter the chip's INT output (the pair re-evaluates the cascade then)."""

    def __init__(self, name: str, elcr_mask: int, changed: Callable[[], None], is_master: bool) -> None:
        self.name = name
        self.elcr_mask = elcr_mask
        self.is_master = is_master
        self._changed = changed
        self.elcr = 0
        self.irr = 0
        self.last_irr = 0
        self._power_on()

    def _power_on(self) -> None:
        self.last_irr = 0
        self.irr = 0
        self.elcr = 0
        self._initialise()

    def _initialise(self) -> None:
        """What ICW1 does (and power-on): IMR, ISR and priorities cleared, edge latches reset (a level-
        triggered input that is still high stays requested), register read back selects IRR."""
        self.last_irr = 0
        self.irr &= self.elcr
        self.imr = 0
        self.isr = 0
        self.priority_add = 0
        self.irq_base = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.init_state = 0
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.needs_icw4 = False
        self.single_mode = False
        self.icw3 = 0

    def reset(self) -> None:
        self._power_on()

    # -- inputs and priorities ---------------------------------------------------------------------------
    def set_irq(self, irq: int, level: int) -> None:
        bit = 1 << irq
        if self.elcr & bit:
            if level:
                self.irr |= bit
                self.last_irr |= bit
            else:
                self.irr &= ~bit
                self.last_irr &= ~bit
        elif level:
            if not self.last_irr & bit:
                self.irr |= bit
            self.last_irr |= bit
        else:
            self.last_irr &= ~bit

    def _priority(self, mask: int) -> int:
        """Rank (0 = highest) of the best request in ``mask`` under the current rotation; 8 if none."""
        if not mask:
            return 8
        for rank in range(8):
            if mask & (1 << ((rank + self.priority_add) & 7)):
                return rank
        return 8

    def pending_irq(self) -> int:
        """The IR line this chip would signal on INT now, or -1."""
        rank = self._priority(self.irr & ~self.imr)
        if rank == 8:
            return -1
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr
        if self.special_fully_nested and self.is_master:
            # A slave's further (higher-priority) requests may nest while IR2 is in service.
            in_service &= ~(1 << CASCADE_IRQ)
        if rank < self._priority(in_service):
            return (rank + self.priority_add) & 7
        return -1

    def intack(self, irq: int) -> None:
        """The INTA cycle for ``irq``: in service (or rotated away under auto-EOI); edge requests clear."""
        bit = 1 << irq
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        if not self.elcr & bit:
            self.irr &= ~bit

    # -- bus interface -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 1:
            log.log("guest_errors", f"{self.name}: {size}-byte read at offset {offset}")
        if self.poll:
            return self._poll_read()
        if offset & 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def _poll_read(self) -> int:
        """OCW3 poll: the highest request is acknowledged as by INTA; bit 7 says whether there was one."""
        self.poll = False
        irq = self.pending_irq()
        if irq < 0:
            return 0
        self.intack(irq)
        self._changed()
        return 0x80 | irq

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 1:
            log.log("guest_errors", f"{self.name}: {size}-byte write at offset {offset}; low byte used")
        value &= 0xFF
        if offset & 1:
            self._write_data(value)
        elif value & 0x10:
            self._write_icw1(value)
        elif value & 0x08:
            self._write_ocw3(value)
        else:
            self._write_ocw2(value)
        self._changed()

    def _write_icw1(self, value: int) -> None:
        self._initialise()
        self.init_state = 1
        self.needs_icw4 = bool(value & 0x01)
        self.single_mode = bool(value & 0x02)
        if value & 0x08:
            log.log("unimp", f"{self.name}: ICW1 level-triggered mode (LTIM) not supported; use the ELCR")

    def _write_ocw3(self, value: int) -> None:
        if value & 0x04:
            self.poll = True
        if value & 0x02:
            self.read_isr = bool(value & 0x01)
        if value & 0x40:
            self.special_mask = bool(value & 0x20)

    def _write_ocw2(self, value: int) -> None:
        command = value >> 5
        if command in (0, 4):  # clear / set rotate in auto-EOI mode
            self.rotate_on_auto_eoi = command == 4
        elif command in (1, 5):  # non-specific EOI, rotate on non-specific EOI
            rank = self._priority(self.isr)
            if rank != 8:
                irq = (rank + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if command == 5:
                    self.priority_add = (irq + 1) & 7
        elif command == 3:  # specific EOI
            self.isr &= ~(1 << (value & 7))
        elif command == 7:  # rotate on specific EOI
            irq = value & 7
            self.isr &= ~(1 << irq)
            self.priority_add = (irq + 1) & 7
        elif command == 6:  # set priority: IR(n) becomes the lowest
            self.priority_add = ((value & 7) + 1) & 7
        # command 2 is a no-op

    def _write_data(self, value: int) -> None:
        if self.init_state == 0:
            self.imr = value  # OCW1
        elif self.init_state == 1:  # ICW2: vector base (the low 3 bits come from the IR number)
            self.irq_base = value & 0xF8
            if self.single_mode:
                self.init_state = 3 if self.needs_icw4 else 0
            else:
                self.init_state = 2
        elif self.init_state == 2:  # ICW3: cascade wiring (the board wires slave -> IR2 regardless)
            self.icw3 = value
            self.init_state = 3 if self.needs_icw4 else 0
        else:  # ICW4
            if not value & 0x01:
                log.log("unimp", f"{self.name}: ICW4 8080/8085 mode not supported; 8086 mode assumed")
            self.auto_eoi = bool(value & 0x02)
            self.special_fully_nested = bool(value & 0x10)
            self.init_state = 0

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> I8259State:
        """The chip's registers and mode bits now."""
        return I8259State(
            last_irr=self.last_irr, irr=self.irr, imr=self.imr, isr=self.isr, priority_add=self.priority_add,
            irq_base=self.irq_base, read_isr=self.read_isr, poll=self.poll, special_mask=self.special_mask,
            init_state=self.init_state, auto_eoi=self.auto_eoi, rotate_on_auto_eoi=self.rotate_on_auto_eoi,
            special_fully_nested=self.special_fully_nested, needs_icw4=self.needs_icw4,
            single_mode=self.single_mode, icw3=self.icw3, elcr=self.elcr,
        )

    def from_state(self, state: DeviceState) -> None:
        """Load one chip's saved state (checked first: on :class:`StateError` nothing changes), then let the
        pair re-evaluate the cascade and INTR."""
        self._apply(self.check_state(state))
        self._changed()

    def check_state(self, state: object) -> I8259State:
        """``state`` if this chip can take it. Separate from applying so :class:`PicPair` can check both
        chips before it touches either."""
        name = self.name
        s = check_state(name, state, I8259State)
        for field_name in ("last_irr", "irr", "imr", "isr", "icw3"):
            check_range(name, field_name, getattr(s, field_name), 0, 0xFF)
        check_range(name, "priority_add", s.priority_add, 0, 7)
        check_range(name, "irq_base", s.irq_base, 0, 0xF8)
        if s.irq_base & 7:
            raise StateError(name, f"irq_base={s.irq_base:#x} is not a multiple of 8")
        check_range(name, "init_state", s.init_state, 0, 3)
        check_range(name, "elcr", s.elcr, 0, 0xFF)
        if s.elcr & ~self.elcr_mask:
            raise StateError(name, f"elcr={s.elcr:#x} makes inputs outside {self.elcr_mask:#x} level-triggered")
        for field_name in ("read_isr", "poll", "special_mask", "auto_eoi", "rotate_on_auto_eoi",
                           "special_fully_nested", "needs_icw4", "single_mode"):
            if not isinstance(getattr(s, field_name), bool):
                raise StateError(name, f"{field_name}={getattr(s, field_name)!r} is not a bool")
        return s

    def _apply(self, s: I8259State) -> None:
        """Set every register from a checked state, without re-evaluating the pair."""
        self.last_irr, self.irr, self.imr, self.isr = s.last_irr, s.irr, s.imr, s.isr
        self.priority_add = s.priority_add
        self.irq_base = s.irq_base
        self.read_isr, self.poll, self.special_mask = s.read_isr, s.poll, s.special_mask
        self.init_state = s.init_state
        self.auto_eoi, self.rotate_on_auto_eoi = s.auto_eoi, s.rotate_on_auto_eoi
        self.special_fully_nested = s.special_fully_nested
        self.needs_icw4, self.single_mode, self.icw3 = s.needs_icw4, s.single_mode, s.icw3
        self.elcr = s.elcr


class ElcrPorts:
    """The edge/level control registers at 0x4d0 (IRQ0-7) and 0x4d1 (IRQ8-15): a set bit makes the input
    level-triggered. Reads and writes of 1 or 2 bytes."""

    def __init__(self, pair: "PicPair") -> None:
        self._pair = pair

    def read(self, offset: int, size: int) -> int:
        chips = (self._pair.master, self._pair.slave)
        value = 0
        for i in range(min(size, ELCR_PORT_COUNT - offset) if 0 <= offset < ELCR_PORT_COUNT else 0):
            value |= chips[offset + i].elcr << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        chips = (self._pair.master, self._pair.slave)
        if not 0 <= offset < ELCR_PORT_COUNT:
            return
        for i in range(min(size, ELCR_PORT_COUNT - offset)):
            chip = chips[offset + i]
            chip.elcr = (value >> (8 * i)) & chip.elcr_mask
        self._pair.update()


@dataclass(frozen=True, kw_only=True)
class PicPairState(DeviceState):
    """Both chips (each with its half of the ELCR) and the INTR level."""

    VERSION: ClassVar[int] = 1

    master: I8259State
    slave: I8259State
    output: int


class PicPair:
    """Master and slave 8259A with the cascade on IR2: 16 inputs, one INTR output.

    Register ``pair.master`` at 0x20 and ``pair.slave`` at 0xa0 (2 ports each), and ``pair.elcr`` at
    0x4d0 (2 ports) on the PIO bus. ``int_output`` (optional) follows INTR; ``kick()`` is called whenever
    INTR rises (wire it to the vCPU wake-up, or to ``lapic.lint(0)`` through ``int_output``).
    """

    def __init__(self, *, int_output: IrqLine | None = None, kick: Callable[[], None] | None = None) -> None:
        self._int_output = int_output
        self.kick = kick
        self.output = 0
        self.master = I8259("pic-master", ELCR_MASK_MASTER, self.update, is_master=True)
        self.slave = I8259("pic-slave", ELCR_MASK_SLAVE, self.update, is_master=False)
        self.elcr = ElcrPorts(self)
        self._lines = tuple(IrqLine(partial(self.set_irq, n), f"pic-irq{n}") for n in range(16))

    def reset(self) -> None:
        self.master.reset()
        self.slave.reset()
        self.update()

    @property
    def int_output(self) -> IrqLine | None:
        return self._int_output

    @int_output.setter
    def int_output(self, line: IrqLine | None) -> None:
        """Connect INTR (e.g. to ``lapic.lint(0)``); the line takes the current level at once."""
        self._int_output = line
        if line is not None:
            line.set_level(self.output)

    def pin(self, n: int) -> IrqLine:
        """ISA IRQ ``n`` (0-15) input. IRQ2 is the cascade and not a device input on a PC."""
        if not 0 <= n < 16:
            raise InvalidPinError(f"pic: no IRQ {n} (IRQs 0-15)", device="pic", pin=n, pins=16)
        return self._lines[n]

    def set_irq(self, n: int, level: int) -> None:
        if n < 8:
            self.master.set_irq(n, level)
        else:
            self.slave.set_irq(n - 8, level)
        self.update()

    def update(self) -> None:
        """Propagate the slave's INT to master IR2 and the master's INT to INTR (kicking on a rise)."""
        self.master.set_irq(CASCADE_IRQ, 1 if self.slave.pending_irq() >= 0 else 0)
        level = 1 if self.master.pending_irq() >= 0 else 0
        old, self.output = self.output, level
        if level != old and self._int_output is not None:
            self._int_output.set_level(level)
        if level and not old and self.kick is not None:
            self.kick()

    # -- the InterruptController protocol ----------------------------------------------------------------
    def interrupt_pending(self) -> bool:
        return self.master.pending_irq() >= 0

    def acknowledge_interrupt(self) -> int:
        """INTA: the vector of the highest request, through the cascade; spurious IR7 of the chip (vector
        base+7, ISR unchanged) when the request went away."""
        irq = self.master.pending_irq()
        if irq < 0:
            vector = self.master.irq_base + 7
        else:
            self.master.intack(irq)
            if irq == CASCADE_IRQ:
                slave_irq = self.slave.pending_irq()
                if slave_irq >= 0:
                    self.slave.intack(slave_irq)
                else:
                    slave_irq = 7
                vector = self.slave.irq_base + slave_irq
            else:
                vector = self.master.irq_base + irq
        self.update()
        if log.enabled("int"):
            log.log("int", f"pic: INTA -> vector {vector:#x}")
        return vector

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> PicPairState:
        """Both chips and INTR now."""
        return PicPairState(master=self.master.state(), slave=self.slave.state(), output=self.output)

    def from_state(self, state: DeviceState) -> None:
        """Load both chips, then re-evaluate the cascade and INTR. Both chips' states are checked before
        either is applied, so a bad state raises :class:`StateError` and leaves the pair unchanged. The INTR
        line is driven to the restored level even if it matches :attr:`output`, since the line a fresh pair
        is wired to may still be low."""
        s = check_state("pic", state, PicPairState)
        master = self.master.check_state(s.master)
        slave = self.slave.check_state(s.slave)
        check_range("pic", "output", s.output, 0, 1)
        self.master._apply(master)
        self.slave._apply(slave)
        self.output = s.output
        self.update()
        if self._int_output is not None and self._int_output.level != self.output:
            self._int_output.set_level(self.output)
