"""Architectural x86-64 vCPU state shared by both accelerators.

Boot protocols build an initial :class:`X86CpuState`; each accelerator loads it into its engine
(KVM_SET_REGS/SREGS/MSRS, Unicorn register writes plus its CPU-state blob) and can read it back, so a later
snapshot moves between accelerators. Segment registers carry the full hidden descriptor cache, because a
CPU entered in protected or long mode has no real-mode history to derive it from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Control-register and EFER bits used by boot code and the accelerators.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_RESERVED = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclass(frozen=True)
class Segment:
    """A segment register with its hidden descriptor cache (KVM's ``kvm_segment``)."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3          # data read/write, accessed
    present: bool = True
    dpl: int = 0
    db: bool = False       # default operand size 32-bit
    s: bool = True         # code/data (not system)
    l: bool = False        # 64-bit code segment
    g: bool = False        # limit in 4 KiB units
    unusable: bool = False

    @staticmethod
    def flat_code64(selector: int = 0x10) -> "Segment":
        return Segment(selector, 0, 0xFFFFFFFF, type=0xB, l=True, g=True)

    @staticmethod
    def flat_code32(selector: int = 0x10) -> "Segment":
        return Segment(selector, 0, 0xFFFFFFFF, type=0xB, db=True, g=True)

    @staticmethod
    def flat_data(selector: int = 0x18) -> "Segment":
        return Segment(selector, 0, 0xFFFFFFFF, type=0x3, db=True, g=True)

    @staticmethod
    def tss64(selector: int, base: int, limit: int = 0x67) -> "Segment":
        return Segment(selector, base, limit, type=0xB, s=False)


@dataclass(frozen=True)
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


@dataclass
class X86CpuState:
    """Registers of one vCPU. Unset general registers are zero; ``msrs`` maps MSR index to value."""

    regs: dict[str, int] = field(default_factory=lambda: {name: 0 for name in GPR_NAMES})
    rip: int = 0xFFF0
    rflags: int = RFLAGS_RESERVED
    cs: Segment = Segment(0xF000, 0xFFFF0000, type=0xB)
    ds: Segment = Segment()
    es: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    ss: Segment = Segment()
    tr: Segment = Segment(type=0xB, s=False)
    ldt: Segment = Segment(type=0x2, s=False)
    gdt: DescriptorTable = DescriptorTable()
    idt: DescriptorTable = DescriptorTable()
    cr0: int = CR0_ET | CR0_NE
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    msrs: dict[int, int] = field(default_factory=dict)

    def copy(self) -> "X86CpuState":
        return replace(self, regs=dict(self.regs), msrs=dict(self.msrs))

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    @property
    def protected_mode(self) -> bool:
        return bool(self.cr0 & CR0_PE)

    def set_flat_protected32(self, entry: int) -> None:
        """Flat 32-bit protected mode, paging off: the PVH and multiboot entry state."""
        self.cr0 = CR0_PE | CR0_ET | CR0_NE
        self.cr4 = 0
        self.efer = 0
        self.cs = Segment.flat_code32(0x10)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(self, name, Segment.flat_data(0x18))
        self.tr = Segment(0, 0, 0xFFFF, type=0xB, s=False)
        self.rip = entry
        self.rflags = RFLAGS_RESERVED

    def set_flat_long64(self, entry: int, cr3: int) -> None:
        """64-bit long mode with paging on through ``cr3``: the bzImage 64-bit entry state."""
        self.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
        self.cr4 = CR4_PAE
        self.cr3 = cr3
        self.efer = EFER_LME | EFER_LMA
        self.cs = Segment.flat_code64(0x10)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(self, name, Segment.flat_data(0x18))
        self.tr = Segment(0, 0, 0xFFFF, type=0xB, s=False)
        self.rip = entry
        self.rflags = RFLAGS_RESERVED
