"""Userspace local APIC (xAPIC MMIO register page) for the software CPU.

Under the Unicorn CPU there is no in-kernel APIC: this model is what Linux programs through the 4 KiB page
the board maps at 0xfee00000 (IA32_APIC_BASE cannot be read there, so only xAPIC mode exists). It is a
register machine plus three interfaces:

* :class:`~pyemu.hw.intc.api.InterruptController` for the vCPU: :meth:`interrupt_pending` at instruction
  boundaries and :meth:`acknowledge_interrupt` for the INTA cycle (IRR -> ISR).
* :class:`~pyemu.hw.intc.api.ProcessorSignals` for the vCPU: :meth:`take_nmi`, :meth:`take_init` and
  :meth:`take_startup`, the events a CPU takes whatever RFLAGS.IF says.
* :class:`~pyemu.hw.intc.api.MsiSink` for the IOAPIC and MSI-capable devices: :meth:`deliver_msi`. With
  several CPUs the board points the IOAPIC at :class:`~pyemu.hw.intc.apic_bus.ApicBus` instead, which
  decodes the destination once and calls :meth:`accept_message` on every APIC it names.

Facts measured with Linux 6.1 (see DESIGN.md) shape it: the boot CPU resets LINT0 to ExtINT (0x700) so the
8259 reaches the CPU before Linux sets up the APIC; the timer counts at the CPUID 0x15 crystal / divide so
Linux skips calibration. Everything runs under the machine lock, except that IRR, ISR, TMR and the TPR live
in a core (:mod:`pyemu.hw.intc.apic_core`) with a lock of its own, where the software CPU's INTA and the
guest's EOI writes reach them in C without Python (:attr:`engine_acknowledge`, :attr:`engine_eoi`; the
model tells the core when it must answer itself); :attr:`kick` wakes the vCPU whenever an
interrupt may have become deliverable and may be called from the timer thread; :attr:`event_kick` wakes it
for NMI, INIT and start-up IPIs, which must stop it even while it runs with interrupts disabled.

Guest mistakes (reserved registers, read-only registers, unaligned or non-32-bit accesses) never raise:
they are ignored and logged under ``-d guest_errors``; an access to a reserved register also sets the
"illegal register address" error bit, as the SDM describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_bits, check_range, check_state
from pyemu.hw.intc.api import InterruptController
from pyemu.hw.intc.apic_core import IRR, ISR, TMR, apic_core, routes_changed
from pyemu.hw.intc.errors import InvalidPinError, InvalidPropertyError
from pyemu.hw.intc.lapic_timer import (
    MODE_ONESHOT,
    MODE_PERIODIC,
    MODE_TSC_DEADLINE,
    ApicTimer,
    ApicTimerState,
)
from pyemu.system import log
from pyemu.system.timers import TimerQueue
from pyemu.target.x86.cpuid import TSC_CRYSTAL_HZ

APIC_PAGE_SIZE = 0x1000
APIC_DEFAULT_BASE = 0xFEE00000
APIC_VERSION = 0x50014  # version 0x14 (integrated xAPIC), max LVT entry 5 (six entries, no CMCI)

# Register offsets in the xAPIC page.
REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_RRD = 0x0C0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0

# LVT indices (order of the registers from 0x320).
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
LVT_COUNT = 6
LVT_NAMES = ("timer", "thermal", "perf", "lint0", "lint1", "error")

LVT_MASKED = 1 << 16
LVT_LEVEL_TRIGGER = 1 << 15
LVT_REMOTE_IRR = 1 << 14
LVT_POLARITY_LOW = 1 << 13
# Writable bits per LVT entry: vector, delivery mode (where it has one), polarity/trigger (LINT), mask,
# timer mode. Delivery status (bit 12) and remote IRR (bit 14) are read-only.
_LVT_WRITABLE = (0x700FF, 0x107FF, 0x107FF, 0x1A7FF, 0x1A7FF, 0x100FF)

SVR_ENABLE = 1 << 8
SVR_FOCUS_DISABLED = 1 << 9
_SVR_WRITABLE = 0x3FF

# Delivery modes (ICR, LVT, MSI data bits 8-10).
DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_NMI = 4
DM_INIT = 5
DM_STARTUP = 6
DM_EXTINT = 7

# Delivery modes an LVT entry may use (SDM 10.5.1); lowest priority, start-up and 3 are reserved there.
_LVT_DELIVERY_MODES = frozenset({DM_FIXED, DM_SMI, DM_NMI, DM_INIT, DM_EXTINT})

SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL, SHORTHAND_OTHERS = range(4)
_ICR_LOW_WRITABLE = 0x000CCFFF  # vector, mode, dest mode, level, trigger, shorthand; not delivery status

# Error status register bits.
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

_RESERVED_READ_OFFSETS = frozenset({0x2F0})

#: Timer mode for each value of LVT timer bits 17-18; the reserved value 3 counts as one-shot.
_LVT_TIMER_MODES = (MODE_ONESHOT, MODE_PERIODIC, MODE_TSC_DEADLINE, MODE_ONESHOT)


@dataclass(frozen=True)
class Ipi:
    """An inter-processor interrupt as written to the ICR, handed to ``ipi_sink`` (the APIC bus) for the
    CPUs other than the sender. ``level`` is ICR bit 14 (assert = 1) and ``level_triggered`` bit 15; together
    they tell an "INIT level de-assert" (level-triggered, level 0) from a real INIT."""

    source_id: int
    vector: int
    delivery_mode: int
    logical: bool
    destination: int
    shorthand: int
    level: int
    level_triggered: bool

    @property
    def is_init_deassert(self) -> bool:
        """The "INIT level de-assert" message (SDM 10.6.1): only re-synchronised arbitration IDs on the old
        serial APIC bus; Pentium 4 and later ignore it, and so do we. Linux still sends it after an INIT."""
        return self.delivery_mode == DM_INIT and self.level_triggered and not self.level


@dataclass(frozen=True)
class MsiMessage:
    """An MSI decoded: address bits 19:12 destination, bit 2 logical mode; data bits 7:0 vector, 10:8
    delivery mode, 15 trigger mode (kept only for fixed and lowest-priority, the modes that use TMR)."""

    destination: int
    logical: bool
    vector: int
    delivery_mode: int
    level_triggered: bool


def decode_msi(address: int, data: int) -> MsiMessage | None:
    """Decode one MSI, or None if ``address`` is not in the 0xFEExxxxx interrupt window (the caller logs
    and drops it). The assert bit (data bit 14) is not checked, as KVM does not: every message asserts."""
    if (address >> 20) != 0xFEE:
        return None
    mode = (data >> 8) & 7
    return MsiMessage(
        destination=(address >> 12) & 0xFF,
        logical=bool(address & 0x4),
        vector=data & 0xFF,
        delivery_mode=mode,
        level_triggered=bool(data & (1 << 15)) and mode in (DM_FIXED, DM_LOWEST),
    )


@dataclass(frozen=True, kw_only=True)
class LapicState(DeviceState):
    """The local APIC as data. ``irr``/``isr``/``tmr`` are 256-bit integers, bit n = vector n; ``timer`` holds
    its times relative to the moment the state was taken (see :class:`ApicTimerState`)."""

    VERSION: ClassVar[int] = 2  # 2: the timer's state carries its backlog of missed ticks

    apic_id: int
    tpr: int
    ldr: int
    dfr: int
    svr: int
    irr: int
    isr: int
    tmr: int
    esr: int
    esr_pending: int
    icr_low: int
    icr_high: int
    lvt: tuple[int, ...]
    lint_levels: tuple[int, int]
    nmi_pending: bool
    extint_pending: bool
    hardware_enabled: bool
    timer: ApicTimerState
    init_pending: bool = False
    startup_vector: int | None = None


def _highest(bits: int) -> int:
    """Highest set vector in a 256-bit register, or -1."""
    return bits.bit_length() - 1


class _CoreRegister:
    """IRR, ISR or TMR of a :class:`LocalApic` as a 256-bit int (bit n = vector n), read from and written
    to its core."""

    def __init__(self, which: int) -> None:
        self._which = which

    def __get__(self, apic: "LocalApic | None", owner: object = None) -> Any:
        if apic is None:  # looked up on the class (documentation tools, introspection)
            return self
        return apic._core.get(self._which)

    def __set__(self, apic: "LocalApic", value: int) -> None:
        apic._core.set(self._which, value)


class LocalApic:
    """One CPU's xAPIC. Register it on the MMIO bus at 0xfee00000 (length :data:`APIC_PAGE_SIZE`).

    ``pic``: the 8259 pair behind LINT0 (anything with interrupt_pending()/acknowledge_interrupt()).
    ``eoi_broadcast(vector)``: called on EOI of a level-triggered vector (wire it to ``IoApic.eoi``).
    ``ipi_sink(ipi)``: receives every IPI aimed at other CPUs (the board wires it to the APIC bus); the
    sender handles its own share itself, see :meth:`_send_ipi` for the exact split.
    ``kick()``: wakes the vCPU when a maskable interrupt may have become pending (any thread).
    ``event_kick()``: wakes the vCPU when an NMI, INIT or start-up IPI became pending. The CPU takes those
    whatever RFLAGS.IF says, so the vCPU must stop for them even with interrupts disabled, which ``kick``
    need not do. None means "use ``kick``".
    ``tsc_now()``: the guest TSC now, for TSC-deadline; by default virtual time x ``tsc_hz``.
    """

    def __init__(
        self,
        queue: TimerQueue,
        *,
        apic_id: int = 0,
        bsp: bool = True,
        kick: Callable[[], None] | None = None,
        event_kick: Callable[[], None] | None = None,
        pic: InterruptController | None = None,
        eoi_broadcast: Callable[[int], None] | None = None,
        ipi_sink: Callable[[Ipi], None] | None = None,
        crystal_hz: int = TSC_CRYSTAL_HZ,
        tsc_hz: int = 2_600_000_000,  # the default_cpuid() TSC rate
        tsc_now: Callable[[], int] | None = None,
    ) -> None:
        if not 0 <= apic_id <= 0xFF:
            raise InvalidPropertyError(
                f"lapic: APIC ID {apic_id} does not fit the 8-bit xAPIC ID", device="lapic", name="apic_id",
                value=apic_id,
            )
        for name, value in (("crystal_hz", crystal_hz), ("tsc_hz", tsc_hz)):
            if value <= 0:
                raise InvalidPropertyError(
                    f"lapic: {name} must be positive, not {value}", device="lapic", name=name, value=value
                )
        self.initial_apic_id = apic_id
        self.bsp = bsp
        self.kick = kick
        self.event_kick = event_kick
        self.wake_words: tuple[int, int, int] | None = None
        """The vCPU's words a device's C code may wake it through without Python (the software CPU's
        ``TcgVcpu.wake_words``: spinning at a HLT inside its run, interrupt pending, attention), or None."""
        self.pic = pic
        self.eoi_broadcast = eoi_broadcast
        self.ipi_sink = ipi_sink
        self.destination_changed: Callable[[], None] | None = None
        """Told whenever what :meth:`matches_destination` answers may have changed (APIC ID, LDR, DFR):
        the APIC bus caches message routes until then."""
        self.timer = ApicTimer(queue, self._timer_expired, crystal_hz=crystal_hz, tsc_hz=tsc_hz, tsc_now=tsc_now)
        self._lint_lines = tuple(IrqLine(partial(self._lint_changed, n), f"lapic-lint{n}") for n in range(2))
        self._core = apic_core()
        self.reset()

    # -- the interrupt registers, kept in the core (hw/intc/apic_core.py) ---------------------------------
    irr = _CoreRegister(IRR)
    isr = _CoreRegister(ISR)
    tmr = _CoreRegister(TMR)

    @property
    def tpr(self) -> int:
        return self._core.tpr

    @tpr.setter
    def tpr(self, value: int) -> None:
        self._core.tpr = value

    @property
    def engine_acknowledge(self) -> tuple[int, int] | None:
        """The INTA a software CPU may run in C inside its engine (see :mod:`pyemu.hw.intc.apic_core`):
        ``(function address, core address)``, or None where the core is Python's."""
        return self._core.engine_ack

    @property
    def engine_route_core(self) -> int | None:
        """The core's address for a device interrupt posted in C (:class:`~pyemu.hw.intc.apic_core.NativeRoute`),
        or None where the core is Python's."""
        native = self._core.engine_ack
        return None if native is None else native[1]

    def kick_if_pending(self) -> None:
        """Wake the vCPU if an interrupt is deliverable (after one was posted into IRR from C)."""
        self._maybe_kick()

    def fixed_target(self, address: int, data: int) -> "LocalApic | None":
        """This APIC, when an MSI of ``address``/``data`` is a fixed, edge-triggered interrupt for it that it
        accepts now (a legal vector, the APIC enabled); else None."""
        message = decode_msi(address, data)
        if (message is None or message.delivery_mode != DM_FIXED or message.level_triggered
                or message.vector < 16 or not self.software_enabled or not self.hardware_enabled):
            return None
        return self if self.matches_destination(message.destination, message.logical) else None

    @property
    def engine_acknowledges(self) -> int:
        """INTAs answered in C so far."""
        return self._core.engine_acks

    @property
    def engine_eoi(self) -> tuple[int, int, int] | None:
        """The EOI register a software CPU may serve in C from its device window: ``(function address, core
        address, guest-physical address of the register)`` (see :mod:`pyemu.hw.intc.apic_core`), or None
        where the core is Python's. The function returns -2 when this model must take the write."""
        native = self._core.engine_eoi
        return None if native is None else (native[0], native[1], APIC_DEFAULT_BASE + REG_EOI)

    @property
    def engine_eois(self) -> int:
        """EOI writes served in C so far."""
        return self._core.engine_eois

    def _refresh_engine_ack(self) -> None:
        """Tell the core whether an INTA needs this model: the 8259 may be passed through (its vector, not
        ours), or the timer owes a tick that the INTA of its vector re-requests."""
        self._core.set_python_ack(self._pic_passthrough() or self.timer.backlog > 0)

    # -- reset and state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Power-on / RESET state (SDM 10.4.7.1): everything masked and software-disabled, DFR all ones;
        LINT0 in ExtINT mode on the boot CPU, as QEMU and KVM set it, so the 8259 reaches the CPU."""
        self.apic_id = self.initial_apic_id
        self.hardware_enabled = True
        self._lint_levels = [0, 0]
        self._reset_registers()
        self._init_pending = False
        self._startup_vector: int | None = None

    def init_reset(self) -> None:
        """The APIC's share of an INIT (SDM 10.4.7.3): the power-up state except that the APIC ID is kept
        (KVM keeps it too), and so is the global enable (IA32_APIC_BASE is not touched by INIT). The LINT
        input levels are wires outside the APIC and stay as they are. A pending NMI is discarded, as KVM's
        INIT does; a start-up IPI latched before the INIT is discarded by :meth:`accept_message`."""
        self._reset_registers()

    def _reset_registers(self) -> None:
        """Registers shared by RESET and INIT; the callers decide about the APIC ID and global enable."""
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.esr = 0
        self._esr_pending = 0
        self.icr_low = 0
        self.icr_high = 0
        self.lvt = [LVT_MASKED] * LVT_COUNT
        if self.bsp:
            self.lvt[LVT_LINT0] = DM_EXTINT << 8
        self.nmi_pending = False
        self._extint_pending = False
        self.timer.stop()
        self._destination_changed()
        self._refresh_engine_ack()

    def _destination_changed(self) -> None:
        routes_changed()
        if self.destination_changed is not None:
            self.destination_changed()

    def state(self) -> LapicState:
        """Registers, pending events, LINT input levels and the timer, now."""
        return LapicState(
            apic_id=self.apic_id, tpr=self.tpr, ldr=self.ldr, dfr=self.dfr, svr=self.svr, irr=self.irr,
            isr=self.isr, tmr=self.tmr, esr=self.esr, esr_pending=self._esr_pending, icr_low=self.icr_low,
            icr_high=self.icr_high, lvt=tuple(self.lvt), lint_levels=(self._lint_levels[0], self._lint_levels[1]),
            nmi_pending=self.nmi_pending, extint_pending=self._extint_pending,
            hardware_enabled=self.hardware_enabled, timer=self.timer.state(), init_pending=self._init_pending,
            startup_vector=self._startup_vector,
        )

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state and wake the vCPU for whatever it has pending. The whole state, timer included,
        is checked first: on :class:`StateError` nothing changes."""
        s = self._check_state(state)
        timer = ApicTimer.check_state(s.timer)
        self.apic_id = s.apic_id
        self.tpr = s.tpr
        self.ldr = s.ldr
        self.dfr = s.dfr
        self.svr = s.svr
        self.irr, self.isr, self.tmr = s.irr, s.isr, s.tmr
        self.esr, self._esr_pending = s.esr, s.esr_pending
        self.icr_low, self.icr_high = s.icr_low, s.icr_high
        self.lvt = list(s.lvt)
        self._lint_levels = list(s.lint_levels)
        self.nmi_pending = s.nmi_pending
        self._extint_pending = s.extint_pending
        self.hardware_enabled = s.hardware_enabled
        self._init_pending = s.init_pending
        self._startup_vector = s.startup_vector
        self.timer.apply_state(timer)
        self._destination_changed()
        self._refresh_engine_ack()
        if self.nmi_pending or self._init_pending or self._startup_vector is not None:
            self._signal_event()
        self._maybe_kick()

    @staticmethod
    def check_saved_state(state: object) -> LapicState:
        """``state`` if this APIC could load it (:meth:`from_state`'s check, without applying anything):
        what a converter producing a LapicState from another accelerator's form checks its result with."""
        return LocalApic._check_state(state)

    @staticmethod
    def _check_state(state: object) -> LapicState:
        """``state`` if its registers hold values this APIC's registers can hold (reserved bits clear, the
        read-only bits of the LVT as the APIC itself sets them, the LVT timer mode matching the timer)."""
        s = check_state("lapic", state, LapicState)
        for name in ("apic_id", "tpr", "esr", "esr_pending"):
            check_range("lapic", name, getattr(s, name), 0, 0xFF)
        check_bits("lapic", "ldr", s.ldr, 0xFF000000)
        check_range("lapic", "dfr", s.dfr, 0, 0xFFFFFFFF)
        if s.dfr & 0x0FFFFFFF != 0x0FFFFFFF:
            raise StateError("lapic", f"dfr={s.dfr:#x}: bits 0-27 are reserved and read as ones")
        check_bits("lapic", "svr", s.svr, _SVR_WRITABLE)
        for name in ("irr", "isr", "tmr"):
            value = getattr(s, name)
            check_range("lapic", name, value, 0, (1 << 256) - 1)
            if value & 0xFFFF:
                raise StateError("lapic", f"{name} has vectors 0-15 set, which an APIC never accepts")
        check_bits("lapic", "icr_low", s.icr_low, _ICR_LOW_WRITABLE)
        check_bits("lapic", "icr_high", s.icr_high, 0xFF000000)
        if not isinstance(s.lvt, tuple) or len(s.lvt) != LVT_COUNT:
            raise StateError("lapic", f"lvt must be a tuple of {LVT_COUNT} entries, not {s.lvt!r}")
        for index, entry in enumerate(s.lvt):
            valid = _LVT_WRITABLE[index] | (LVT_REMOTE_IRR if index in (LVT_LINT0, LVT_LINT1) else 0)
            check_bits("lapic", f"lvt[{LVT_NAMES[index]}]", entry, valid)
        if not isinstance(s.lint_levels, tuple) or len(s.lint_levels) != 2:
            raise StateError("lapic", f"lint_levels must be a pair, not {s.lint_levels!r}")
        for n, level in enumerate(s.lint_levels):
            check_range("lapic", f"lint_levels[{n}]", level, 0, 1)
        for name in ("nmi_pending", "extint_pending", "hardware_enabled", "init_pending"):
            if not isinstance(getattr(s, name), bool):
                raise StateError("lapic", f"{name}={getattr(s, name)!r} is not a bool")
        if s.startup_vector is not None:
            check_range("lapic", "startup_vector", s.startup_vector, 0, 0xFF)
        if not isinstance(s.timer, ApicTimerState):
            raise StateError("lapic", f"timer must be ApicTimerState, not {type(s.timer).__name__}")
        lvt_mode = _LVT_TIMER_MODES[(s.lvt[LVT_TIMER] >> 17) & 3]
        if s.timer.mode != lvt_mode:
            raise StateError("lapic", f"timer mode {s.timer.mode} does not match the LVT timer entry ({lvt_mode})")
        return s

    # -- wiring ------------------------------------------------------------------------------------------
    def lint(self, n: int) -> IrqLine:
        """The LINT0/LINT1 input pins. LINT1 is usually NMI; a PIC INTR wired to LINT0 only wakes the vCPU
        (in ExtINT mode the vector comes from the PIC on acknowledge)."""
        if n not in (0, 1):
            raise InvalidPinError(f"lapic: no LINT{n} pin (there are LINT0 and LINT1)", device="lapic", pin=n,
                                  pins=2)
        return self._lint_lines[n]

    def set_hardware_enabled(self, enabled: bool) -> None:
        """IA32_APIC_BASE bit 11 (global enable). Under the software CPU the MSR is not writable, so this is
        for boards and tests; a hardware-disabled APIC passes the PIC through unconditionally."""
        self.hardware_enabled = bool(enabled)
        routes_changed()
        self._refresh_engine_ack()
        self._maybe_kick()

    # -- bus interface -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        aligned = offset & ~0xF
        if size != 4 or offset & 0xF:
            # The SDM asks for aligned 32-bit accesses; give narrow reads the bytes they overlap in the
            # register's first dword and zero elsewhere rather than inventing data.
            log.log("guest_errors", f"lapic: {size}-byte read at offset {offset:#x} (registers are 32-bit)")
            within = offset & 0xF
            if within >= 4 or within + size > 4:
                return 0
            return (self._read_register(aligned) >> (8 * within)) & ((1 << (8 * size)) - 1)
        return self._read_register(aligned)

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 0xF:
            log.log("guest_errors", f"lapic: ignored {size}-byte write at offset {offset:#x} value {value:#x}")
            return
        self._write_register(offset, value & 0xFFFFFFFF)

    def _read_register(self, offset: int) -> int:
        if offset == REG_ID:
            return self.apic_id << 24
        if offset == REG_VERSION:
            return APIC_VERSION
        if offset == REG_TPR:
            return self.tpr
        if offset == REG_APR:
            return self.arbitration_priority()
        if offset == REG_PPR:
            return self.processor_priority()
        if offset == REG_LDR:
            return self.ldr
        if offset == REG_DFR:
            return self.dfr
        if offset == REG_SVR:
            return self.svr
        if REG_ISR <= offset < REG_ISR + 0x80:
            return (self.isr >> (32 * ((offset - REG_ISR) >> 4))) & 0xFFFFFFFF
        if REG_TMR <= offset < REG_TMR + 0x80:
            return (self.tmr >> (32 * ((offset - REG_TMR) >> 4))) & 0xFFFFFFFF
        if REG_IRR <= offset < REG_IRR + 0x80:
            return (self.irr >> (32 * ((offset - REG_IRR) >> 4))) & 0xFFFFFFFF
        if offset == REG_ESR:
            return self.esr
        if offset == REG_ICR_LOW:
            # Delivery status (bit 12) always reads idle: IPIs are delivered synchronously, before the
            # ICR write returns. _ICR_LOW_WRITABLE leaves that bit out, so it is never stored.
            return self.icr_low
        if offset == REG_ICR_HIGH:
            return self.icr_high
        if REG_LVT_TIMER <= offset <= REG_LVT_ERROR:
            return self.lvt[(offset - REG_LVT_TIMER) >> 4]
        if offset == REG_TIMER_INITIAL:
            return self.timer.initial_count
        if offset == REG_TIMER_CURRENT:
            return self.timer.current_count()
        if offset == REG_TIMER_DIVIDE:
            return self.timer.divide_config
        if offset in (REG_EOI, REG_RRD):
            return 0  # write-only EOI and the unsupported remote-read register read as zero
        log.log("guest_errors", f"lapic: read of reserved register {offset:#x}")
        if offset not in _RESERVED_READ_OFFSETS:
            self._signal_error(ESR_ILLEGAL_REGISTER)
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == REG_ID:
            self.apic_id = value >> 24
            self._destination_changed()
        elif offset == REG_TPR:
            self.tpr = value & 0xFF
            self._maybe_kick()
        elif offset == REG_EOI:
            self.eoi()
        elif offset == REG_LDR:
            self.ldr = value & 0xFF000000
            self._destination_changed()
        elif offset == REG_DFR:
            self.dfr = (value & 0xF0000000) | 0x0FFFFFFF
            self._destination_changed()
        elif offset == REG_SVR:
            self._write_svr(value)
        elif offset == REG_ESR:
            # A write latches the errors seen since the previous write into the readable register.
            self.esr, self._esr_pending = self._esr_pending, 0
        elif offset == REG_ICR_LOW:
            self.icr_low = value & _ICR_LOW_WRITABLE
            self._send_ipi()
        elif offset == REG_ICR_HIGH:
            self.icr_high = value & 0xFF000000
        elif REG_LVT_TIMER <= offset <= REG_LVT_ERROR:
            self._write_lvt((offset - REG_LVT_TIMER) >> 4, value)
        elif offset == REG_TIMER_INITIAL:
            self.timer.write_initial_count(value)
        elif offset == REG_TIMER_DIVIDE:
            self.timer.write_divide(value)
        elif offset in (REG_VERSION, REG_APR, REG_PPR, REG_RRD, REG_TIMER_CURRENT) or (
            REG_ISR <= offset < REG_IRR + 0x80
        ):
            log.log("guest_errors", f"lapic: write {value:#x} to read-only register {offset:#x} ignored")
        else:
            log.log("guest_errors", f"lapic: write {value:#x} to reserved register {offset:#x} ignored")
            self._signal_error(ESR_ILLEGAL_REGISTER)

    def _write_svr(self, value: int) -> None:
        self.svr = value & _SVR_WRITABLE
        if not self.svr & SVR_ENABLE:
            # Software disable masks every LVT entry (SDM 10.4.7.2); IRR/ISR are kept.
            self.lvt = [entry | LVT_MASKED for entry in self.lvt]
            self.timer.clear_backlog()
        routes_changed()  # fixed interrupts are dropped while software-disabled
        self._refresh_engine_ack()
        self._maybe_kick()

    def _write_lvt(self, index: int, value: int) -> None:
        writable = _LVT_WRITABLE[index]
        entry = (self.lvt[index] & ~writable) | (value & writable)
        if not self.software_enabled:
            entry |= LVT_MASKED  # the mask bits cannot be cleared while software-disabled
        if index in (LVT_LINT0, LVT_LINT1) and not entry & LVT_LEVEL_TRIGGER:
            entry &= ~LVT_REMOTE_IRR
        self.lvt[index] = entry
        if index == LVT_TIMER:
            mode = (entry >> 17) & 3
            if mode == 3:
                log.log("guest_errors", "lapic: reserved timer mode 3 treated as one-shot")
            self.timer.set_mode(_LVT_TIMER_MODES[mode])
            if entry & LVT_MASKED:
                self.timer.clear_backlog()
        elif index in (LVT_LINT0, LVT_LINT1):
            # A level-triggered input that is still asserted is delivered once it gets unmasked.
            self._evaluate_lint(index - LVT_LINT0)
        self._refresh_engine_ack()
        self._maybe_kick()

    # -- priorities --------------------------------------------------------------------------------------
    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def spurious_vector(self) -> int:
        return self.svr & 0xFF

    def processor_priority(self) -> int:
        """PPR: the TPR, or the class of the highest in-service vector if that is higher (SDM 10.8.3.1)."""
        return self._core.ppr()

    def arbitration_priority(self) -> int:
        """APR (SDM 10.8.3.1 / 10.6.2.4): what lowest-priority arbitration compares, lowest wins."""
        isrv = max(_highest(self.isr), 0)
        irrv = max(_highest(self.irr), 0)
        if (self.tpr >> 4) >= (irrv >> 4) and (self.tpr >> 4) > (isrv >> 4):
            return self.tpr
        return max(self.tpr & 0xF0, isrv & 0xF0, irrv & 0xF0)

    def _deliverable_vector(self) -> int | None:
        """The highest requested vector whose priority class beats the PPR, if any."""
        vector = self._core.deliverable()
        return vector if vector >= 0 else None

    def _pic_passthrough(self) -> bool:
        """Is the 8259 connected to the CPU through LINT0 (virtual-wire mode)? When LINT0 is in ExtINT mode
        and unmasked, or the APIC is disabled (the reset state keeps it unmasked anyway), or an ExtINT
        message arrived (the IOAPIC's virtual-wire fallback for the timer)."""
        if self.pic is None:
            return False
        if self._extint_pending or not self.hardware_enabled:
            return True
        lint0 = self.lvt[LVT_LINT0]
        if (lint0 >> 8) & 7 != DM_EXTINT:
            return False
        return not lint0 & LVT_MASKED or not self.software_enabled

    # -- the InterruptController protocol ----------------------------------------------------------------
    def interrupt_pending(self) -> bool:
        if self._deliverable_vector() is not None:
            return True
        return self._pic_passthrough() and bool(self.pic is not None and self.pic.interrupt_pending())

    def acknowledge_interrupt(self) -> int | None:
        """INTA: the PIC's vector first when it is passed through (ExtINT is not subject to APIC priority,
        KVM takes it first too), else the highest deliverable IRR vector moves to ISR. If the only request
        got masked by a TPR raise since :meth:`interrupt_pending`, the spurious vector is returned."""
        if self._pic_passthrough() and self.pic is not None and self.pic.interrupt_pending():
            self._extint_pending = False
            self._refresh_engine_ack()
            return self.pic.acknowledge_interrupt()
        vector = self._core.ack()
        if vector >= 0:
            if log.enabled("int"):
                log.log("int", f"lapic{self.apic_id}: deliver vector {vector:#x}")
            if vector == self.lvt[LVT_TIMER] & 0xFF and self.timer.take_missed():
                # An owed periodic tick (see ApicTimer): requested again now, taken after this one's EOI.
                self._deliver_lvt(LVT_TIMER)
            self._refresh_engine_ack()  # the backlog may have run out, or been dropped since it was owed
            return vector
        if self.irr and self.software_enabled:
            return self.spurious_vector
        return None

    # -- the ProcessorSignals protocol -------------------------------------------------------------------
    def take_nmi(self) -> bool:
        """True (once) if an NMI is pending; the CPU delivers vector 2 itself."""
        pending, self.nmi_pending = self.nmi_pending, False
        return pending

    def take_init(self) -> bool:
        """True (once) if an INIT arrived since the last call. The APIC already did its INIT reset when
        the message arrived; the vCPU resets itself and waits for a start-up IPI. Ask before
        :meth:`take_startup`: a start-up vector still latched after an INIT arrived after it."""
        pending, self._init_pending = self._init_pending, False
        return pending

    def take_startup(self) -> int | None:
        """The vector of the latest start-up IPI since the last call (once), or None. The vCPU ignores it
        unless it is waiting for SIPI, as KVM does."""
        vector, self._startup_vector = self._startup_vector, None
        return vector

    def eoi(self) -> None:
        """End the highest in-service interrupt; level-triggered vectors are broadcast to the IOAPIC(s)."""
        vector, level_triggered = self._core.eoi()
        if vector < 0:
            return
        if level_triggered:  # TMR keeps the trigger mode until the next acceptance of this vector
            for index in (LVT_LINT0, LVT_LINT1):
                entry = self.lvt[index]
                if entry & LVT_REMOTE_IRR and entry & 0xFF == vector:
                    self.lvt[index] = entry & ~LVT_REMOTE_IRR
                    self._evaluate_lint(index - LVT_LINT0)
            if self.eoi_broadcast is not None:
                self.eoi_broadcast(vector)
        self._maybe_kick()

    # -- CR8 (the TPR seen by 64-bit code as 4 bits) ------------------------------------------------------
    def read_cr8(self) -> int:
        return self.tpr >> 4

    def write_cr8(self, value: int) -> None:
        self.tpr = (value & 0xF) << 4
        self._maybe_kick()

    # -- accepting interrupts ----------------------------------------------------------------------------
    def accept_fixed(self, vector: int, level_triggered: bool = False) -> None:
        """Latch a fixed interrupt in IRR (TMR records its trigger mode). Vectors 0-15 are illegal; fixed
        interrupts are dropped while the APIC is software-disabled (SDM 10.4.7.2)."""
        if vector < 16:
            self._signal_error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return
        if not self.software_enabled or not self.hardware_enabled:
            return
        self._core.accept(vector, level_triggered)
        self._maybe_kick()

    def raise_nmi(self) -> None:
        self.nmi_pending = True
        self._signal_event()

    def accept_message(self, mode: int, vector: int, level_triggered: bool, what: str, *, level: bool = True) -> None:
        """Accept one interrupt message addressed to this APIC: what the APIC bus calls for each destination
        CPU of an IPI or MSI, and what local sources (LVT entries, self IPIs) use too.

        ``mode`` is the delivery mode. Fixed and lowest-priority go to IRR (TMR records ``level_triggered``;
        the choice of *which* APIC gets a lowest-priority message was made by the sender's bus before this
        call); NMI latches for :meth:`take_nmi`; ExtINT makes the next acknowledge take the PIC's vector.
        INIT does the INIT reset (:meth:`init_reset`) and latches for :meth:`take_init`, except the "INIT
        level de-assert" (``level_triggered`` and not ``level``), which modern CPUs ignore. STARTUP latches
        ``vector`` for :meth:`take_startup` (the latest wins). ``what`` names the source in log messages.
        """
        if mode in (DM_FIXED, DM_LOWEST):
            self.accept_fixed(vector, level_triggered)
        elif mode == DM_NMI:
            self.raise_nmi()
        elif mode == DM_EXTINT:
            self._extint_pending = True
            self._refresh_engine_ack()
            self._maybe_kick()
        elif mode == DM_INIT:
            if level_triggered and not level:
                if log.enabled("int"):
                    log.log("int", f"lapic{self.apic_id}: {what} INIT level de-assert ignored")
                return
            if log.enabled("int"):
                log.log("int", f"lapic{self.apic_id}: {what} INIT")
            self.init_reset()
            self._init_pending = True
            self._startup_vector = None  # a start-up IPI that came before the INIT is void (as on KVM)
            self._signal_event()
        elif mode == DM_STARTUP:
            if log.enabled("int"):
                log.log("int", f"lapic{self.apic_id}: {what} start-up vector {vector:#x}")
            self._startup_vector = vector & 0xFF
            self._signal_event()
        elif mode == DM_SMI:
            log.log("unimp", f"lapic{self.apic_id}: {what} SMI ignored (no SMM)")
        else:
            log.log("guest_errors", f"lapic{self.apic_id}: {what} with reserved delivery mode {mode}")

    def matches_destination(self, destination: int, logical: bool) -> bool:
        """Would this APIC accept a message for ``destination`` (8-bit xAPIC destination)?"""
        if destination == 0xFF:
            return True
        if not logical:
            return destination == self.apic_id
        logical_id = self.ldr >> 24
        if self.dfr >> 28 == 0xF:  # flat model: one bit per APIC
            return bool(logical_id & destination)
        if self.dfr >> 28 == 0x0:  # cluster model: cluster in the high nibble, APIC bits in the low
            return (logical_id >> 4) == (destination >> 4) and bool(logical_id & destination & 0xF)
        log.log("guest_errors", f"lapic{self.apic_id}: reserved DFR model {self.dfr >> 28:#x}")
        return False

    def accept_msi(self, message: MsiMessage) -> None:
        """Accept a decoded MSI already known to be for this APIC (the bus checked the destination)."""
        if log.enabled("int"):
            log.log("int", f"lapic{self.apic_id}: MSI vector {message.vector:#x} mode {message.delivery_mode} "
                           f"{'level' if message.level_triggered else 'edge'}")
        self.accept_message(message.delivery_mode, message.vector, message.level_triggered, "MSI")

    def accept_ipi(self, ipi: Ipi) -> None:
        """Accept an IPI another CPU's APIC sent (the bus checked the destination), with its level bit, so
        an INIT level de-assert can be told from an INIT."""
        self.accept_message(ipi.delivery_mode, ipi.vector, ipi.level_triggered, f"IPI from APIC {ipi.source_id}",
                            level=bool(ipi.level))

    # -- the MsiSink protocol (single-CPU boards; with several CPUs the ApicBus is the sink) ----------------
    def deliver_msi(self, address: int, data: int) -> None:
        """An MSI (from the IOAPIC or a device), decoded by :func:`decode_msi`; dropped (and logged) when
        it is not for this CPU."""
        message = decode_msi(address, data)
        if message is None:
            log.log("guest_errors", f"lapic: MSI to address {address:#x} outside 0xfeexxxxx dropped")
            return
        if not self.matches_destination(message.destination, message.logical):
            log.log("guest_errors", f"lapic{self.apic_id}: MSI for {'logical' if message.logical else 'physical'} "
                                    f"destination {message.destination:#x} is not for this CPU; dropped")
            return
        self.accept_msi(message)

    # -- IPIs --------------------------------------------------------------------------------------------
    def _send_ipi(self) -> None:
        """Send the IPI the guest just wrote to ICR low. Who delivers what:

        * This APIC delivers to itself, right here, whenever it is a target: shorthand SELF, shorthand ALL
          (all including self), or a destination field that matches its own ID (broadcast 0xFF, a logical
          set containing it, its physical ID).
        * ``ipi_sink`` gets the IPI whenever another CPU may be a target: shorthands ALL and OTHERS, and
          every destination field except this APIC's own physical ID. The sink (the APIC bus) delivers to
          the *other* CPUs only, never back to the sender, so nothing is delivered twice.
        * Exception, lowest priority (with a sink, any shorthand but SELF): arbitration must see every
          target's priority including ours, so the sender does not deliver to itself and the sink picks
          exactly one target among all of them, possibly the sender. Without a sink (one CPU) the sender
          delivers to itself when it is a target.
        * INIT and start-up aimed at ourselves are ignored (logged): a CPU cannot restart itself this way,
          and the SDM lists them as invalid with the self shorthands. Their share for the others goes to
          the sink as usual.
        * Dropped at the sender, never routed: fixed / lowest-priority vectors 0-15 (send-illegal-vector
          error), the INIT level de-assert (ignored by modern CPUs), and ExtINT (not a valid IPI mode).

        Delivery is synchronous, so the ICR delivery-status bit is idle again before the guest can read it.
        """
        low = self.icr_low
        ipi = Ipi(
            source_id=self.apic_id,
            vector=low & 0xFF,
            delivery_mode=(low >> 8) & 7,
            logical=bool(low & (1 << 11)),
            destination=self.icr_high >> 24,
            shorthand=(low >> 18) & 3,
            level=(low >> 14) & 1,
            level_triggered=bool(low & (1 << 15)),
        )
        mode = ipi.delivery_mode
        if mode in (DM_FIXED, DM_LOWEST) and ipi.vector < 16:
            self._signal_error(ESR_SEND_ILLEGAL_VECTOR)
            return
        if ipi.is_init_deassert:
            if log.enabled("int"):
                log.log("int", f"lapic{self.apic_id}: INIT level de-assert IPI ignored")
            return
        if mode == DM_EXTINT:
            log.log("unimp", f"lapic{self.apic_id}: ExtINT IPI (vector {ipi.vector:#x}) not supported; dropped")
            return
        if mode == DM_LOWEST and ipi.shorthand != SHORTHAND_SELF and self.ipi_sink is not None:
            self.ipi_sink(ipi)  # the bus arbitrates among every target, this APIC included
            return
        to_self, to_others = self._ipi_reach(ipi)
        if to_self:
            if mode in (DM_INIT, DM_STARTUP):
                log.log("unimp", f"lapic{self.apic_id}: {'INIT' if mode == DM_INIT else 'start-up'} IPI to self "
                                 "ignored")
            else:
                self.accept_ipi(ipi)
        if to_others and self.ipi_sink is not None:
            self.ipi_sink(ipi)

    def _ipi_reach(self, ipi: Ipi) -> tuple[bool, bool]:
        """(is this APIC a target, may another CPU be a target) for an IPI this APIC sends."""
        if ipi.shorthand == SHORTHAND_SELF:
            return True, False
        if ipi.shorthand == SHORTHAND_ALL:
            return True, True
        if ipi.shorthand == SHORTHAND_OTHERS:
            return False, True
        to_self = self.matches_destination(ipi.destination, ipi.logical)
        only_us = not ipi.logical and ipi.destination == self.apic_id
        return to_self, not only_us

    # -- local interrupt sources -------------------------------------------------------------------------
    def _deliver_lvt(self, index: int) -> None:
        entry = self.lvt[index]
        if entry & LVT_MASKED:
            return
        mode = (entry >> 8) & 7 if index not in (LVT_TIMER, LVT_ERROR) else DM_FIXED
        vector = entry & 0xFF
        if mode not in _LVT_DELIVERY_MODES:
            log.log("guest_errors", f"lapic{self.apic_id}: LVT {LVT_NAMES[index]} with reserved delivery mode "
                                    f"{mode}; dropped")
            return
        if mode == DM_FIXED:
            if vector < 16:
                if index != LVT_ERROR:  # an illegal error vector must not re-trigger itself
                    self._signal_error(ESR_RECEIVE_ILLEGAL_VECTOR)
                else:
                    self._esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR
                return
            level = index in (LVT_LINT0, LVT_LINT1) and bool(entry & LVT_LEVEL_TRIGGER)
            if level:
                self.lvt[index] = entry | LVT_REMOTE_IRR
            self.accept_fixed(vector, level)
        else:
            self.accept_message(mode, vector, False, f"LVT {LVT_NAMES[index]}")

    def _timer_expired(self) -> None:
        """An expiry of the counter. A masked entry owes nothing; an expiry that finds the previous timer
        interrupt still requested in IRR (the vCPU has not taken it yet) would merge with it, so it is
        owed instead (the timer's backlog, delivered from :meth:`acknowledge_interrupt`)."""
        entry = self.lvt[LVT_TIMER]
        if entry & LVT_MASKED:
            self.timer.clear_backlog()
            return
        if self.irr & (1 << (entry & 0xFF)):
            self.timer.add_missed(1)
            self._refresh_engine_ack()
            self._maybe_kick()  # as a merged expiry did: the vCPU looks again for the interrupt it has not taken
            return
        self._deliver_lvt(LVT_TIMER)

    def _signal_error(self, bits: int) -> None:
        new = bits & ~self._esr_pending
        self._esr_pending |= bits
        if new:
            self._deliver_lvt(LVT_ERROR)

    def raise_thermal(self) -> None:
        """The thermal sensor LVT source (for tests and completeness; nothing in a VM overheats)."""
        self._deliver_lvt(LVT_THERMAL)

    def raise_perf(self) -> None:
        """The performance-counter overflow LVT source."""
        self._deliver_lvt(LVT_PERF)

    def _lint_changed(self, n: int, level: int) -> None:
        old = self._lint_levels[n]
        self._lint_levels[n] = 1 if level else 0
        entry = self.lvt[LVT_LINT0 + n]
        mode = (entry >> 8) & 7
        if mode == DM_EXTINT:
            if level:
                self._maybe_kick()  # the vector comes from the PIC at acknowledge time
            return
        if entry & LVT_LEVEL_TRIGGER and mode == DM_FIXED:
            self._evaluate_lint(n)
        elif level and not old:
            self._deliver_lvt(LVT_LINT0 + n)

    def _evaluate_lint(self, n: int) -> None:
        """Deliver a level-triggered fixed LINT input that is asserted and not already in service."""
        index = LVT_LINT0 + n
        entry = self.lvt[index]
        if (
            self._lint_levels[n]
            and entry & LVT_LEVEL_TRIGGER
            and (entry >> 8) & 7 == DM_FIXED
            and not entry & (LVT_REMOTE_IRR | LVT_MASKED)
        ):
            self._deliver_lvt(index)

    # -- timer helpers -----------------------------------------------------------------------------------
    def set_tsc_deadline(self, tsc_value: int) -> None:
        """IA32_TSC_DEADLINE write (there are no MSR exits under the software CPU; the accelerator or a
        test calls this). Ignored unless the LVT timer is in TSC-deadline mode; 0 disarms."""
        self.timer.set_tsc_deadline(tsc_value)

    def tsc_deadline(self) -> int:
        """IA32_TSC_DEADLINE read: the armed deadline, 0 once it fired."""
        return self.timer.tsc_deadline

    def _maybe_kick(self) -> None:
        if self.kick is not None and self.interrupt_pending():
            self.kick()

    def _signal_event(self) -> None:
        """Wake the vCPU for an NMI, INIT or start-up IPI, which it takes even with interrupts disabled."""
        callback = self.event_kick if self.event_kick is not None else self.kick
        if callback is not None:
            callback()
