"""Moving an :class:`~pyemu.target.x86.cpu_state.X86CpuState` into and out of a Unicorn engine.

Order matters in ``load_state`` because QEMU derives state from control-register writes:

1. EFER goes into the CPU-state blob first (WRMSR cannot set EFER.LMA; and QEMU's CR0 update enters or
   leaves long mode depending on EFER.LME/LMA, ``UC_MODE_64`` starts with LMA|LME set).
2. CR4, CR3, CR0 go through ``reg_write`` so QEMU flushes its TLB and updates the hflags it keeps for
   PE/MP/EM/TS and OSFXSR (CR4 before CR0: QEMU refuses to enter long mode without CR4.PAE).
3. General registers, RIP, RFLAGS, CR2, EFER again, all six segment caches, LDTR/TR, GDTR/IDTR and the
   hflags (CPL from SS.DPL as QEMU and VMX define it, code/stack size, long mode) go into the blob in one
   copy. A flat 32-bit protected-mode state (PVH, multiboot) thus runs as 32-bit code inside the 64-bit
   engine.
4. MSRs last through Unicorn's MSR interface (KVM's order too: MSR_FS_BASE beats the segment base).
5. The x87/SSE registers (``state.fpu``, when captured) through Unicorn's register interface, after the
   blob copy that would otherwise put the old ones back (:func:`load_fpu`).

XCR0 and PKRU travel as KVM carries them, in ``state.xsave`` (:meth:`XsaveComponents.with_pkru`: the XSAVE
header and PKRU, component 9, at its standard offset), captured once the guest enabled XSAVE or protection
keys (CR4.OSXSAVE or CR4.PKE) and loaded into the blob (calibrated fields). The vCPU flushes the TLB after a
load, so no translation granted under the old PKRU survives.

CR8 is not loaded: under TCG the task priority lives in the userspace LAPIC model.
"""

from __future__ import annotations

from unicorn import Uc
from unicorn import x86_const as x86

from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.msrs import MSR_EFER, SAVED_MSRS
from pyemu.accel.tcg.segments import (
    HF_LMA,
    cache_to_segment,
    compute_hflags,
    segment_to_cache,
)
from pyemu.target.x86.cpu_state import (
    CR0_PE,
    EFER_LMA,
    GPR_NAMES,
    DescriptorTable,
    FpuState,
    X86CpuState,
    XsaveComponents,
)

CR4_OSXSAVE, CR4_PKE = 1 << 18, 1 << 22

SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")


def load_state(uc: Uc, blob: CpuBlob, state: X86CpuState) -> None:
    blob.pull()
    blob.efer = state.efer
    blob.hflags = (blob.hflags | HF_LMA) if state.efer & EFER_LMA else (blob.hflags & ~HF_LMA)
    blob.push()
    uc.reg_write(x86.UC_X86_REG_CR4, state.cr4)
    uc.reg_write(x86.UC_X86_REG_CR3, state.cr3)
    uc.reg_write(x86.UC_X86_REG_CR0, state.cr0)
    blob.pull()
    for name in GPR_NAMES:
        blob.set_gpr(name, state.regs.get(name, 0))
    blob.rip = state.rip
    blob.rflags = state.rflags | 0x2
    blob.efer = state.efer
    blob.cr2 = state.cr2
    caches = {name: segment_to_cache(getattr(state, name)) for name in SEGMENTS}
    for name, cache in caches.items():
        blob.set_segment(name, cache)
    blob.set_segment("ldt", segment_to_cache(state.ldt))
    blob.set_segment("tr", segment_to_cache(state.tr))
    blob.set_table("gdt", state.gdt.base, state.gdt.limit)
    blob.set_table("idt", state.idt.base, state.idt.limit)
    cpl = caches["ss"].dpl if state.cr0 & CR0_PE else 0
    blob.hflags = compute_hflags(blob.hflags, cpl=cpl, cs=caches["cs"], ss=caches["ss"], ds=caches["ds"],
                                 es=caches["es"], cr0=blob.cr0, cr4=blob.cr4, efer=state.efer,
                                 rflags_vm=bool(state.rflags & (1 << 17)))
    blob.old_exception = -1
    if state.xsave is not None:
        blob.xcr0 = state.xsave.xcr0
        blob.pkru = state.xsave.pkru
    blob.push()
    for index, value in state.msrs.items():
        if index != MSR_EFER:
            uc.msr_write(index, value)
    if state.fpu is not None:
        load_fpu(uc, state.fpu)


def save_state(uc: Uc, blob: CpuBlob) -> X86CpuState:
    """Read the state back."""
    blob.pull()
    segments = {name: cache_to_segment(blob.segment(name)) for name in SEGMENTS}
    gdt = blob.table("gdt")
    idt = blob.table("idt")
    return X86CpuState(
        regs={name: blob.gpr(name) for name in GPR_NAMES},
        rip=blob.rip,
        rflags=blob.rflags,
        es=segments["es"], cs=segments["cs"], ss=segments["ss"], ds=segments["ds"], fs=segments["fs"],
        gs=segments["gs"],
        tr=cache_to_segment(blob.segment("tr")),
        ldt=cache_to_segment(blob.segment("ldt")),
        gdt=DescriptorTable(gdt[0], gdt[1]),
        idt=DescriptorTable(idt[0], idt[1]),
        cr0=blob.cr0,
        cr2=blob.cr2,
        cr3=blob.cr3,
        cr4=blob.cr4,
        cr8=0,
        efer=blob.efer,
        msrs={index: uc.msr_read(index) for index in SAVED_MSRS},
        fpu=save_fpu(uc),
        xsave=XsaveComponents.with_pkru(blob.xcr0, blob.pkru) if blob.cr4 & (CR4_OSXSAVE | CR4_PKE) else None,
    )


# x87 and SSE through Unicorn's register interface (measured on 2.1.4): FPSW reads and writes the status word
# with TOP in bits 13:11; FP0..FP7 are the *physical* registers as (mantissa, exponent) pairs, so ST(i) is
# FP((TOP + i) & 7); FPTAG is the full 16-bit tag word by physical register (11 = empty), which FXSAVE
# abridges to one bit per register (1 = not empty). XMM0..XMM15 read and write as 128-bit integers.
_TAG_EMPTY = 3
_FXSAVE_MXCSR_MASK = 0xFFFF
"""The MXCSR bits this engine's SSE takes (QEMU's TCG FXSAVE stores 0xffff there too)."""


def save_fpu(uc: Uc) -> FpuState:
    """The x87/SSE registers in FXSAVE terms (:class:`FpuState`), as KVM's side captures them."""
    fsw = uc.reg_read(x86.UC_X86_REG_FPSW) & 0xFFFF
    top = (fsw >> 11) & 7
    tags = uc.reg_read(x86.UC_X86_REG_FPTAG)
    ftw = sum(1 << i for i in range(8) if (tags >> (2 * i)) & 3 != _TAG_EMPTY)
    st = []
    for i in range(8):
        mantissa, exponent = uc.reg_read(x86.UC_X86_REG_FP0 + ((top + i) & 7))
        st.append(mantissa.to_bytes(8, "little") + exponent.to_bytes(2, "little"))
    xmm = tuple(uc.reg_read(x86.UC_X86_REG_XMM0 + i).to_bytes(16, "little") for i in range(16))
    return FpuState(fcw=uc.reg_read(x86.UC_X86_REG_FPCW) & 0xFFFF, fsw=fsw, ftw=ftw,
                    last_opcode=uc.reg_read(x86.UC_X86_REG_FOP) & 0x7FF, last_ip=uc.reg_read(x86.UC_X86_REG_FIP),
                    last_dp=uc.reg_read(x86.UC_X86_REG_FDP), st=tuple(st),
                    mxcsr=uc.reg_read(x86.UC_X86_REG_MXCSR) & 0xFFFFFFFF, mxcsr_mask=_FXSAVE_MXCSR_MASK, xmm=xmm)


def load_fpu(uc: Uc, fpu: FpuState) -> None:
    """Put FXSAVE-form registers into the engine (the inverse of :func:`save_fpu`). A register tagged
    valid gets tag 00; the engine, like QEMU's TCG, tells only empty from not empty. The last instruction
    and data pointers are informational (FXSAVE reports them) and the engine keeps its own."""
    uc.reg_write(x86.UC_X86_REG_FPCW, fpu.fcw & 0xFFFF)
    uc.reg_write(x86.UC_X86_REG_FPSW, fpu.fsw & 0xFFFF)
    top = (fpu.fsw >> 11) & 7
    uc.reg_write(x86.UC_X86_REG_FPTAG, sum((0 if fpu.ftw >> i & 1 else _TAG_EMPTY) << (2 * i) for i in range(8)))
    for i, raw in enumerate(fpu.st):
        uc.reg_write(x86.UC_X86_REG_FP0 + ((top + i) & 7),
                     (int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:10], "little")))
    uc.reg_write(x86.UC_X86_REG_MXCSR, fpu.mxcsr & 0xFFFF)
    for i, raw in enumerate(fpu.xmm):
        uc.reg_write(x86.UC_X86_REG_XMM0 + i, int.from_bytes(raw, "little"))
