"""Conversion between pyemu's :class:`X86CpuState` and KVM's register structures.

The shared state type is what lets a snapshot taken under one accelerator continue under the other, so the
mapping is explicit and total: general registers <-> ``kvm_regs``; segments, descriptor tables, control
registers and EFER <-> ``kvm_sregs``; IA32_APIC_BASE (kept in ``kvm_sregs.apic_base`` by KVM) <->
``X86CpuState.apic_base`` (a state that only has MSR 0x1B in ``msrs`` is loaded from there); the other
MSRs <-> ``kvm_msrs``. FS/GS base and EFER also exist as MSRs,
but the segment and ``efer`` fields are authoritative, so those MSR numbers are never written separately.

The snapshot-only parts map one to one: ``fpu`` <-> ``kvm_fpu`` or the legacy region of ``kvm_xsave``,
``xsave`` <-> the rest of ``kvm_xsave`` plus XCR0 from ``kvm_xcrs``, ``lapic`` <-> ``kvm_lapic_state``,
``events`` <-> ``kvm_vcpu_events``, ``mp_state`` <-> ``kvm_mp_state``; the functions below convert, and
:class:`~pyemu.accel.kvm.vcpu.KvmVcpu` orders the ioctls.
"""

from __future__ import annotations

import errno
from typing import Any

from pyemu.accel.kvm import abi
from pyemu.accel.kvm.abi import ffi
from pyemu.accel.kvm.errors import KvmStateError
from pyemu.target.x86.cpu_state import (
    FXSAVE_SIZE,
    GPR_NAMES,
    LAPIC_PAGE_SIZE,
    DescriptorTable,
    FpuState,
    MpState,
    PendingEvents,
    Segment,
    X86CpuState,
    XsaveComponents,
)

MSR_IA32_TSC = 0x10
MSR_IA32_APIC_BASE = 0x1B
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_PAT = 0x277
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_STEAL_TIME = 0x4B564D03
MSR_KVM_PV_EOI_EN = 0x4B564D04

SAVED_MSRS: tuple[int, ...] = (
    # TSC first: KVM derives the TSC offset from it, and TSC_DEADLINE/TSC_ADJUST are relative to it.
    MSR_IA32_TSC,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SFMASK,
    MSR_KERNEL_GS_BASE,
    MSR_TSC_AUX,
    MSR_IA32_PAT,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_TSC_ADJUST,
    MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_STEAL_TIME,
    MSR_KVM_PV_EOI_EN,
    MSR_IA32_TSC_DEADLINE,
)
"""MSRs :func:`KvmVcpu.save_state` reads (those of them KVM lists in KVM_GET_MSR_INDEX_LIST)."""

MSRS_CARRIED_ELSEWHERE = frozenset({MSR_EFER, MSR_FS_BASE, MSR_GS_BASE, MSR_IA32_APIC_BASE})
"""MSR numbers whose value lives in kvm_sregs (segment bases, EFER, APIC base), never in KVM_SET_MSRS."""


# -- general registers ------------------------------------------------------------------------------------
def regs_from_state(state: X86CpuState, regs: Any) -> None:
    """Fill a ``struct kvm_regs`` from ``state``."""
    for name in GPR_NAMES:
        setattr(regs, name, state.regs.get(name, 0) & 0xFFFFFFFFFFFFFFFF)
    regs.rip = state.rip
    regs.rflags = state.rflags


def regs_to_state(regs: Any, state: X86CpuState) -> None:
    state.regs = {name: int(getattr(regs, name)) for name in GPR_NAMES}
    state.rip = int(regs.rip)
    state.rflags = int(regs.rflags)


# -- segments and system registers ------------------------------------------------------------------------
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def segment_to_kvm(segment: Segment, out: Any) -> None:
    out.base = segment.base
    out.limit = segment.limit
    out.selector = segment.selector
    out.type = segment.type
    out.present = int(segment.present)
    out.dpl = segment.dpl
    out.db = int(segment.db)
    out.s = int(segment.s)
    out.l = int(segment.l)
    out.g = int(segment.g)
    out.avl = 0
    out.unusable = int(segment.unusable)
    out.padding = 0


def segment_from_kvm(seg: Any) -> Segment:
    return Segment(
        selector=int(seg.selector),
        base=int(seg.base),
        limit=int(seg.limit),
        type=int(seg.type),
        present=bool(seg.present),
        dpl=int(seg.dpl),
        db=bool(seg.db),
        s=bool(seg.s),
        l=bool(seg.l),
        g=bool(seg.g),
        unusable=bool(seg.unusable),
    )


def sregs_from_state(state: X86CpuState, sregs: Any) -> None:
    """Fill a ``struct kvm_sregs`` (read from KVM first, so ``apic_base`` stays unless the state has one:
    ``state.apic_base``, else MSR 0x1B in ``state.msrs``). The interrupt bitmap is cleared: a pending
    interrupt travels in the vCPU events instead."""
    for name in _SEGMENTS:
        segment_to_kvm(getattr(state, name), getattr(sregs, name))
    for name in ("gdt", "idt"):
        table: DescriptorTable = getattr(state, name)
        getattr(sregs, name).base = table.base
        getattr(sregs, name).limit = table.limit
    sregs.cr0 = state.cr0
    sregs.cr2 = state.cr2
    sregs.cr3 = state.cr3
    sregs.cr4 = state.cr4
    sregs.cr8 = state.cr8
    sregs.efer = state.efer
    if state.apic_base is not None:
        sregs.apic_base = state.apic_base
    elif MSR_IA32_APIC_BASE in state.msrs:
        sregs.apic_base = state.msrs[MSR_IA32_APIC_BASE]
    for i in range(4):
        sregs.interrupt_bitmap[i] = 0


def sregs_to_state(sregs: Any, state: X86CpuState) -> None:
    for name in _SEGMENTS:
        setattr(state, name, segment_from_kvm(getattr(sregs, name)))
    state.gdt = DescriptorTable(int(sregs.gdt.base), int(sregs.gdt.limit))
    state.idt = DescriptorTable(int(sregs.idt.base), int(sregs.idt.limit))
    state.cr0 = int(sregs.cr0)
    state.cr2 = int(sregs.cr2)
    state.cr3 = int(sregs.cr3)
    state.cr4 = int(sregs.cr4)
    state.cr8 = int(sregs.cr8)
    state.efer = int(sregs.efer)
    state.apic_base = int(sregs.apic_base)


# -- MSRs -------------------------------------------------------------------------------------------------
def new_msrs(indices: list[int], values: list[int] | None = None) -> tuple[Any, Any]:
    """A ``struct kvm_msrs`` with ``len(indices)`` entries; returns (pointer, owner buffer)."""
    raw = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(indices) * ffi.sizeof("struct kvm_msr_entry"))
    msrs = ffi.cast("struct kvm_msrs *", raw)
    msrs.nmsrs = len(indices)
    for i, index in enumerate(indices):
        msrs.entries[i].index = index
        msrs.entries[i].data = values[i] if values is not None else 0
    return msrs, raw


def msrs_to_load(state: X86CpuState, supported: frozenset[int]) -> tuple[list[int], list[int], list[int]]:
    """Split ``state.msrs`` into (indices, values) to write with KVM_SET_MSRS, TSC first and TSC_DEADLINE
    last, plus the indices KVM does not know (the caller logs them)."""
    rank = {MSR_IA32_TSC: 0, MSR_IA32_TSC_DEADLINE: 2}
    wanted = sorted((i for i in state.msrs if i not in MSRS_CARRIED_ELSEWHERE), key=lambda i: (rank.get(i, 1), i))
    indices = [i for i in wanted if i in supported]
    unknown = [i for i in wanted if i not in supported]
    return indices, [state.msrs[i] & 0xFFFFFFFFFFFFFFFF for i in indices], unknown


# -- FPU / SSE / XSAVE ------------------------------------------------------------------------------------
XSAVE_AREA_SIZE = 4096
"""``struct kvm_xsave``: the legacy region, the XSAVE header and the extended components (standard format)."""
XFEATURE_X87 = 1 << 0
XFEATURE_SSE = 1 << 1
"""XSTATE_BV bits of the legacy x87 and SSE components."""
XCR_XCR0 = 0


def fpu_from_kvm(fpu: Any) -> FpuState:
    """``struct kvm_fpu`` -> FpuState (KVM_GET_FPU has no MXCSR_MASK; it reads as 0)."""
    return FpuState(
        fcw=int(fpu.fcw),
        fsw=int(fpu.fsw),
        ftw=int(fpu.ftwx),
        last_opcode=int(fpu.last_opcode),
        last_ip=int(fpu.last_ip),
        last_dp=int(fpu.last_dp),
        st=tuple(bytes(ffi.buffer(fpu.fpr[i], 16))[:10] for i in range(8)),
        mxcsr=int(fpu.mxcsr),
        xmm=tuple(bytes(ffi.buffer(fpu.xmm[i], 16)) for i in range(16)),
    )


def fpu_to_kvm(state: FpuState, fpu: Any) -> None:
    ffi.memmove(fpu, bytes(ffi.sizeof("struct kvm_fpu")), ffi.sizeof("struct kvm_fpu"))
    fpu.fcw, fpu.fsw, fpu.ftwx = state.fcw, state.fsw, state.ftw
    fpu.last_opcode, fpu.last_ip, fpu.last_dp = state.last_opcode, state.last_ip, state.last_dp
    for i, reg in enumerate(state.st):
        ffi.memmove(fpu.fpr[i], reg, 10)
    for i, reg in enumerate(state.xmm):
        ffi.memmove(fpu.xmm[i], reg, 16)
    fpu.mxcsr = state.mxcsr


def xsave_split(area: bytes, xcr0: int) -> tuple[FpuState, XsaveComponents]:
    """A ``kvm_xsave`` region -> the legacy registers and the opaque rest (header + components)."""
    return FpuState.from_fxsave(area[:FXSAVE_SIZE]), XsaveComponents(xcr0, bytes(area[FXSAVE_SIZE:]))


def xsave_join(fpu: FpuState | None, xsave: XsaveComponents, current: bytes) -> bytes:
    """The ``kvm_xsave`` region to load: the legacy region from ``fpu`` (or from ``current``, the
    vCPU's own, when the state has no FPU part), then ``xsave.area``. XRSTOR resets a component whose
    XSTATE_BV bit is clear to its init values and ignores the region, so when ``fpu`` holds non-init x87
    or SSE registers (say, a state captured by another accelerator) their bits are set; registers still in
    their init state leave XSTATE_BV as captured, so a save/load/save round trip is exact."""
    legacy = fpu.to_fxsave() if fpu is not None else current[:FXSAVE_SIZE]
    rest = bytearray(xsave.area[: XSAVE_AREA_SIZE - FXSAVE_SIZE])
    rest.extend(bytes(XSAVE_AREA_SIZE - FXSAVE_SIZE - len(rest)))
    if fpu is not None:
        bv = int.from_bytes(rest[:8], "little") | _legacy_in_use(fpu)
        rest[:8] = bv.to_bytes(8, "little")
    return legacy + bytes(rest)


_X87_INIT = FpuState()


def _legacy_in_use(fpu: FpuState) -> int:
    """XSTATE_BV bits of the legacy components whose registers differ from their init values."""
    x87 = (fpu.fcw, fpu.fsw, fpu.ftw, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.st) != (
        _X87_INIT.fcw, _X87_INIT.fsw, _X87_INIT.ftw, 0, 0, 0, _X87_INIT.st)
    sse = fpu.xmm != _X87_INIT.xmm or fpu.mxcsr != _X87_INIT.mxcsr
    return (XFEATURE_X87 if x87 else 0) | (XFEATURE_SSE if sse else 0)


# -- local APIC -------------------------------------------------------------------------------------------
def lapic_to_kvm(page: bytes, out: Any) -> None:
    if len(page) != LAPIC_PAGE_SIZE:
        raise KvmStateError("KVM_SET_LAPIC", errno.EINVAL,
                            f"LAPIC page must be {LAPIC_PAGE_SIZE} bytes, got {len(page)}")
    ffi.memmove(out, page, LAPIC_PAGE_SIZE)


# -- pending events ---------------------------------------------------------------------------------------
EVENT_FLAGS = abi.KVM_VCPUEVENT_VALID_NMI_PENDING | abi.KVM_VCPUEVENT_VALID_SIPI_VECTOR | abi.KVM_VCPUEVENT_VALID_SHADOW
"""What :func:`events_to_kvm` sets. Not SMM (pyemu has no SMM) nor the exception payload (its capability is
not enabled, so KVM reports pending exceptions as injected, the way they are then restored)."""


def events_from_kvm(events: Any) -> PendingEvents:
    exc, intr, nmi = events.exception, events.interrupt, events.nmi
    has_exception = bool(exc.injected or exc.pending)
    return PendingEvents(
        exception_vector=int(exc.nr) if has_exception else None,
        exception_error_code=int(exc.error_code) if has_exception and exc.has_error_code else None,
        exception_injected=bool(exc.injected) if has_exception else True,
        interrupt_vector=int(intr.nr) if intr.injected else None,
        interrupt_soft=bool(intr.soft),
        interrupt_shadow=int(intr.shadow),
        nmi_injected=bool(nmi.injected),
        nmi_pending=bool(nmi.pending),
        nmi_masked=bool(nmi.masked),
        sipi_vector=int(events.sipi_vector),
    )


def events_to_kvm(state: PendingEvents, events: Any) -> None:
    """Fill a zeroed ``struct kvm_vcpu_events``. Without the exception-payload capability KVM only knows
    "injected" exceptions, so a pending one is restored as injected (delivered first on resume either way)."""
    if state.exception_vector is not None:
        events.exception.injected = 1
        events.exception.nr = state.exception_vector
        events.exception.has_error_code = int(state.exception_error_code is not None)
        events.exception.error_code = state.exception_error_code or 0
    if state.interrupt_vector is not None:
        events.interrupt.injected = 1
        events.interrupt.nr = state.interrupt_vector
        events.interrupt.soft = int(state.interrupt_soft)
    events.interrupt.shadow = state.interrupt_shadow
    events.nmi.injected = int(state.nmi_injected)
    events.nmi.pending = int(state.nmi_pending)
    events.nmi.masked = int(state.nmi_masked)
    events.sipi_vector = state.sipi_vector
    events.flags = EVENT_FLAGS


# -- MP state ---------------------------------------------------------------------------------------------
MP_STATE_TO_KVM: dict[MpState, int] = {
    MpState.RUNNABLE: abi.KVM_MP_STATE_RUNNABLE,
    MpState.WAIT_FOR_SIPI: abi.KVM_MP_STATE_UNINITIALIZED,
    MpState.HALTED: abi.KVM_MP_STATE_HALTED,
    MpState.INIT_RECEIVED: abi.KVM_MP_STATE_INIT_RECEIVED,
    MpState.SIPI_RECEIVED: abi.KVM_MP_STATE_SIPI_RECEIVED,
}
MP_STATE_FROM_KVM: dict[int, MpState] = {value: key for key, value in MP_STATE_TO_KVM.items()}
