"""X86CpuState <-> kvm_regs/kvm_sregs/kvm_msrs/kvm_fpu/kvm_xsave/kvm_vcpu_events conversion (pure: cffi
structures, no /dev/kvm)."""

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
    EVENT_FLAGS,
    MP_STATE_FROM_KVM,
    MP_STATE_TO_KVM,
    XSAVE_AREA_SIZE,
    events_from_kvm,
    events_to_kvm,
    fpu_from_kvm,
    fpu_to_kvm,
    lapic_to_kvm,
    msrs_to_load,
    new_msrs,
    regs_from_state,
    regs_to_state,
    sregs_from_state,
    sregs_to_state,
    xsave_join,
    xsave_split,
)
from pyemu.accel.kvm import abi
from pyemu.accel.kvm.errors import KvmStateError
from pyemu.target.x86.cpu_state import (
    GPR_NAMES,
    DescriptorTable,
    FpuState,
    MpState,
    PendingEvents,
    Segment,
    X86CpuState,
    XsaveComponents,
)


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
    state.apic_base = 0xFEE00D00
    state.msrs = {MSR_LSTAR: 0xFFFFFFFF81800000}
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
    assert back.apic_base == 0xFEE00D00 and MSR_IA32_APIC_BASE not in back.msrs


def test_sregs_keep_kvms_apic_base_when_the_state_has_none():
    sregs = ffi.new("struct kvm_sregs *")
    sregs.apic_base = 0xFEE00900
    state = sample_state()
    state.apic_base = None
    sregs_from_state(state, sregs)
    assert sregs.apic_base == 0xFEE00900


def test_sregs_take_the_apic_base_from_msr_0x1b_when_only_the_msr_is_given():
    sregs = ffi.new("struct kvm_sregs *")
    state = sample_state()
    state.apic_base = None
    state.msrs[MSR_IA32_APIC_BASE] = 0xFEE00800
    sregs_from_state(state, sregs)
    assert sregs.apic_base == 0xFEE00800
    state.apic_base = 0xFEE00900  # the field wins over the MSR
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


def sample_fpu() -> FpuState:
    return FpuState(
        fcw=0x027F, fsw=0x3800, ftw=0x80, last_opcode=0x1E8, last_ip=0x10020, last_dp=0x90000,
        st=tuple(bytes([0x10 + i]) * 10 for i in range(8)), mxcsr=0x7F80,
        xmm=tuple(bytes([0xA0 + i]) * 16 for i in range(16)),
    )


def test_fpu_round_trips_through_kvm_fpu_and_matches_the_fxsave_layout():
    fpu = sample_fpu()
    raw = ffi.new("struct kvm_fpu *")
    fpu_to_kvm(fpu, raw)
    assert raw.fcw == 0x027F and raw.ftwx == 0x80 and raw.mxcsr == 0x7F80
    assert bytes(ffi.buffer(raw.fpr[7], 16)) == bytes([0x17]) * 10 + bytes(6)
    assert fpu_from_kvm(raw) == fpu
    area = fpu.to_fxsave()
    # FXSAVE offsets from the SDM: FCW 0, FTW 4, MXCSR 24, ST0 32, XMM0 160, XMM15 400.
    assert area[0:2] == b"\x7f\x02" and area[4] == 0x80 and area[24:28] == (0x7F80).to_bytes(4, "little")
    assert area[32:42] == bytes([0x10]) * 10 and area[400:416] == bytes([0xAF]) * 16
    assert FpuState.from_fxsave(area) == fpu


def test_fpu_state_rejects_wrong_register_sizes():
    import pytest

    with pytest.raises(ValueError):
        FpuState(xmm=(bytes(16),) * 15)
    with pytest.raises(ValueError):
        FpuState(st=(bytes(8),) * 8)


def test_xsave_area_splits_into_legacy_registers_and_opaque_components_and_joins_back():
    fpu = sample_fpu()
    header = (0x4).to_bytes(8, "little") + bytes(56)  # XSTATE_BV: AVX only (x87/SSE "in init state")
    ymm_hi = bytes(range(256))
    area = fpu.to_fxsave() + header + ymm_hi + bytes(XSAVE_AREA_SIZE - 512 - 64 - 256)
    legacy, rest = xsave_split(area, xcr0=0x7)
    assert legacy == fpu and rest == XsaveComponents(0x7, area[512:]) and rest.xstate_bv == 0x4
    joined = xsave_join(legacy, rest, b"")
    # The legacy registers must be taken from the region on load: XSTATE_BV gains x87|SSE.
    assert int.from_bytes(joined[512:520], "little") == 0x7
    assert joined[:512] == area[:512] and joined[520:] == area[520:] and len(joined) == XSAVE_AREA_SIZE
    # Registers in their init state leave XSTATE_BV as captured (exact round trips).
    assert xsave_join(FpuState(), rest, b"")[512:520] == (0x4).to_bytes(8, "little")
    assert xsave_join(FpuState(mxcsr=0x7F80), rest, b"")[512] == 0x6
    # Without an FPU part the vCPU's current legacy region is kept, and XSTATE_BV is left alone.
    current = FpuState().to_fxsave() + bytes(XSAVE_AREA_SIZE - 512)
    kept = xsave_join(None, rest, current)
    assert kept[:512] == current[:512] and kept[512:] == area[512:]


def test_lapic_page_must_be_one_kib():
    import pytest

    out = ffi.new("struct kvm_lapic_state *")
    lapic_to_kvm(bytes(range(256)) * 4, out)
    assert bytes(ffi.buffer(out))[0x80] == 0x80
    with pytest.raises(KvmStateError):
        lapic_to_kvm(bytes(1000), out)


def test_vcpu_events_round_trip():
    events = PendingEvents(exception_vector=14, exception_error_code=2, interrupt_vector=0x30,
                           interrupt_shadow=1, nmi_pending=True, nmi_masked=True, sipi_vector=0x9A)
    raw = ffi.new("struct kvm_vcpu_events *")
    events_to_kvm(events, raw)
    assert (raw.exception.injected, raw.exception.nr, raw.exception.has_error_code, raw.exception.error_code) \
        == (1, 14, 1, 2)
    assert (raw.interrupt.injected, raw.interrupt.nr, raw.interrupt.shadow) == (1, 0x30, 1)
    assert (raw.nmi.injected, raw.nmi.pending, raw.nmi.masked) == (0, 1, 1)
    assert raw.sipi_vector == 0x9A and raw.flags == EVENT_FLAGS
    assert events_from_kvm(raw) == events
    assert events_from_kvm(ffi.new("struct kvm_vcpu_events *")) == PendingEvents()


def test_a_pending_exception_reads_back_as_pending():
    raw = ffi.new("struct kvm_vcpu_events *")
    raw.exception.pending, raw.exception.nr = 1, 13
    assert events_from_kvm(raw) == PendingEvents(exception_vector=13, exception_injected=False)


def test_mp_states_map_one_to_one_onto_kvm():
    assert len(set(MP_STATE_TO_KVM.values())) == len(MpState)
    assert MP_STATE_TO_KVM[MpState.WAIT_FOR_SIPI] == abi.KVM_MP_STATE_UNINITIALIZED
    assert all(MP_STATE_FROM_KVM[MP_STATE_TO_KVM[m]] is m for m in MpState)


def test_copy_keeps_the_snapshot_parts():
    state = sample_state()
    state.fpu, state.lapic, state.mp_state = sample_fpu(), bytes(1024), MpState.HALTED
    state.events = PendingEvents(nmi_masked=True)
    state.xsave = XsaveComponents(1, bytes(64))
    copy = state.copy()
    assert copy == state and copy.msrs is not state.msrs
    assert X86CpuState().fpu is None and X86CpuState().mp_state is None
