"""The snapshot-only parts of X86CpuState under KVM: FPU/SSE (through XSAVE or KVM_SET_FPU), the local APIC
page, pending events and the MP state. Each test has the guest observe what a saved state brings back
after other guest code clobbered it, not only the host reading its own values back.

The guests run in 64-bit mode at CPL0 (this host's PVM-based KVM fails CPL3 code and int3, DESIGN.md).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pyemu.accel.exits import Halt, Stopped
from pyemu.accel.kvm import abi
from pyemu.accel.kvm.errors import KvmStateError
from pyemu.target.x86.cpu_state import (
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    FpuState,
    MpState,
    PendingEvents,
)

from pyemu.testing.asm import assemble

from kvm_guest_kit import CODE_ADDR, Recorder, run_bounded

CLOBBER_ADDR = CODE_ADDR + 0x400
REPORT_ADDR = CODE_ADDR + 0x800
HANDLER_ADDR = CODE_ADDR + 0xC00
XMM3 = 0x1122334455667788
XMM15_HIGH = 0x0123456789ABCDEF
MXCSR = 0x7F80  # round toward zero, all exceptions masked
FCW = 0x027F  # double precision
TPR = 0x30
LDR = 0x05000000

# Ring-0 code is run by KVM's instruction emulator on this host, which knows MOVDQU and FXSAVE/FXRSTOR but
# not MOVQ, PXOR, LDMXCSR or x87 arithmetic: the programs set and read FPU/SSE state with those.
SAVED_IMAGE = 0x90000  # FXSAVE image the host prepares: the values the snapshot must bring back
CLOBBER_IMAGE = 0x90800  # FXSAVE image with init values
XMM15_SOURCE = 0x90400
REPORT_AREA = 0x91000

SET_STATE = f"""
    mov rdi, {SAVED_IMAGE:#x}
    fxrstor [rdi]
    mov rsi, {XMM15_SOURCE:#x}
    movdqu xmm15, [rsi]
    mov rbx, 0xfee00080
    mov dword ptr [rbx], {TPR:#x}
    mov rbx, 0xfee000d0
    mov dword ptr [rbx], {LDR:#x}
    mov dx, 0x500
    out dx, al
    mov rax, {REPORT_ADDR:#x}
    jmp rax
"""
# Port 0x500: the host takes the snapshot here (the vCPU stops at this OUT), then the program reports.

CLOBBER = f"""
    mov rdi, {CLOBBER_IMAGE:#x}
    fxrstor [rdi]
    mov rbx, 0xfee00080
    mov dword ptr [rbx], 0
    mov rbx, 0xfee000d0
    mov dword ptr [rbx], 0
    mov rax, {REPORT_ADDR:#x}
    jmp rax
"""

# FXSAVE offsets: FCW 0, MXCSR 24, ST0 32 (mantissa) / 40 (sign+exponent), XMM3 208.
REPORT = f"""
    mov rdi, {REPORT_AREA:#x}
    fxsave [rdi]
    mov dx, 0x504
    mov rax, [rdi+208]
    out dx, eax
    shr rax, 32
    out dx, eax
    movdqu [rdi+512], xmm15
    mov rax, [rdi+520]
    out dx, eax
    shr rax, 32
    out dx, eax
    mov eax, [rdi+24]
    out dx, eax
    movzx eax, word ptr [rdi]
    out dx, eax
    mov rax, [rdi+32]
    out dx, eax
    shr rax, 32
    out dx, eax
    movzx eax, word ptr [rdi+40]
    out dx, eax
    mov rbx, 0xfee00080
    mov eax, [rbx]
    out dx, eax
    mov rbx, 0xfee000d0
    mov eax, [rbx]
    out dx, eax
    cli
    hlt
"""

PI_80 = bytes.fromhex("35c26821a2da0fc90040")  # pi as an x87 80-bit value
PI_MANTISSA = int.from_bytes(PI_80[:8], "little")


def saved_fpu(xmm15_high: int = 0) -> FpuState:
    xmm = list(FpuState().xmm)
    xmm[3] = XMM3.to_bytes(8, "little") + bytes(8)
    xmm[15] = bytes(8) + xmm15_high.to_bytes(8, "little")
    # ST0 = pi: TOP = 7 (FSW bits 11-13), physical register 7 valid (abridged tag bit 7).
    return FpuState(fcw=FCW, fsw=0x3800, ftw=0x80, st=(PI_80,) + (bytes(10),) * 7, mxcsr=MXCSR,
                    xmm=tuple(xmm))


def words(value: int) -> list[int]:
    return [value & 0xFFFFFFFF, value >> 32]


SAVED_REPORT = [*words(XMM3), *words(XMM15_HIGH), MXCSR, FCW, *words(PI_MANTISSA), 0x4000, TPR, LDR]
CLOBBERED_REPORT = [0, 0, 0, 0, 0x1F80, 0x37F, 0, 0, 0, 0, 0]


class Reports(Recorder):
    """Port 0x500 stops the vCPU (snapshot point); port 0x504 collects 32-bit reports."""

    def __init__(self, vcpu) -> None:
        super().__init__()
        self.vcpu = vcpu

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value)
        if offset == 0:
            self.vcpu.request_stop()

    def take(self) -> list[int]:
        values = [v for kind, o, _, v in self.accesses if kind == "w" and o == 4]
        self.accesses.clear()
        return values


@pytest.fixture
def snapshot_rig(kvm_machine):
    """Runs SET_STATE to the snapshot point; returns (machine, reports, snapshot)."""
    vcpu = kvm_machine.vcpu
    reports = Reports(vcpu)
    kvm_machine.pio.register(0x500, 8, reports)
    for addr, code in ((CODE_ADDR, SET_STATE), (CLOBBER_ADDR, CLOBBER), (REPORT_ADDR, REPORT)):
        kvm_machine.memory.write(addr, assemble(code, address=addr, bits=64))
    kvm_machine.memory.write(SAVED_IMAGE, saved_fpu().to_fxsave())
    kvm_machine.memory.write(CLOBBER_IMAGE, FpuState().to_fxsave())
    kvm_machine.memory.write(XMM15_SOURCE, bytes(8) + XMM15_HIGH.to_bytes(8, "little"))
    state = kvm_machine.state64()
    state.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT
    vcpu.load_state(state)
    assert run_bounded(vcpu)[0] == Stopped()
    snapshot = vcpu.save_state()
    return kvm_machine, reports, snapshot


def clobber(machine, reports, snapshot) -> list[int]:
    machine.vcpu.load_state(replace(snapshot, rip=CLOBBER_ADDR))
    assert run_bounded(machine.vcpu)[0] == Halt()
    return reports.take()


def test_saved_fpu_sse_and_lapic_are_captured(snapshot_rig):
    _machine, _reports, snapshot = snapshot_rig
    fpu = snapshot.fpu
    assert fpu is not None
    assert int.from_bytes(fpu.xmm[3][:8], "little") == XMM3
    assert int.from_bytes(fpu.xmm[15][8:], "little") == XMM15_HIGH
    assert (fpu.mxcsr, fpu.fcw, fpu.ftw, fpu.st[0]) == (MXCSR, FCW, 0x80, PI_80)
    assert snapshot.lapic is not None and len(snapshot.lapic) == 1024
    assert snapshot.lapic[0x80] == TPR
    assert int.from_bytes(snapshot.lapic[0xD0:0xD4], "little") == LDR
    assert snapshot.cr8 == TPR >> 4
    assert snapshot.mp_state is MpState.RUNNABLE and snapshot.events == PendingEvents()


def test_the_guest_sees_restored_fpu_sse_and_lapic_after_clobbering(snapshot_rig):
    machine, reports, snapshot = snapshot_rig
    assert clobber(machine, reports, snapshot) == CLOBBERED_REPORT
    machine.vcpu.load_state(snapshot)
    assert run_bounded(machine.vcpu)[0] == Halt()
    assert reports.take() == SAVED_REPORT


def test_restoring_fpu_registers_without_xsave_components(snapshot_rig):
    """Only the legacy registers: loaded into the vCPU's own XSAVE area (KVM_SET_FPU would be ignored
    here for registers the clobbering left in their init state)."""
    machine, reports, snapshot = snapshot_rig
    clobber(machine, reports, snapshot)
    machine.vcpu.load_state(replace(snapshot, xsave=None))
    assert run_bounded(machine.vcpu)[0] == Halt()
    assert reports.take() == SAVED_REPORT


def test_parts_not_captured_keep_the_vcpus_current_values(snapshot_rig):
    machine, reports, snapshot = snapshot_rig
    clobber(machine, reports, snapshot)
    machine.vcpu.load_state(replace(snapshot, fpu=None, xsave=None, lapic=None))
    assert run_bounded(machine.vcpu)[0] == Halt()
    # FPU/SSE and LDR stay clobbered; TPR comes back through CR8, which is part of the registers.
    assert reports.take() == CLOBBERED_REPORT[:9] + [TPR, 0]


def test_an_fpu_state_built_elsewhere_reaches_the_guest(snapshot_rig):
    """An FpuState made without KVM (as the software CPU or a snapshot file would give it)."""
    machine, reports, snapshot = snapshot_rig
    fpu = saved_fpu(XMM15_HIGH)
    clobber(machine, reports, snapshot)
    for xsave in (snapshot.xsave, None):
        machine.vcpu.load_state(replace(snapshot, fpu=fpu, xsave=xsave))
        assert run_bounded(machine.vcpu)[0] == Halt()
        assert reports.take() == SAVED_REPORT, xsave


def test_xsave_components_and_xcr0_round_trip(snapshot_rig):
    machine, _reports, snapshot = snapshot_rig
    if snapshot.xsave is None:
        pytest.skip("host KVM without KVM_CAP_XSAVE")
    assert snapshot.xsave.xcr0 & 1 and snapshot.xsave.xstate_bv & 0b10  # SSE in use
    machine.vcpu.load_state(snapshot)
    again = machine.vcpu.save_state()
    assert (again.fpu, again.xsave) == (snapshot.fpu, snapshot.xsave)


def test_a_lapic_page_of_the_wrong_size_is_a_typed_error(snapshot_rig):
    machine, _reports, snapshot = snapshot_rig
    with pytest.raises(KvmStateError):
        machine.vcpu.load_state(replace(snapshot, lapic=b"\0" * 16))


# -- pending events -----------------------------------------------------------------------------------------
EVENT_MAIN = """
    mov dx, 0x512
    mov al, 1
    out dx, al
    cli
    hlt
"""


def event_guest(machine, vector: int):
    """Main code reports 1 on port 0x512; the handler for ``vector`` reports the vector on 0x511 first."""
    ports = Recorder()
    machine.pio.register(0x510, 4, ports)
    handler = f"push rax\npush rdx\nmov dx, 0x511\nmov al, {vector}\nout dx, al\npop rdx\npop rax\niretq"
    machine.memory.write(HANDLER_ADDR, assemble(handler, address=HANDLER_ADDR, bits=64))
    machine.set_idt64(vector, HANDLER_ADDR)
    state = machine.load(EVENT_MAIN, bits=64, idt_vectors=256)
    return ports, state


def test_a_pending_nmi_is_delivered_before_the_next_instruction(kvm_machine):
    ports, state = event_guest(kvm_machine, 2)
    kvm_machine.vcpu.load_state(replace(state, events=PendingEvents(nmi_pending=True)))
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    assert ports.writes == [(1, 1, 2), (2, 1, 1)]
    assert kvm_machine.vcpu.save_state().events == PendingEvents()


def test_a_masked_pending_nmi_waits_and_round_trips(kvm_machine):
    ports, state = event_guest(kvm_machine, 2)
    events = PendingEvents(nmi_pending=True, nmi_masked=True)
    kvm_machine.vcpu.load_state(replace(state, events=events))
    assert kvm_machine.vcpu.save_state().events == events
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    assert ports.writes == [(2, 1, 1)]  # blocked: NMIs stay masked until an IRET
    assert kvm_machine.vcpu.save_state().events == events


def test_an_interrupt_caught_mid_delivery_is_delivered_on_resume(kvm_machine):
    """An injected interrupt was already accepted by the CPU: it is delivered even with IF=0."""
    ports, state = event_guest(kvm_machine, 0x40)
    events = PendingEvents(interrupt_vector=0x40)
    kvm_machine.vcpu.load_state(replace(state, events=events))
    assert kvm_machine.vcpu.save_state().events == events
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    assert ports.writes == [(1, 1, 0x40), (2, 1, 1)]


# -- MP state -----------------------------------------------------------------------------------------------
AP_TRAMPOLINE = 0xA000  # SIPI vector 0x0A


def test_an_ap_waiting_for_sipi_round_trips_and_stays_waiting(kvm_machine):
    ap = kvm_machine.accel.create_vcpu(1)
    state = ap.save_state()
    assert state.mp_state is MpState.WAIT_FOR_SIPI
    ap.load_state(state)
    assert ap.mp_state() == abi.KVM_MP_STATE_UNINITIALIZED
    assert run_bounded(ap, timeout=0.3)[0] == Stopped()
    assert ap.save_state().mp_state is MpState.WAIT_FOR_SIPI


def test_a_latched_sipi_in_the_state_starts_the_ap_at_its_vector(kvm_machine):
    """MP state SIPI_RECEIVED plus the SIPI vector in the events: the AP starts in real mode at
    vector * 0x1000, as if the INIT/SIPI had just arrived."""
    ap = kvm_machine.accel.create_vcpu(1)
    ports = Recorder()
    kvm_machine.pio.register(0xE0, 2, ports)
    kvm_machine.memory.write(AP_TRAMPOLINE, assemble("mov al, 0x99\nmov dx, 0xe1\nout dx, al\ncli\nhlt",
                                                     address=0, bits=16))
    state = ap.save_state()
    ap.load_state(replace(state, mp_state=MpState.SIPI_RECEIVED,
                          events=replace(state.events, sipi_vector=AP_TRAMPOLINE >> 12)))
    assert run_bounded(ap)[0] == Halt()
    assert ports.writes == [(1, 1, 0x99)]
    after = ap.save_state()
    assert after.cs.base == AP_TRAMPOLINE and after.mp_state is MpState.HALTED
