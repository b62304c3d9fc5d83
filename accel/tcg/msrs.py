"""Model-specific registers under the software CPU.

Guest RDMSR/WRMSR cannot be hooked in Unicorn 2.1.4: they execute inside the engine's own
``helper_rdmsr``/``helper_wrmsr`` (QEMU 5.0 code). Measured (DESIGN.md): the core implements EFER,
STAR/LSTAR/CSTAR/FMASK, FS/GS/KERNEL_GS bases, PAT, TSC_AUX and the SYSENTER MSRs; unknown MSRs read 0
and ignore writes instead of raising #GP; IA32_APIC_BASE and MISC_ENABLE always read 0. Consequences
under TCG: no x2APIC, no TSC-deadline timer, no kvmclock (CPUID does not offer them, see
:mod:`pyemu.accel.tcg.io_hooks`); the LAPIC is an xAPIC MMIO device at 0xfee00000 on the board's bus.

``load_state``/``save_state`` move MSRs through the same helpers (Unicorn's ``UC_X86_REG_MSR`` register
interface), so what they can carry is exactly :data:`SAVED_MSRS`. EFER is special: WRMSR cannot set
EFER.LMA, so the vCPU writes EFER into the CPU-state blob directly (:mod:`pyemu.accel.tcg.state_io`).
"""

from __future__ import annotations

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_FMASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
MSR_IA32_TSC_ADJUST = 0x3B

TSC_WRITES_IGNORED_WHY = (
    "RDMSR/WRMSR cannot be intercepted in Unicorn 2.1.4 (UC_HOOK_INSN refuses UC_X86_INS_RDMSR/WRMSR with "
    "UC_ERR_ARG); its core reads IA32_TSC_ADJUST (MSR 0x3b) as 0 and ignores writes to it, as it ignores "
    "writes to IA32_TSC (MSR 0x10)"
)
"""Why a guest cannot move its TSC under the software CPU, through either MSR (measured by
``tests/guest/test_tsc_features.py``).

``tsc_adjust`` (CPUID.7.0:EBX[1]) is offered all the same: its MSR reads 0, which is its value on a CPU
whose TSC was never written, and Linux 6.1 only writes it to repair a value it read as non-zero, so for
Linux the MSR behaves exactly as on hardware. The bit is what lets Linux trust the TSC (with constant and
nonstop TSC; arch/x86/kernel/tsc.c ``check_system_tsc_reliable``): without it Linux checks the TSC
against ``refined-jiffies``, counted by timer interrupts that a busy host delivers late, and marks the TSC
unstable (before the bit: 4 of 5 two-vCPU boots beside ``stress-ng --cpu 2``; with it 0 of 6). With the
bit Linux also skips the 20 ms TSC warp test at each AP bring-up, since every vCPU's TSC_ADJUST agrees.
What differs from hardware: a guest that writes the MSR to move its TSC sees no effect, as with WRMSR to
IA32_TSC. unicorn-engine/unicorn PR #2298 (merged 2026-07, in no release yet: 2.1.4 is the newest on PyPI)
makes RDMSR/WRMSR hookable; with it, the MSR becomes a per-vCPU addend to the guest TSC offset."""

SAVED_MSRS = (
    MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP, MSR_IA32_PAT,
    MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK, MSR_KERNEL_GS_BASE, MSR_TSC_AUX,
)
"""MSRs ``save_state`` reports (FS/GS bases travel in the segment registers, EFER in ``state.efer``)."""
