"""``info registers`` layout checked against QEMU 7.2's own output (microvm, -S, reset state)."""

from __future__ import annotations

import dataclasses

from pyemu.monitor.cpu_dump import dump_registers
from pyemu.target.x86.cpu_state import FpuState, Segment, X86CpuState, EFER_LMA, EFER_LME

# `info registers` of qemu-system-x86_64 -M microvm -accel tcg -S, minus its DR0-7 lines (pyemu does not
# capture debug registers) and with CR0 as pyemu resets it (QEMU shows 60000010: CD/NW set).
QEMU_RESET = """
CPU#0
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1
ESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000
EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 00000000 0000ffff 00009300
CS =f000 ffff0000 0000ffff 00009b00
SS =0000 00000000 0000ffff 00009300
DS =0000 00000000 0000ffff 00009300
FS =0000 00000000 0000ffff 00009300
GS =0000 00000000 0000ffff 00009300
LDT=0000 00000000 0000ffff 00008200
TR =0000 00000000 0000ffff 00008b00
GDT=     00000000 0000ffff
IDT=     00000000 0000ffff
CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000
EFER=0000000000000000
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
FPR0=0000000000000000 0000 FPR1=0000000000000000 0000
FPR2=0000000000000000 0000 FPR3=0000000000000000 0000
FPR4=0000000000000000 0000 FPR5=0000000000000000 0000
FPR6=0000000000000000 0000 FPR7=0000000000000000 0000
XMM00=0000000000000000 0000000000000000 XMM01=0000000000000000 0000000000000000
XMM02=0000000000000000 0000000000000000 XMM03=0000000000000000 0000000000000000
XMM04=0000000000000000 0000000000000000 XMM05=0000000000000000 0000000000000000
XMM06=0000000000000000 0000000000000000 XMM07=0000000000000000 0000000000000000
"""


def test_reset_state_matches_qemu_layout():
    state = X86CpuState(cr0=0x60000010, fpu=FpuState())
    state.regs["rdx"] = 0x60FB1
    assert dump_registers(0, state) == QEMU_RESET


def test_long_mode_uses_r_registers_and_decodes_segments():
    state = X86CpuState(rip=0xFFFFFFFF81000000, rflags=0x246, cs=Segment.flat_code64(), ss=Segment.flat_data(),
                        ds=Segment.flat_data(), es=Segment.flat_data(), tr=Segment.tss64(0x40, 0x1000),
                        efer=EFER_LMA | EFER_LME, cr0=0x80050033, cr3=0x1000, cr4=0x20)
    state.regs["r8"] = 0x1234
    lines = dump_registers(1, state).splitlines()
    assert lines[1] == "CPU#1"
    assert lines[4] == "R8 =0000000000001234 R9 =0000000000000000 R10=0000000000000000 R11=0000000000000000"
    assert lines[6] == "RIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0"
    assert "CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]" in lines
    assert "SS =0018 0000000000000000 ffffffff 00cf9300 DPL=0 DS   [-WA]" in lines
    assert "TR =0040 0000000000001000 00000067 00008b00 DPL=0 TSS64-busy" in lines
    assert "CR0=80050033 CR2=0000000000000000 CR3=0000000000001000 CR4=00000020" in lines
    assert not any(line.startswith("FCW=") for line in lines)  # FPU state not captured: no FPU lines
    assert dataclasses.replace(state).efer == EFER_LMA | EFER_LME
