"""X86CpuState <-> kvm_regs/kvm_sregs/kvm_msrs conversion (pure: cffi structures, no /dev/kvm)."""

from __future__ import annotations

from pyemu.accel.kvm.abi import ffi
from pyemu.accel.kvm.state import (
    MSR_EFER,
    MSR_FS_BASE,
    MSR_IA32_APIC_BASE,
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    MSR_LSTAR,
    MSR_STAR,
    events_from_dict,
    events_to_dict,
    msrs_to_load,
    new_msrs,
    regs_from_state,
    regs_to_state,
    sregs_from_state,
    sregs_to_state,
)
from pyemu.target.x86.cpu_state import GPR_NAMES, DescriptorTable, Segment, X86CpuState


def sample_state() -> X86CpuState:
    state = X86CpuState()
    state.set_flat_long64(0xFFFFFFFF81000000, 0x1000)
    state.regs = {name: (i + 1) * 0x0101010101010101 for i, name in enumerate(GPR_NAMES)}
    state.regs["r15"] = 0xFFFFFFFFFFFFFFFF
    state.rflags = 0x246
    state.ldt = Segment(0x28, 0x5000, 0x7F, type=2, s=False, unusable=False)
    state.tr = Segment.tss64(0x30, 0xFFFF888000010000)
    state.gdt = DescriptorTable(0xFFFF888000020000, 0x7F)
    state.idt = DescriptorTable(0xFFFFFE0000000000, 0xFFF)
    state.cr2, state.cr8 = 0x1234, 0xF
    state.msrs = {MSR_IA32_APIC_BASE: 0xFEE00D00, MSR_LSTAR: 0xFFFFFFFF81800000}
    return state


def test_general_registers_round_trip():
    state = sample_state()
    regs = ffi.new("struct kvm_regs *")
    regs_from_state(state, regs)
    assert regs.r15 == 0xFFFFFFFFFFFFFFFF and regs.rip == 0xFFFFFFFF81000000
    back = X86CpuState()
    regs_to_state(regs, back)
    assert (back.regs, back.rip, back.rflags) == (state.regs, state.rip, state.rflags)


def test_system_registers_round_trip_with_hidden_segment_state():
    state = sample_state()
    sregs = ffi.new("struct kvm_sregs *")
    sregs.interrupt_bitmap[1] = 1  # left over from a previous KVM_GET_SREGS
    sregs_from_state(state, sregs)
    assert sregs.apic_base == 0xFEE00D00 and list(sregs.interrupt_bitmap) == [0, 0, 0, 0]
    assert sregs.cs.l == 1 and sregs.tr.type == 0xB and sregs.tr.s == 0
    back = X86CpuState()
    sregs_to_state(sregs, back)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3", "cr4", "cr8",
                 "efer"):
        assert getattr(back, name) == getattr(state, name), name
    assert back.msrs[MSR_IA32_APIC_BASE] == 0xFEE00D00


def test_sregs_keep_kvms_apic_base_when_the_state_has_none():
    sregs = ffi.new("struct kvm_sregs *")
    sregs.apic_base = 0xFEE00900
    state = sample_state()
    del state.msrs[MSR_IA32_APIC_BASE]
    sregs_from_state(state, sregs)
    assert sregs.apic_base == 0xFEE00900


def test_msrs_to_load_orders_tsc_first_deadline_last_and_skips_sregs_msrs():
    state = X86CpuState()
    state.msrs = {
        MSR_IA32_TSC_DEADLINE: 5, MSR_LSTAR: 1, MSR_IA32_TSC: 2, MSR_STAR: 3, MSR_EFER: 0x500,
        MSR_FS_BASE: 0x1000, MSR_IA32_APIC_BASE: 0xFEE00900, 0x99999: 4,
    }
    supported = frozenset({MSR_IA32_TSC_DEADLINE, MSR_LSTAR, MSR_IA32_TSC, MSR_STAR, MSR_EFER, MSR_FS_BASE})
    indices, values, unknown = msrs_to_load(state, supported)
    assert indices == [MSR_IA32_TSC, MSR_STAR, MSR_LSTAR, MSR_IA32_TSC_DEADLINE]
    assert values == [2, 3, 1, 5]
    assert unknown == [0x99999]
    msrs, _owner = new_msrs(indices, values)
    assert msrs.nmsrs == 4 and msrs.entries[3].index == MSR_IA32_TSC_DEADLINE and msrs.entries[3].data == 5


def test_vcpu_events_round_trip_through_a_dict():
    events = ffi.new("struct kvm_vcpu_events *")
    events.interrupt.injected, events.interrupt.nr = 1, 0x30
    events.nmi.masked = 1
    events.sipi_vector = 0x9A
    data = events_to_dict(events)
    assert data["interrupt.nr"] == 0x30 and data["sipi_vector"] == 0x9A
    again = ffi.new("struct kvm_vcpu_events *")
    events_from_dict(data, again)
    assert bytes(ffi.buffer(again)) == bytes(ffi.buffer(events))
