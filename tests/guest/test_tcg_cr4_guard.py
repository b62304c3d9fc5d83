"""#GP(0) for a MOV to CR4 that sets a bit the guest's CPUID does not offer (accel/tcg/cr4_guard.py).

Unicorn's CR4 helper accepts any value; the C block gate sees the new CR4 at the block start after the MOV
and the vCPU puts the old value back and raises #GP(0) with RIP at the MOV. Checked from inside the guest:
the fault, its error code, RIP pointing at the MOV's bytes (with and without REX), CR4 unchanged after it,
and bits the CPUID does offer accepted.
"""

from __future__ import annotations

import pytest

from pyemu.accel.tcg.cr4_guard import mov_to_cr4_before, refused_cr4_bits
from pyemu.system.cpu_options import CpuOptions
from pyemu.target.x86.cpu_models import TCG_WITHHELD_FEATURES
from pyemu.target.x86.cpuid import CpuidTable, default_cpuid
from pyemu.testing import GuestProgram, ProgramResult, describe, run_program
from pyemu.testing.environment import DATA
from pyemu.testing.handlers import exit_with, read_frame, recording_handler

OK = 0x600D
GP = 13
CR4_VMXE, CR4_FSGSBASE, CR4_OSXSAVE, CR4_SMEP, CR4_SMAP = 1 << 13, 1 << 16, 1 << 18, 1 << 20, 1 << 21


def _table(model: str) -> CpuidTable:
    """The CPUID a microvm under TCG presents with ``-cpu MODEL``."""
    return CpuOptions(model).apply(default_cpuid().without(*TCG_WITHHELD_FEATURES), "tcg")


def _run(code: str, model: str, skip: int) -> ProgramResult:
    """Runs ``code`` after CR4 is stored at data+0; it stores CR4 again at data+8 at the end. A #GP is
    recorded (slot 0) and skipped by ``skip`` bytes."""
    program = GuestProgram(f"""
        mov r15, data
        mov rax, cr4
        mov [r15], rax
        {code}
        mov rax, cr4
        mov [r15 + 8], rax
        {exit_with(OK)}
    """, handlers={GP: recording_handler(0, error_code=True, skip=skip)})
    result = run_program(program, "tcg", cpuid=_table(model), timeout=60)
    assert result.exit_value == OK, describe(result)
    return result


@pytest.mark.parametrize("bit,register,encoding", [
    (CR4_OSXSAVE, "rax", b"\x0f\x22\xe0"),          # qemu64 has no XSAVE
    (CR4_SMEP, "r9", b"\x41\x0f\x22\xe1"),          # ... no SMEP; REX.B form
    (CR4_FSGSBASE, "rax", b"\x0f\x22\xe0"),         # ... no FSGSBASE
])
def test_qemu64_refuses_a_cr4_bit_its_cpuid_lacks_with_gp_at_the_mov(bit: int, register: str,
                                                                     encoding: bytes) -> None:
    result = _run(f"""
        mov {register}, cr4
        or {register}, {bit:#x}
        mov cr4, {register}
    """, "qemu64", skip=len(encoding))
    frame = read_frame(result, 0)
    assert frame.count == 1 and frame.error_code == 0
    assert result.read(frame.rip, len(encoding)) == encoding   # RIP at the MOV, not after it
    assert result.u64(DATA + 8) == result.u64(DATA)             # CR4 unchanged
    assert not result.u64(DATA + 8) & bit


def test_max_accepts_the_bits_its_cpuid_offers() -> None:
    bits = CR4_OSXSAVE | CR4_FSGSBASE   # (not SMEP/SMAP: the test's code and data are on user pages)
    result = _run(f"""
        mov rax, cr4
        or rax, {bits:#x}
        mov cr4, rax
    """, "max", skip=3)
    assert read_frame(result, 0).count == 0
    assert result.u64(DATA + 8) == result.u64(DATA) | bits


def test_max_refuses_vmxe_and_keeps_the_earlier_accepted_write() -> None:
    """A bit no TCG CPUID offers (VMXE) faults even after an accepted write in the same run: the gate
    compares with the CR4 it saw last, not the one the run started with."""
    result = _run(f"""
        mov rax, cr4
        or rax, {CR4_OSXSAVE:#x}
        mov cr4, rax
        or rax, {CR4_VMXE:#x}
        mov cr4, rax
    """, "max", skip=3)
    frame = read_frame(result, 0)
    assert frame.count == 1 and frame.error_code == 0
    assert result.read(frame.rip, 3) == b"\x0f\x22\xe0"
    assert result.u64(DATA + 8) == result.u64(DATA) | CR4_OSXSAVE


def test_refused_bits_follow_qemu_7_2s_rule() -> None:
    refused = refused_cr4_bits(_table("qemu64"))
    assert refused & (CR4_OSXSAVE | CR4_SMEP | CR4_SMAP | CR4_FSGSBASE | CR4_VMXE | 1 << 63)
    assert not refused & 0x7FF   # VME .. OSXMMEXCPT
    assert not refused_cr4_bits(_table("max")) & (CR4_OSXSAVE | CR4_SMEP | CR4_SMAP | CR4_FSGSBASE | 1 << 22)


def test_decoder_finds_the_mov_only_when_it_ends_the_block() -> None:
    code = b"\x48\x89\xc3" + b"\x41\x0f\x22\xe1"   # mov rbx, rax; mov cr4, r9
    assert mov_to_cr4_before(code, 0x1000, 0x1007, 64) == 0x1003
    assert mov_to_cr4_before(code[:3] + b"\x0f\x22\xd8", 0x1000, 0x1006, 64) is None   # mov cr3, rax
    assert mov_to_cr4_before(code, 0x1000, 0x1006, 64) is None   # the block does not end at an instruction


def test_32bit_protected_mode_mov_to_cr4_faults_at_the_mov() -> None:
    """The MOV is decoded as 32-bit code (the PVH/multiboot entry state Linux starts in), paging off."""
    program = GuestProgram(f"""
        mov edi, data
        mov eax, cr4
        mov [edi], eax
        mov ecx, cr4
        or ecx, {CR4_OSXSAVE:#x}
        mov cr4, ecx
        mov eax, cr4
        mov [edi + 8], eax
        {exit_with(OK)}
    """, mode="protected", handlers={GP: recording_handler(0, error_code=True, skip=3, bits=32)})
    result = run_program(program, "tcg", cpuid=_table("qemu64"), timeout=60)
    assert result.exit_value == OK, describe(result)
    frame = read_frame(result, 0)
    assert frame.count == 1 and frame.error_code == 0
    assert result.read(frame.rip, 3) == b"\x0f\x22\xe1"   # mov cr4, ecx
    assert result.u32(DATA + 8) == result.u32(DATA)
