"""Architectural x86-64 vCPU state shared by both accelerators.

Boot protocols build an initial :class:`X86CpuState`; each accelerator loads it into its engine
(KVM_SET_REGS/SREGS/MSRS, Unicorn register writes plus its CPU-state blob) and can read it back, so a later
snapshot moves between accelerators. Segment registers carry the full hidden descriptor cache, because a
CPU entered in protected or long mode has no real-mode history to derive it from.

Beyond the registers every boot protocol sets, a vCPU has state that only a snapshot needs: the x87/SSE
registers (:class:`FpuState`), XSAVE components past the legacy area (:class:`XsaveComponents`), the APIC
base MSR, the local APIC's register page, events caught mid-delivery (:class:`PendingEvents`) and its
multiprocessor run state (:class:`MpState`). Those fields default to ``None``, meaning "not captured": an
accelerator loading a state leaves the matching part of its vCPU as it is, and one that cannot hold a
part (the software CPU has no LAPIC page of its own yet) ignores it. The formats are architectural
(FXSAVE layout, the xAPIC MMIO page), not any accelerator's structures, so either side can produce them.
"""

from __future__ import annotations

import enum
import struct
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


FXSAVE_SIZE = 512
"""Size of the legacy FXSAVE region, which is also the first 512 bytes of an XSAVE area."""
LAPIC_PAGE_SIZE = 1024
"""The xAPIC register page as captured: registers at their MMIO offsets (0x20 ID ... 0x3e0 divide)."""
FCW_INIT = 0x037F
MXCSR_INIT = 0x1F80

# FXSAVE layout (64-bit form, Intel SDM vol. 1, 10.5.1): FCW, FSW, abridged FTW, reserved, FOP, FIP,
# FDP, MXCSR, MXCSR_MASK, then ST0-7 in 16-byte slots and XMM0-15.
_FXSAVE_HEAD = struct.Struct("<HHBxHQQII")
_FXSAVE_ST_AT = 32
_FXSAVE_XMM_AT = 160
_ZERO_ST = (bytes(10),) * 8
_ZERO_XMM = (bytes(16),) * 16


@dataclass(frozen=True)
class FpuState:
    """x87 and SSE registers in architectural terms (what FXSAVE stores).

    ``st`` holds the eight 80-bit physical x87 registers (10 bytes each, little-endian, in FXSAVE's
    order ST0..ST7 relative to the stack top); ``ftw`` is the abridged tag word (bit i set = register i
    valid); ``xmm`` the sixteen 128-bit registers. ``last_ip``/``last_dp`` are the 64-bit FIP/FDP.
    """

    fcw: int = FCW_INIT
    fsw: int = 0
    ftw: int = 0
    last_opcode: int = 0
    last_ip: int = 0
    last_dp: int = 0
    st: tuple[bytes, ...] = _ZERO_ST
    mxcsr: int = MXCSR_INIT
    mxcsr_mask: int = 0
    xmm: tuple[bytes, ...] = _ZERO_XMM

    def __post_init__(self) -> None:
        if len(self.st) != 8 or any(len(r) != 10 for r in self.st):
            raise ValueError("FpuState.st: eight 10-byte x87 registers expected")
        if len(self.xmm) != 16 or any(len(r) != 16 for r in self.xmm):
            raise ValueError("FpuState.xmm: sixteen 16-byte XMM registers expected")

    @staticmethod
    def from_fxsave(area: bytes) -> "FpuState":
        """Decode a 512-byte FXSAVE region (or the legacy part of an XSAVE area)."""
        if len(area) < FXSAVE_SIZE:
            raise ValueError(f"FXSAVE region is {FXSAVE_SIZE} bytes, got {len(area)}")
        fcw, fsw, ftw, fop, fip, fdp, mxcsr, mask = _FXSAVE_HEAD.unpack_from(area, 0)
        st = tuple(bytes(area[_FXSAVE_ST_AT + 16 * i: _FXSAVE_ST_AT + 16 * i + 10]) for i in range(8))
        xmm = tuple(bytes(area[_FXSAVE_XMM_AT + 16 * i: _FXSAVE_XMM_AT + 16 * i + 16]) for i in range(16))
        return FpuState(fcw, fsw, ftw, fop, fip, fdp, st, mxcsr, mask, xmm)

    def to_fxsave(self) -> bytes:
        """Encode as a 512-byte FXSAVE region (reserved bytes zero)."""
        area = bytearray(FXSAVE_SIZE)
        _FXSAVE_HEAD.pack_into(area, 0, self.fcw, self.fsw, self.ftw, self.last_opcode, self.last_ip,
                               self.last_dp, self.mxcsr, self.mxcsr_mask)
        for i, reg in enumerate(self.st):
            area[_FXSAVE_ST_AT + 16 * i: _FXSAVE_ST_AT + 16 * i + 10] = reg
        for i, reg in enumerate(self.xmm):
            area[_FXSAVE_XMM_AT + 16 * i: _FXSAVE_XMM_AT + 16 * i + 16] = reg
        return bytes(area)


XFEATURE_PKRU = 1 << 9
"""XCR0 / XSTATE_BV bit of the PKRU component."""
XSAVE_PKRU_OFFSET, XSAVE_PKRU_SIZE = 2688, 8
"""Where PKRU sits in the standard (non-compacted) XSAVE area: CPUID.(0xD, 9).EBX/EAX on every CPU with PKU."""


@dataclass(frozen=True)
class XsaveComponents:
    """The XSAVE area past the legacy region, opaque: the 64-byte XSAVE header (XSTATE_BV first) and the
    extended components (AVX upper halves, AVX-512 ...) at their standard, non-compacted offsets (CPUID
    leaf 0xD), exactly as XSAVE lays them out at offset 512. ``xcr0`` is the guest's XCR0, which says
    which components the guest enabled. The legacy x87/SSE part lives in :class:`FpuState`."""

    xcr0: int
    area: bytes

    @property
    def xstate_bv(self) -> int:
        return int.from_bytes(self.area[:8], "little") if len(self.area) >= 8 else 0

    @property
    def pkru(self) -> int:
        """PKRU (component 9): 0, its init value, when XSTATE_BV says the component is in its init state."""
        at = XSAVE_PKRU_OFFSET - FXSAVE_SIZE
        if not self.xstate_bv & XFEATURE_PKRU or len(self.area) < at + 4:
            return 0
        return int.from_bytes(self.area[at:at + 4], "little")

    @classmethod
    def with_pkru(cls, xcr0: int, pkru: int) -> "XsaveComponents":
        """The area of a vCPU whose only extended state is PKRU (the software CPU's): the XSAVE header,
        then PKRU at its standard offset, XSTATE_BV bit 9 set unless PKRU is 0 (its init value)."""
        at = XSAVE_PKRU_OFFSET - FXSAVE_SIZE
        area = bytearray(at + XSAVE_PKRU_SIZE)
        area[:8] = (XFEATURE_PKRU if pkru else 0).to_bytes(8, "little")
        area[at:at + 4] = (pkru & 0xFFFF_FFFF).to_bytes(4, "little")
        return cls(xcr0, bytes(area))


@dataclass(frozen=True)
class PendingEvents:
    """Events a vCPU has accepted but not finished delivering, captured between two instructions.

    ``exception_vector`` is an exception being delivered (``exception_injected``) or raised and not yet
    delivered, with ``exception_error_code`` if it has one; ``interrupt_vector`` an external (or, with
    ``interrupt_soft``, software) interrupt whose delivery started. ``interrupt_shadow`` is the one-
    instruction block after STI (bit 0) or MOV SS/POP SS (bit 1). NMIs: one being delivered, one
    waiting, and whether NMIs are blocked (inside an NMI handler until its IRET). ``sipi_vector`` is the
    start-up vector of an INIT/SIPI sequence still in progress."""

    exception_vector: int | None = None
    exception_error_code: int | None = None
    exception_injected: bool = True
    interrupt_vector: int | None = None
    interrupt_soft: bool = False
    interrupt_shadow: int = 0
    nmi_injected: bool = False
    nmi_pending: bool = False
    nmi_masked: bool = False
    sipi_vector: int = 0


class MpState(enum.Enum):
    """A vCPU's multiprocessor state: running, waiting in HLT, or an AP in its INIT/SIPI sequence."""

    RUNNABLE = "runnable"
    WAIT_FOR_SIPI = "wait-for-sipi"      # after reset or INIT (an AP before the OS starts it)
    HALTED = "halted"                    # in HLT, until an interrupt
    INIT_RECEIVED = "init-received"      # INIT latched, not yet processed
    SIPI_RECEIVED = "sipi-received"      # SIPI latched, about to start at sipi_vector * 0x1000


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
    # Snapshot-only parts; None = not captured (loading leaves the vCPU's own value).
    fpu: FpuState | None = None
    xsave: XsaveComponents | None = None
    apic_base: int | None = None
    """IA32_APIC_BASE (MSR 0x1B): LAPIC address, global enable (bit 11), BSP flag (bit 8), x2APIC (bit 10)."""
    lapic: bytes | None = None
    """The local APIC's registers as the 1 KiB xAPIC MMIO page (LAPIC_PAGE_SIZE bytes)."""
    events: PendingEvents | None = None
    mp_state: MpState | None = None

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
