"""Model-specific registers under the software CPU.

Guest RDMSR/WRMSR cannot be hooked in Unicorn 2.1.4: they execute inside the engine's own
``helper_rdmsr``/``helper_wrmsr`` (QEMU 5.0 code). Measured (DESIGN.md): the core implements EFER,
STAR/LSTAR/CSTAR/FMASK, FS/GS/KERNEL_GS bases, PAT, TSC_AUX and the SYSENTER MSRs; unknown MSRs read 0
and ignore writes instead of raising #GP; IA32_APIC_BASE always reads 0; MISC_ENABLE starts at
:data:`RESET_MISC_ENABLE` (fast strings off, measured to be faster here). Consequences
under TCG: no x2APIC, no TSC-deadline timer, no kvmclock (CPUID does not offer them, see
:mod:`pyemu.accel.tcg.io_hooks`); the LAPIC is an xAPIC MMIO device at 0xfee00000 on the board's bus.

``load_state``/``save_state`` move MSRs through the same helpers (Unicorn's ``UC_X86_REG_MSR`` register
interface), so what they can carry is exactly :data:`SAVED_MSRS`. EFER is special: WRMSR cannot set
EFER.LMA, so the vCPU writes EFER into the CPU-state blob directly (:mod:`pyemu.accel.tcg.state_io`).
"""

from __future__ import annotations

import ctypes
from typing import Any

from pyemu.accel.tcg.errors import EngineError

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

MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1 << 0

RESET_MISC_ENABLE = 0
"""What IA32_MISC_ENABLE holds when a software-CPU vCPU is created: fast strings *off*, deliberately.

QEMU's CPU reset turns fast strings on (``MSR_IA32_MISC_ENABLE_DEFAULT``), as firmware does on hardware;
Unicorn's register reset zeroes the MSR, and a family-6 Intel guest that reads the bit clear says
"Disabled fast string operations" and drops REP_GOOD and ERMS, so ``copy_user``/``memcpy``/``clear_page``
take their unrolled loops instead of ``rep movsq``/``rep stosq``. Under the software CPU the loops are the
faster choice: a REP string instruction runs one iteration per pass through its translated block. Measured
on 2026-12-07 (guest TCP over virtio-net, 64 MiB, three transfers per boot, boots alternating): guest ->
host 232-310 MB/s with the bit set against 338-501 without, host -> guest 346-518 against 499-636; a PVH
boot level either way (1.98 / 1.99 s, 16 interleaved rounds). Firmware may leave the bit clear on hardware
too, so this is a CPU Linux knows. pyemu writes the value itself rather than rely on Unicorn's reset, and
the MSR travels in :data:`SAVED_MSRS` (a guest that sets the bit keeps it across a save and restore)."""

SAVED_MSRS = (
    MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP, MSR_IA32_PAT,
    MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_FMASK, MSR_KERNEL_GS_BASE, MSR_TSC_AUX, MSR_IA32_MISC_ENABLE,
)
"""MSRs ``save_state`` reports (FS/GS bases travel in the segment registers, EFER in ``state.efer``)."""

MSR_IA32_ARCH_CAPABILITIES = 0x10A

# IA32_ARCH_CAPABILITIES bits (Intel SDM vol. 4, table 2-2; Linux's msr-index.h names).
ARCH_CAP_RDCL_NO = 1 << 0                # no Meltdown (rogue data cache load)
ARCH_CAP_SKIP_VMENTRY_L1DFLUSH = 1 << 3
ARCH_CAP_SSB_NO = 1 << 4                 # no speculative store bypass
ARCH_CAP_MDS_NO = 1 << 5
ARCH_CAP_PSCHANGE_MC_NO = 1 << 6         # no machine check on a page-size change (iTLB multihit)
ARCH_CAP_TAA_NO = 1 << 8
ARCH_CAP_SBDR_SSDP_NO = 1 << 13          # the three "MMIO stale data" immunities
ARCH_CAP_FBSDP_NO = 1 << 14
ARCH_CAP_PSDP_NO = 1 << 15
ARCH_CAP_BHI_NO = 1 << 20
ARCH_CAP_PBRSB_NO = 1 << 24
ARCH_CAP_GDS_NO = 1 << 26
ARCH_CAP_RFDS_NO = 1 << 27
ARCH_CAP_ITS_NO = 1 << 62

SOFTWARE_CPU_ARCH_CAPABILITIES = (
    ARCH_CAP_RDCL_NO | ARCH_CAP_SKIP_VMENTRY_L1DFLUSH | ARCH_CAP_SSB_NO | ARCH_CAP_MDS_NO
    | ARCH_CAP_PSCHANGE_MC_NO | ARCH_CAP_TAA_NO | ARCH_CAP_SBDR_SSDP_NO | ARCH_CAP_FBSDP_NO | ARCH_CAP_PSDP_NO
    | ARCH_CAP_BHI_NO | ARCH_CAP_PBRSB_NO | ARCH_CAP_GDS_NO | ARCH_CAP_RFDS_NO | ARCH_CAP_ITS_NO
)
"""What the software CPU's IA32_ARCH_CAPABILITIES reads (CPUID.7.0:EDX[29] offers the MSR): the
"not affected" bit of every speculative-execution flaw that has one.

Why true: the software CPU executes the guest's instructions one after another, checking each access
against the guest's page tables before it reads anything; it has no branch predictor, store buffer, fill
buffer or line fill the guest could sample, and no page-size change can machine-check it. Not set: the bits
that announce a mitigation or a control (IBRS_ALL, TSX_CTRL, FB_CLEAR, RRSBA, GDS_CTRL...), since the
software CPU implements none of their MSRs.

Why it matters: a family-6 Intel CPU without the MSR is assumed vulnerable to everything, and Linux 6.1 then
turns on page-table isolation (a CR3 switch, which flushes the software TLB, at every kernel entry and
exit), VERW buffer clearing and ITS return thunks. Measured on a PVH boot of Debian's kernel: ``nopti``
alone took 0.2-0.3 s off ~3.0 s. QEMU's default TCG models are AMD ones, which Linux trusts by family.

Only pyemu's libunicorn can answer it (``uc_pyemu_set_arch_capabilities``); PyPI's Unicorn reads every MSR
it does not know as 0, which is also a valid value of this MSR (a CPU claiming no immunity), so offering
the CPUID bit is truthful on both libraries."""


def set_arch_capabilities(library: ctypes.CDLL, uc_handle: Any, offered: bool) -> int:
    """Make the engine's IA32_ARCH_CAPABILITIES read :data:`SOFTWARE_CPU_ARCH_CAPABILITIES` where
    ``offered`` (the vCPU's CPUID has the bit) and the library can; returns what the guest will read."""
    setter = getattr(library, "uc_pyemu_set_arch_capabilities", None)
    if not offered or setter is None:
        return 0
    status = setter(uc_handle, ctypes.c_uint64(SOFTWARE_CPU_ARCH_CAPABILITIES))
    if status != 0:
        raise EngineError(f"uc_pyemu_set_arch_capabilities failed with error {status}", operation="msr")
    return SOFTWARE_CPU_ARCH_CAPABILITIES
