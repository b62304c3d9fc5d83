"""#GP(0) for a MOV to CR4 that sets a bit the guest's CPUID does not offer (issue 14).

Why: Unicorn 2.1.4's CR4 write helper (QEMU 5.0's ``cpu_x86_update_cr4``) never raises #GP; it stores any
value, clearing only SMAP and PKE when the *engine* model lacks them. A guest told by CPUID that there is
no XSAVE could still set CR4.OSXSAVE, and so on for SMEP, FSGSBASE, UMIP, LA57, PCIDE, VMXE and the bits
no feature defines. QEMU 7.2 (``cr4_reserved_bits``) and hardware raise #GP(0) and leave CR4 unchanged.

How, exactly and at no cost on the common path: a MOV to CR4 ends QEMU's translation block (the
translator's ``gen_eob`` after the helper), so the next block start is the first point after it. There the
C block gate compares ``env->cr[4]`` (located through :func:`pyemu.accel.tcg.io_guard.locate_cpu`) with
the value it saw last. With pyemu's libunicorn the write helper itself asks for the gate and records the
MOV's address (engine patch ``cr4-write-notifies-gate``); with PyPI's library the gate runs at every block
start anyway and compares there (pyemu's libunicorn once compiled that watch into every block: two
dependent loads, a compare and a branch per block). When a bit newly set is in :func:`refused_cr4_bits`
the gate stops the engine before anything of the new block ran, and records the CR4 before the write and
where the MOV is (its own address with pyemu's libunicorn, the start of the block that ended with it with
PyPI's). The vCPU then (:func:`mov_to_cr4_before`) decodes forward from there with capstone up to the new
block's start: the last instruction must be the MOV to CR4 (prefixes and REX included, so its start is
exact). It puts the
old CR4 back through Unicorn's register interface (which runs ``cpu_x86_update_cr4`` again: hflags and
the TLB follow) and delivers #GP(0) with RIP at the MOV, as the CPU would have.

Not covered: SMAP and PKE when the engine model lacks them as well as CPUID -- the helper clears them
silently, CR4 does not change, and nothing is left to see (the engine model covers CPUID's features, so
this only happens for a CPUID without SMAP/PKE running on a model without them: the bit is dropped
instead of #GP). The other #GP conditions of MOV to CR4 (PCIDE with CR3[11:0] != 0, clearing PAE in
long mode, toggling LA57 in 64-bit code) are not checked.
"""

from __future__ import annotations

from pyemu.target.x86.cpuid import CpuidTable

#: CR4 bits every x86-64 CPU QEMU models accepts: VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT.
CR4_ALWAYS = 0x7FF
#: CR4 bits defined by a CPUID feature (QEMU 7.2's rule; PCIDE needs PCID as the SDM says).
CR4_BY_FEATURE: dict[str, int] = {
    "umip": 1 << 11, "la57": 1 << 12, "fsgsbase": 1 << 16, "pcid": 1 << 17, "xsave": 1 << 18,
    "smep": 1 << 20, "smap": 1 << 21, "pku": 1 << 22,
}
_MAX_BLOCK = 0x2000   # a translation block is at most a few KiB of guest code


def refused_cr4_bits(table: CpuidTable) -> int:
    """The CR4 bits a MOV to CR4 may not set under ``table``: all 64 bits but the always-defined ones
    and those of the features ``table`` offers."""
    features = table.features()
    allowed = CR4_ALWAYS
    for name, bit in CR4_BY_FEATURE.items():
        if name in features:
            allowed |= bit
    return ~allowed & 0xFFFF_FFFF_FFFF_FFFF


def mov_to_cr4_before(code: bytes, start: int, end: int, bits: int) -> int | None:
    """The address of the MOV to CR4 that ends the block ``[start, end)`` whose bytes are ``code``
    (decoded as ``bits``-bit code), or None when the block does not end with one.

    capstone is imported here, on the first refused MOV to CR4 (rare), not with the vCPU: its import
    took ~14 ms of every VM's start-up."""
    import capstone
    from capstone import x86_const as cs_x86

    mode = {64: capstone.CS_MODE_64, 32: capstone.CS_MODE_32, 16: capstone.CS_MODE_16}[bits]
    decoder = capstone.Cs(capstone.CS_ARCH_X86, mode)
    decoder.detail = True
    last = None
    for insn in decoder.disasm(code, start):
        if insn.address + insn.size == end:
            last = insn
            break
        if insn.address + insn.size > end:
            return None
    if last is None or last.id != cs_x86.X86_INS_MOV or len(last.operands) != 2:
        return None
    target = last.operands[0]
    if target.type != cs_x86.X86_OP_REG or last.reg_name(target.reg) != "cr4":
        return None
    return int(last.address)


def block_span(start: int, end: int) -> int | None:
    """The length of the block ``[start, end)`` if it is plausible (positive, bounded); else None."""
    length = end - start
    return length if 0 < length <= _MAX_BLOCK else None
