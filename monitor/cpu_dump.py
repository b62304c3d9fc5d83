"""HMP ``info registers``: one vCPU's state in QEMU's layout (``x86_cpu_dump_state`` with the FPU part).

64-bit code (EFER.LMA and CS.L) prints the R-registers with 16 hex digits, anything else the E-registers,
as QEMU does; segment lines show the selector, base, limit and the descriptor's attribute bits in the
position of the descriptor's high dword (``flags & 0x00ffff00``), then a decoded summary in protected
mode. Debug registers are not part of pyemu's captured CPU state, so their two lines are left out rather
than printed with invented values.
"""

from __future__ import annotations

from pyemu.target.x86.cpu_state import CR0_PE, EFER_LMA, MpState, Segment, X86CpuState

_SYS_TYPES_32 = ("Reserved", "TSS16-avl", "LDT", "TSS16-busy", "CallGate16", "TaskGate", "IntGate16",
                 "TrapGate16", "Reserved", "TSS32-avl", "Reserved", "TSS32-busy", "CallGate32", "Reserved",
                 "IntGate32", "TrapGate32")
_SYS_TYPES_64 = ("<hiword>", "Reserved", "LDT", "Reserved", "Reserved", "Reserved", "Reserved", "Reserved",
                 "Reserved", "TSS64-avl", "Reserved", "TSS64-busy", "CallGate64", "Reserved", "IntGate64",
                 "TrapGate64")
# RFLAGS bits in the order of QEMU's "[DOSZAPC]" summary.
_FLAG_LETTERS = ((0x400, "D"), (0x800, "O"), (0x80, "S"), (0x40, "Z"), (0x10, "A"), (0x04, "P"), (0x01, "C"))


def segment_flags(seg: Segment) -> int:
    """The attribute bits as QEMU keeps them: type, S, DPL, P, limit 19:16, AVL, L, D/B, G."""
    raw_limit = seg.limit >> 12 if seg.g else seg.limit
    present = seg.present and not seg.unusable
    return ((seg.type & 0xF) << 8 | int(seg.s) << 12 | (seg.dpl & 3) << 13 | int(present) << 15
            | ((raw_limit >> 16) & 0xF) << 16 | int(seg.l) << 21 | int(seg.db) << 22 | int(seg.g) << 23)


def _segment_line(name: str, seg: Segment, *, code64: bool, protected: bool, long_mode: bool) -> str:
    flags = segment_flags(seg)
    if code64:
        line = f"{name:<3}={seg.selector:04x} {seg.base:016x} {seg.limit & 0xFFFFFFFF:08x} {flags:08x}"
    else:
        line = f"{name:<3}={seg.selector:04x} {seg.base & 0xFFFFFFFF:08x} {seg.limit & 0xFFFFFFFF:08x} {flags:08x}"
    if not protected or not flags & (1 << 15):
        return line
    line += f" DPL={seg.dpl} "
    if seg.s:
        if seg.type & 0x8:  # code
            line += "CS64" if seg.l else ("CS32" if seg.db else "CS16")
            line += f" [{'C' if seg.type & 4 else '-'}{'R' if seg.type & 2 else '-'}"
        else:
            line += "DS  " if seg.db or long_mode else "DS16"
            line += f" [{'E' if seg.type & 4 else '-'}{'W' if seg.type & 2 else '-'}"
        line += f"{'A' if seg.type & 1 else '-'}]"
    else:
        line += (_SYS_TYPES_64 if long_mode else _SYS_TYPES_32)[seg.type & 0xF]
    return line


def _fpu_lines(state: X86CpuState, code64: bool) -> list[str]:
    fpu = state.fpu
    if fpu is None:
        return []
    top = (fpu.fsw >> 11) & 7
    lines = [f"FCW={fpu.fcw:04x} FSW={fpu.fsw:04x} [ST={top}] FTW={fpu.ftw:02x} MXCSR={fpu.mxcsr:08x}"]
    pairs: list[str] = []
    for physical in range(8):
        raw = fpu.st[(physical - top) & 7]  # FXSAVE keeps ST(i); QEMU prints physical registers
        pairs.append(f"FPR{physical}={int.from_bytes(raw[:8], 'little'):016x} "
                     f"{int.from_bytes(raw[8:10], 'little'):04x}")
    lines += [" ".join(pairs[i:i + 2]) for i in range(0, 8, 2)]
    xmms = [f"XMM{i:02d}={int.from_bytes(r[8:], 'little'):016x} {int.from_bytes(r[:8], 'little'):016x}"
            for i, r in enumerate(fpu.xmm[:16 if code64 else 8])]
    lines += [" ".join(xmms[i:i + 2]) for i in range(0, len(xmms), 2)]
    return lines


def dump_registers(index: int, state: X86CpuState) -> str:
    """The text of ``info registers`` for vCPU ``index`` (lines end in ``\\n``; the monitor makes them
    ``\\r\\n``), starting with QEMU's blank line and ``CPU#N`` header."""
    long_mode = bool(state.efer & EFER_LMA)
    code64 = long_mode and state.cs.l
    protected = bool(state.cr0 & CR0_PE)
    cpl = state.ss.dpl if protected else 0
    r, fl = state.regs, state.rflags
    letters = "".join(letter if fl & bit else "-" for bit, letter in _FLAG_LETTERS)
    halted = int(state.mp_state is MpState.HALTED)
    tail = f"[{letters}] CPL={cpl} II=0 A20=1 SMM=0 HLT={halted}"
    lines = ["", f"CPU#{index}"]
    if code64:
        lines += [
            f"RAX={r['rax']:016x} RBX={r['rbx']:016x} RCX={r['rcx']:016x} RDX={r['rdx']:016x}",
            f"RSI={r['rsi']:016x} RDI={r['rdi']:016x} RBP={r['rbp']:016x} RSP={r['rsp']:016x}",
            f"R8 ={r['r8']:016x} R9 ={r['r9']:016x} R10={r['r10']:016x} R11={r['r11']:016x}",
            f"R12={r['r12']:016x} R13={r['r13']:016x} R14={r['r14']:016x} R15={r['r15']:016x}",
            f"RIP={state.rip:016x} RFL={fl:08x} {tail}",
        ]
    else:
        e = {name: value & 0xFFFFFFFF for name, value in r.items()}
        lines += [
            f"EAX={e['rax']:08x} EBX={e['rbx']:08x} ECX={e['rcx']:08x} EDX={e['rdx']:08x}",
            f"ESI={e['rsi']:08x} EDI={e['rdi']:08x} EBP={e['rbp']:08x} ESP={e['rsp']:08x}",
            f"EIP={state.rip & 0xFFFFFFFF:08x} EFL={fl:08x} {tail}",
        ]
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldt", "tr"):
        label = {"ldt": "LDT", "tr": "TR"}.get(name, name.upper())
        lines.append(_segment_line(label, getattr(state, name), code64=code64, protected=protected,
                                   long_mode=long_mode))
    if long_mode:
        lines += [f"GDT=     {state.gdt.base:016x} {state.gdt.limit:08x}",
                  f"IDT=     {state.idt.base:016x} {state.idt.limit:08x}",
                  f"CR0={state.cr0 & 0xFFFFFFFF:08x} CR2={state.cr2:016x} CR3={state.cr3:016x} "
                  f"CR4={state.cr4 & 0xFFFFFFFF:08x}"]
    else:
        lines += [f"GDT=     {state.gdt.base & 0xFFFFFFFF:08x} {state.gdt.limit:08x}",
                  f"IDT=     {state.idt.base & 0xFFFFFFFF:08x} {state.idt.limit:08x}",
                  f"CR0={state.cr0 & 0xFFFFFFFF:08x} CR2={state.cr2 & 0xFFFFFFFF:08x} "
                  f"CR3={state.cr3 & 0xFFFFFFFF:08x} CR4={state.cr4 & 0xFFFFFFFF:08x}"]
    lines.append(f"EFER={state.efer:016x}")
    lines += _fpu_lines(state, code64)
    return "\n".join(lines) + "\n"
