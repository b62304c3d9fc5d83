"""SYSCALL and SYSENTER with their architectural effect (Unicorn 2.1.4 replaces both instructions by
hooks that do nothing).

What the hardware does (Intel SDM vol. 2 "SYSCALL", AMD APM vol. 3), and what :func:`syscall_entry`
computes: #UD unless EFER.SCE; in long mode RCX = return RIP, R11 = RFLAGS (with RF cleared),
RFLAGS &= ~FMASK and RF cleared, CS = STAR[47:32] & ~3 as a flat 64-bit DPL-0 code segment,
SS = STAR[47:32] + 8 as a flat writable DPL-0 data segment, CPL = 0, RIP = LSTAR (CSTAR when the caller
ran in compatibility mode). Outside long mode (legacy SYSCALL, AMD): ECX = return EIP, IF/VM/RF cleared,
EIP = STAR[31:0], flat 32-bit segments.

SYSENTER (Intel SDM vol. 2 "SYSENTER", what 32-bit code on Intel CPUs uses): #GP(0) unless protected mode
and IA32_SYSENTER_CS[15:2] != 0; RFLAGS.VM/IF/RF cleared; CS = SYSENTER_CS & ~3 (64-bit code when
IA-32e mode is active, else flat 32-bit), SS = CS + 8, CPL = 0, RSP = SYSENTER_ESP, RIP = SYSENTER_EIP.

SYSRET and SYSEXIT are left to Unicorn: QEMU's ``helper_sysret`` loads the segment caches and the CPL itself
(verified by tests/guest/test_tcg_syscall.py: a CPL3 -> CPL0 -> CPL3 round trip).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.accel.tcg.errors import GuestFault
from pyemu.accel.tcg.segments import SegCache, flat_code32, flat_code64, flat_data
from pyemu.target.x86.cpu_state import CR0_PE, EFER_LMA, EFER_SCE, RFLAGS_IF, RFLAGS_RF

RFLAGS_VM = 1 << 17
_UD = 6
_GP = 13
# Prefixes that may precede 0F 05 (they change nothing but the instruction length).
_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3, *range(0x40, 0x50)})


@dataclass(frozen=True, slots=True)
class SyscallEntry:
    rip: int
    rflags: int
    rcx: int
    r11: int | None   # None outside long mode (R11 is untouched)
    cs: SegCache
    ss: SegCache


def syscall_entry(*, return_rip: int, rflags: int, cs_long: bool, cr0: int, efer: int,
                  star: int, lstar: int, cstar: int, fmask: int) -> SyscallEntry:
    """The state after SYSCALL; raises GuestFault(#UD) when SYSCALL is disabled or outside protected mode."""
    if not efer & EFER_SCE or not cr0 & CR0_PE:
        raise GuestFault(_UD)
    selector = (star >> 32) & 0xFFFC
    if efer & EFER_LMA:
        new_flags = (rflags & ~fmask & ~RFLAGS_RF) | 0x2
        return SyscallEntry(
            rip=lstar if cs_long else cstar & 0xFFFF_FFFF_FFFF_FFFF, rflags=new_flags, rcx=return_rip,
            r11=rflags & ~RFLAGS_RF, cs=flat_code64(selector, 0), ss=flat_data(selector + 8, 0),
        )
    new_flags = (rflags & ~(RFLAGS_IF | RFLAGS_VM | RFLAGS_RF)) | 0x2
    return SyscallEntry(rip=star & 0xFFFF_FFFF, rflags=new_flags, rcx=return_rip & 0xFFFF_FFFF, r11=None,
                        cs=flat_code32(selector, 0), ss=flat_data(selector + 8, 0))


@dataclass(frozen=True, slots=True)
class SysenterEntry:
    rip: int
    rsp: int
    rflags: int
    cs: SegCache
    ss: SegCache


def sysenter_entry(*, rflags: int, cr0: int, efer: int, sysenter_cs: int, sysenter_esp: int,
                   sysenter_eip: int) -> SysenterEntry:
    """The state after SYSENTER; raises GuestFault(#GP(0)) when SYSENTER_CS is null or paging is off PE."""
    selector = sysenter_cs & 0xFFFC
    if not cr0 & CR0_PE or selector == 0:
        raise GuestFault(_GP, 0)
    new_flags = (rflags & ~(RFLAGS_IF | RFLAGS_VM | RFLAGS_RF)) | 0x2
    if efer & EFER_LMA:
        return SysenterEntry(sysenter_eip, sysenter_esp, new_flags, flat_code64(selector, 0),
                             flat_data(selector + 8, 0))
    return SysenterEntry(sysenter_eip & 0xFFFF_FFFF, sysenter_esp & 0xFFFF_FFFF, new_flags,
                         flat_code32(selector, 0), flat_data(selector + 8, 0))


def fast_call_length(code: bytes, opcode: int) -> int:
    """Length of ``0F opcode`` (05: SYSCALL, 34: SYSENTER) with its prefixes at the start of ``code``;
    2 if unrecognised."""
    for index, byte in enumerate(code[:15]):
        if byte in _PREFIXES:
            continue
        if byte == 0x0F and code[index + 1:index + 2] == bytes([opcode]):
            return index + 2
        break
    return 2


def syscall_length(code: bytes) -> int:
    """Length of the SYSCALL instruction at the start of ``code`` (prefixes + 0F 05); 2 if unrecognised."""
    return fast_call_length(code, 0x05)
