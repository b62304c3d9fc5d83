"""Conversion between pyemu's :class:`X86CpuState` and KVM's register structures.

The shared state type is what lets a snapshot taken under one accelerator continue under the other, so the
mapping is explicit and total: general registers <-> ``kvm_regs``; segments, descriptor tables, control
registers and EFER <-> ``kvm_sregs``; IA32_APIC_BASE (kept in ``kvm_sregs.apic_base`` by KVM) travels as
MSR 0x1B in ``X86CpuState.msrs``; the other MSRs <-> ``kvm_msrs``. FS/GS base and EFER also exist as MSRs,
but the segment and ``efer`` fields are authoritative, so those MSR numbers are never written separately.

State outside X86CpuState that KVM keeps per vCPU (local APIC registers, pending events, MP state, FPU/SSE
registers) is carried by :class:`KvmVcpuExtras` until X86CpuState grows fields for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyemu.accel.kvm.abi import ffi
from pyemu.target.x86.cpu_state import GPR_NAMES, DescriptorTable, Segment, X86CpuState

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
    """Fill a ``struct kvm_sregs`` (read from KVM first, so ``apic_base`` stays unless the state has MSR
    0x1B). The interrupt bitmap is cleared: a pending interrupt travels in the vCPU events instead."""
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
    if MSR_IA32_APIC_BASE in state.msrs:
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
    state.msrs[MSR_IA32_APIC_BASE] = int(sregs.apic_base)


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


# -- state beyond X86CpuState -----------------------------------------------------------------------------
@dataclass
class KvmVcpuExtras:
    """Per-vCPU state KVM holds that X86CpuState has no fields for yet, as plain data (bytes/ints), so a
    snapshot can store it. ``lapic`` is the 1 KiB xAPIC register page (the same layout the userspace LAPIC
    model uses); ``fpu`` the raw ``kvm_fpu`` (x87/SSE registers, MXCSR)."""

    lapic: bytes = b""
    mp_state: int = 0
    events: dict[str, int] = field(default_factory=dict)
    fpu: bytes = b""


EVENT_FIELDS = (
    ("exception", ("injected", "nr", "has_error_code", "pending", "error_code")),
    ("interrupt", ("injected", "nr", "soft", "shadow")),
    ("nmi", ("injected", "pending", "masked")),
    ("smi", ("smm", "pending", "smm_inside_nmi", "latched_init")),
)


def events_to_dict(events: Any) -> dict[str, int]:
    """``struct kvm_vcpu_events`` as a flat dict ("interrupt.nr": 32, ...)."""
    out: dict[str, int] = {"sipi_vector": int(events.sipi_vector), "flags": int(events.flags)}
    for group, names in EVENT_FIELDS:
        part = getattr(events, group)
        for name in names:
            out[f"{group}.{name}"] = int(getattr(part, name))
    out["triple_fault.pending"] = int(events.triple_fault.pending)
    return out


def events_from_dict(values: dict[str, int], events: Any) -> None:
    for key, value in values.items():
        target = events
        *path, leaf = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, leaf, value)
