"""The local APIC in KVM's terms and in the software CPU's, converted both ways without loss of what the
guest can observe.

Why: a VM saved under ``-accel tcg`` keeps each vCPU's LAPIC in a userspace device
(:class:`~pyemu.hw.intc.lapic.LapicState`, its timer relative to the virtual clock); under ``-accel kvm``
the in-kernel LAPIC travels with the vCPU as KVM's register page. Moving a VM between the accelerators
means translating one into the other, and the page comes from a stream, so it is checked as hostile input.

Where KVM keeps a LAPIC (KVM's api.rst, KVM_GET_LAPIC/KVM_SET_LAPIC: ``struct kvm_lapic_state { char
regs[0x400]; }``, "the data format and layout are the same as documented in the architecture manual"):

* the page, 32-bit registers at 16-byte strides, at the xAPIC MMIO offsets of the SDM's "Local APIC
  Register Address Map" (vol. 3A, 11.4.1): ``0x020`` ID (xAPIC ID in bits 31:24), ``0x030`` version,
  ``0x080`` TPR, ``0x090`` APR, ``0x0A0`` PPR, ``0x0D0`` LDR (logical ID in 31:24), ``0x0E0`` DFR (model in
  31:28, bits 27:0 read as ones), ``0x0F0`` SVR, ``0x100``-``0x170`` ISR, ``0x180``-``0x1F0`` TMR,
  ``0x200``-``0x270`` IRR (eight registers of 32 vectors each, lowest vectors first), ``0x280`` ESR,
  ``0x300``/``0x310`` ICR low/high, ``0x320``-``0x370`` LVT timer, thermal, performance counter, LINT0,
  LINT1, error, ``0x380`` timer initial count, ``0x390`` current count, ``0x3E0`` divide configuration.
  KVM_GET_LAPIC fills ``0x390`` with the count at the moment of the call; KVM_SET_LAPIC restarts the timer
  from the page;
* IA32_APIC_BASE (``kvm_sregs.apic_base``): the global enable (bit 11), BSP flag (bit 8), x2APIC mode
  (bit 10) and the page's address;
* IA32_TSC_DEADLINE (MSR 0x6E0, KVM_GET/SET_MSRS): the deadline in guest TSC cycles when the LVT timer is in
  TSC-deadline mode (LVT timer bits 18:17 = 2);
* ``kvm_vcpu_events.nmi.pending``: an NMI the LAPIC accepted and the CPU has not taken yet.

The userspace model keeps the same registers by name; its timer is an anchor (the count at a moment) plus
an armed expiry, both relative to the moment the state was taken. The conversion goes through the current
count, a guest-visible register, so it needs the timer's input clock (``crystal_hz``: the LAPIC timer
counts at crystal / divide on both accelerators, pyemu's CPUID leaf 0x15 crystal).

Not carried, because KVM has no place for it (each is transient or re-derived): the userspace model's
errors not yet latched into ESR (``esr_pending``; KVM keeps no such latch), an ExtINT acknowledged from the
8259 but not yet taken (the PIC still holds the request), the LINT pin levels (wires outside the APIC, the
board re-drives them), INIT and start-up IPIs latched at the APIC (they travel as the vCPU's MP state and
SIPI vector, see :mod:`pyemu.migration.cross_accel`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyemu.hw.core.state import StateError, check_range
from pyemu.hw.intc.lapic import (
    APIC_DEFAULT_BASE,
    APIC_VERSION,
    LVT_COUNT,
    LVT_TIMER,
    REG_DFR,
    REG_ESR,
    REG_ICR_HIGH,
    REG_ICR_LOW,
    REG_ID,
    REG_IRR,
    REG_ISR,
    REG_LDR,
    REG_LVT_TIMER,
    REG_PPR,
    REG_SVR,
    REG_TIMER_CURRENT,
    REG_TIMER_DIVIDE,
    REG_TIMER_INITIAL,
    REG_TMR,
    REG_TPR,
    REG_VERSION,
    LapicState,
    LocalApic,
)
from pyemu.hw.intc.lapic_timer import (
    MODE_ONESHOT,
    MODE_PERIODIC,
    MODE_TSC_DEADLINE,
    NS_PER_S,
    ApicTimer,
    ApicTimerState,
    divide_value,
)

KVM_APIC_REG_SIZE = 0x400
"""``sizeof(struct kvm_lapic_state)``: the first 1 KiB of the 4 KiB xAPIC page (every register lives there)."""

APIC_BASE_BSP = 1 << 8
APIC_BASE_X2APIC = 1 << 10
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_ADDRESS_MASK = 0xFFFFFF000
"""IA32_APIC_BASE bits (SDM 11.4.4): BSP flag, x2APIC mode, global enable, base address (bits 35:12 here)."""

ICR_DELIVERY_STATUS = 1 << 12
"""ICR low bit 12 ("send pending"): status set by the APIC itself, never state to carry (KVM clears it too)."""
ICR_LOW_STORED = 0x000CCFFF
"""ICR low bits an xAPIC keeps (SDM 11.6.1): vector 7:0, delivery mode 10:8, destination mode 11, level 14,
trigger mode 15, shorthand 19:18. KVM stores whatever the guest wrote there (minus bit 12); the software
CPU's APIC keeps these bits of the same write, so the conversion keeps them too rather than refusing."""
LVT_DELIVERY_STATUS = 1 << 12
"""LVT bit 12: read-only delivery status, idle whenever software can look."""

_LVT_TIMER_MODE_SHIFT = 17
_TIMER_MODES = {0: MODE_ONESHOT, 1: MODE_PERIODIC, 2: MODE_TSC_DEADLINE}
_U32 = struct.Struct("<I")
_NAME = "lapic"


@dataclass(frozen=True)
class KvmLapic:
    """One vCPU's LAPIC as KVM holds it, in the four places listed in the module docstring."""

    page: bytes
    """``kvm_lapic_state.regs`` (:data:`KVM_APIC_REG_SIZE` bytes)."""
    apic_base: int
    """IA32_APIC_BASE."""
    tsc_deadline: int = 0
    """IA32_TSC_DEADLINE (0: not armed)."""
    nmi_pending: bool = False
    """``kvm_vcpu_events.nmi.pending``."""


def _get(page: bytes, offset: int) -> int:
    value: int = _U32.unpack_from(page, offset)[0]
    return value


def _put(page: bytearray, offset: int, value: int) -> None:
    _U32.pack_into(page, offset, value & 0xFFFFFFFF)


def _get_256(page: bytes, base: int) -> int:
    """A 256-bit vector register (ISR/TMR/IRR) from its eight 32-bit parts at 16-byte strides."""
    return sum(_get(page, base + 16 * i) << (32 * i) for i in range(8))


def _put_256(page: bytearray, base: int, value: int) -> None:
    for i in range(8):
        _put(page, base + 16 * i, value >> (32 * i))


def processor_priority(tpr: int, isr: int) -> int:
    """PPR (SDM 11.8.3.1): the TPR when its class is at least the highest in-service vector's class, else
    that class. KVM recomputes it on KVM_SET_LAPIC; it is written so the page reads as the APIC would."""
    isrv = isr.bit_length() - 1 if isr else 0
    return tpr & 0xFF if (tpr >> 4) >= (isrv >> 4) else isrv & 0xF0


# -- the timer ----------------------------------------------------------------------------------------------
def timer_current_count(timer: ApicTimerState, crystal_hz: int) -> int:
    """The current-count register of a saved userspace timer at the moment its state was taken (what
    :meth:`ApicTimer.current_count` read then): the anchor count minus the ticks since the anchor, reloading
    from the initial count in periodic mode; 0 when stopped or in TSC-deadline mode."""
    if not timer.running or timer.mode == MODE_TSC_DEADLINE:
        return 0
    ticks = timer.anchor_age_ns * crystal_hz // (divide_value(timer.divide_config) * NS_PER_S)
    if ticks < timer.anchor_count:
        return timer.anchor_count - ticks
    if timer.mode == MODE_PERIODIC and timer.initial_count:
        return timer.initial_count - (ticks - timer.anchor_count) % timer.initial_count
    return 0


def _timer_from_registers(mode: int, divide_config: int, initial: int, current: int, deadline: int,
                          crystal_hz: int) -> ApicTimerState:
    """A userspace timer state anchored now at ``current`` (the count KVM read), due when it reaches 0; in
    TSC-deadline mode armed exactly when a deadline is set (the model converts it against the guest TSC)."""
    if mode == MODE_TSC_DEADLINE:
        if initial or current:
            raise StateError(_NAME, f"initial/current count {initial:#x}/{current:#x} in TSC-deadline mode")
        return ApicTimerState(mode=mode, divide_config=divide_config, initial_count=0, running=False,
                              anchor_age_ns=0, anchor_count=0, next_expiry=0, tsc_deadline=deadline,
                              remaining_ns=0 if deadline else None)
    if deadline:
        raise StateError(_NAME, f"TSC deadline {deadline:#x} while the LVT timer is not in TSC-deadline mode")
    if current > initial:
        raise StateError(_NAME, f"current count {current:#x} above the initial count {initial:#x}")
    # A periodic timer with an initial count never stops; KVM reads its count as 0 when the expiry is due
    # at the moment of KVM_GET_LAPIC (or overdue), which is "fire now, then reload", not "stopped".
    running = current > 0 or (mode == MODE_PERIODIC and initial > 0)
    remaining = -(-current * divide_value(divide_config) * NS_PER_S // crystal_hz) if running else None
    # (a due periodic timer: anchored at count 0, armed now; its next expiry is a whole period later)
    return ApicTimerState(mode=mode, divide_config=divide_config, initial_count=initial, running=running,
                          anchor_age_ns=0, anchor_count=current, next_expiry=0, tsc_deadline=0,
                          remaining_ns=remaining)


# -- userspace -> KVM ----------------------------------------------------------------------------------------
def to_kvm(state: LapicState, *, crystal_hz: int, bsp: bool) -> KvmLapic:
    """The KVM form of a userspace LAPIC state (checked first: StateError, nothing converted). ``bsp`` sets
    IA32_APIC_BASE's BSP flag (the userspace model keeps it as board wiring, not state)."""
    s = LocalApic.check_saved_state(state)
    ApicTimer.check_state(s.timer)
    check_range(_NAME, "crystal_hz", crystal_hz, 1, 1 << 40)
    page = bytearray(KVM_APIC_REG_SIZE)
    _put(page, REG_ID, s.apic_id << 24)
    _put(page, REG_VERSION, APIC_VERSION)
    _put(page, REG_TPR, s.tpr)
    _put(page, REG_PPR, processor_priority(s.tpr, s.isr))
    _put(page, REG_LDR, s.ldr)
    _put(page, REG_DFR, s.dfr)
    _put(page, REG_SVR, s.svr)
    _put_256(page, REG_ISR, s.isr)
    _put_256(page, REG_TMR, s.tmr)
    _put_256(page, REG_IRR, s.irr)
    _put(page, REG_ESR, s.esr)
    _put(page, REG_ICR_LOW, s.icr_low)
    _put(page, REG_ICR_HIGH, s.icr_high)
    for index in range(LVT_COUNT):
        _put(page, REG_LVT_TIMER + 16 * index, s.lvt[index])
    _put(page, REG_TIMER_INITIAL, s.timer.initial_count)
    _put(page, REG_TIMER_CURRENT, timer_current_count(s.timer, crystal_hz))
    _put(page, REG_TIMER_DIVIDE, s.timer.divide_config)
    apic_base = APIC_DEFAULT_BASE | (APIC_BASE_ENABLE if s.hardware_enabled else 0) | (APIC_BASE_BSP if bsp else 0)
    deadline = s.timer.tsc_deadline if s.timer.mode == MODE_TSC_DEADLINE else 0
    return KvmLapic(bytes(page), apic_base, deadline, s.nmi_pending)


# -- KVM -> userspace ----------------------------------------------------------------------------------------
def from_kvm(kvm: KvmLapic, *, crystal_hz: int) -> LapicState:
    """The userspace form of KVM's LAPIC, checked as untrusted input: StateError names the first value the
    software CPU's xAPIC cannot hold (x2APIC mode, another base address, reserved bits, a timer that
    contradicts itself), and nothing is converted. The userspace model's own check runs last."""
    page = kvm.page
    if not isinstance(page, (bytes, bytearray)) or len(page) != KVM_APIC_REG_SIZE:
        size = len(page) if isinstance(page, (bytes, bytearray)) else type(page).__name__
        raise StateError(_NAME, f"the KVM LAPIC page is {size} bytes, not {KVM_APIC_REG_SIZE}")
    check_range(_NAME, "apic_base", kvm.apic_base, 0, (1 << 64) - 1)
    check_range(_NAME, "tsc_deadline", kvm.tsc_deadline, 0, (1 << 64) - 1)
    check_range(_NAME, "crystal_hz", crystal_hz, 1, 1 << 40)
    if not isinstance(kvm.nmi_pending, bool):
        raise StateError(_NAME, f"nmi_pending={kvm.nmi_pending!r} is not a bool")
    if kvm.apic_base & APIC_BASE_X2APIC:
        raise StateError(_NAME, "the LAPIC is in x2APIC mode, which the software CPU's xAPIC cannot take")
    base = kvm.apic_base & APIC_BASE_ADDRESS_MASK
    if kvm.apic_base & APIC_BASE_ENABLE and base != APIC_DEFAULT_BASE:
        raise StateError(_NAME, f"the LAPIC was moved to {base:#x}; the software CPU's sits at "
                                f"{APIC_DEFAULT_BASE:#x}")
    apic_id_reg = _get(page, REG_ID)
    if apic_id_reg & 0x00FFFFFF:
        raise StateError(_NAME, f"ID register {apic_id_reg:#x}: bits 23:0 are reserved in xAPIC mode")
    lvt = tuple(_get(page, REG_LVT_TIMER + 16 * i) & ~LVT_DELIVERY_STATUS for i in range(LVT_COUNT))
    timer_mode_bits = (lvt[LVT_TIMER] >> _LVT_TIMER_MODE_SHIFT) & 3
    if timer_mode_bits not in _TIMER_MODES:
        raise StateError(_NAME, "LVT timer mode 3 is reserved")
    divide_config = _get(page, REG_TIMER_DIVIDE)
    if divide_config & ~0b1011:
        raise StateError(_NAME, f"divide configuration {divide_config:#x} sets reserved bits")
    timer = _timer_from_registers(_TIMER_MODES[timer_mode_bits], divide_config, _get(page, REG_TIMER_INITIAL),
                                  _get(page, REG_TIMER_CURRENT), kvm.tsc_deadline, crystal_hz)
    state = LapicState(
        apic_id=apic_id_reg >> 24, tpr=_get(page, REG_TPR), ldr=_get(page, REG_LDR), dfr=_get(page, REG_DFR),
        svr=_get(page, REG_SVR), irr=_get_256(page, REG_IRR), isr=_get_256(page, REG_ISR),
        tmr=_get_256(page, REG_TMR), esr=_get(page, REG_ESR), esr_pending=0,
        icr_low=_get(page, REG_ICR_LOW) & ICR_LOW_STORED, icr_high=_get(page, REG_ICR_HIGH), lvt=lvt,
        lint_levels=(0, 0), nmi_pending=kvm.nmi_pending, extint_pending=False,
        hardware_enabled=bool(kvm.apic_base & APIC_BASE_ENABLE), timer=timer)
    LocalApic.check_saved_state(state)
    ApicTimer.check_state(state.timer)
    return state


__all__ = ["KVM_APIC_REG_SIZE", "KvmLapic", "from_kvm", "processor_priority", "timer_current_count", "to_kvm"]
