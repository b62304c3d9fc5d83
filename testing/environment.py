"""A minimal operating-system environment in guest RAM for guest-program tests.

Long mode (``mode="long"``), identity-mapped guest RAM and device space:

====================  =========================================================================
0x1000                PML4; 0x2000 PDPT; 0x3000..0x6000 four page directories (2 MiB pages, 4 GiB)
0x7000                ``pt0``: 4 KiB page table for the first 2 MiB (page 0 left not present)
0x8000                ``gdt``: null, 0x08 kernel code64, 0x10 kernel data, 0x18 user code32,
                      0x20 user data (0x23), 0x28 user code64 (0x2b), 0x30 64-bit TSS, 0x40 kernel code32
0x9000                ``tss``: RSP0 = ``rsp0_top``, IST1..7 = ``ist1_top``..``ist7_top``
0xA000                ``idt``: gates for the program's handlers
0xF000                catch-all stubs (16 bytes per vector) for vectors without a handler
0x10000..0x20000      initial kernel stack (``stack_top``)
0x20000..0x24000      ring-0 stack of the TSS (``rsp0_top``); IST stacks of 4 KiB up to 0x2B000
0x30000..0x40000      user stack (``user_stack_top``); every page is user-accessible
0x40000..0x50000      ``data``: scratch memory for results
0x100000              ``main`` and then every other section, each 4 KiB aligned
====================  =========================================================================

SYSCALL is enabled (EFER.SCE) with STAR giving kernel CS/SS 0x08/0x10 and user CS/SS 0x2b/0x23 on
SYSRET, FMASK clearing TF/DF/IF/NT/AC; LSTAR is the ``syscall_entry`` section when there is one.

Protected mode (``mode="protected"``): flat 32-bit segments (0x08 code, 0x10 data, 0x1b/0x23 user), a
32-bit TSS at 0x28 with SS0:ESP0 = 0x10:``rsp0_top``, 8-byte IDT gates, paging off -- the state PVH and
multiboot kernels start in. With ``paging=True``: 32-bit paging (no PAE), page directory at 0x1000 with
4 MiB PSE pages identity-mapping 4 GiB, except the first 4 MiB mapped through ``pt0`` at 0x7000 with
4-byte entries (:func:`pte_address32`).

Vectors without a handler get a stub that writes ``UNEXPECTED_VECTOR | vector`` to the exit port, so an
unexpected exception ends the test with a readable result instead of a hang.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_state import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    DescriptorTable,
    Segment,
    X86CpuState,
)
from pyemu.testing.asm import assemble
from pyemu.testing.errors import LayoutError

CR4_PSE = 1 << 4
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_FMASK = 0xC0000084

EXIT_PORT = 0xF4
CONSOLE_PORT = 0xE9
IRQ_PORT = 0x520
RECORD_PORT = 0x510
RECORD_PORT_SIZE = 0x10
RECORD_MMIO = 0x2000_0000
RECORD_MMIO_SIZE = 0x1000
UNEXPECTED_VECTOR = 0xDEAD0000

PML4, PDPT, PD0, PT0 = 0x1000, 0x2000, 0x3000, 0x7000
GDT, TSS, IDT = 0x8000, 0x9000, 0xA000
STUBS = 0xF000
STACK_TOP, RSP0_TOP, USER_STACK_TOP = 0x20000, 0x24000, 0x40000
DATA, DATA_SIZE = 0x40000, 0x10000
CODE_BASE = 0x100000
KERNEL_CS, KERNEL_DS, USER_CS32, USER_DS, USER_CS, TSS_SEL, KERNEL_CS32 = 0x08, 0x10, 0x1B, 0x23, 0x2B, 0x30, 0x40
PM_KERNEL_CS, PM_KERNEL_DS, PM_USER_CS, PM_USER_DS, PM_TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
DEFAULT_FMASK = 0x4_4700  # AC, NT, DF, IF, TF
_PAGE = 0x1000


@dataclass(frozen=True)
class Gate:
    """How one IDT entry is built."""

    kind: str = "interrupt"   # "interrupt" or "trap"
    dpl: int = 0
    ist: int = 0              # long mode only
    present: bool = True
    selector: int | None = None


@dataclass
class GuestProgram:
    """A guest program: ``code`` is the ``main`` section, entered at CPL0 with interrupts off."""

    code: str
    mode: str = "long"
    handlers: dict[int, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)
    gates: dict[int, Gate] = field(default_factory=dict)
    msrs: dict[int, int | str] = field(default_factory=dict)
    symbols: dict[str, int] = field(default_factory=dict)
    regs: dict[str, int] = field(default_factory=dict)
    catch_unexpected: bool = True
    paging: bool = False      # protected mode only (long mode always pages)

    def __post_init__(self) -> None:
        if self.mode not in ("long", "protected"):
            raise LayoutError(f"unknown guest mode {self.mode!r} (long or protected)")


@dataclass
class BuiltProgram:
    state: X86CpuState
    symbols: dict[str, int]


def ist_top(index: int) -> int:
    return RSP0_TOP + _PAGE * index


def base_symbols(mode: str) -> dict[str, int]:
    """The environment's addresses and selectors, as assembler symbols."""
    symbols = {
        "pml4": PML4, "pdpt": PDPT, "pd0": PD0, "pt0": PT0, "gdt": GDT, "tss": TSS, "idt": IDT,
        "stack_top": STACK_TOP, "rsp0_top": RSP0_TOP, "user_stack_top": USER_STACK_TOP,
        "data": DATA, "exit_port": EXIT_PORT, "console_port": CONSOLE_PORT, "record_port": RECORD_PORT,
        "record_mmio": RECORD_MMIO, "irq_port": IRQ_PORT, "unexpected_vector": UNEXPECTED_VECTOR,
    }
    symbols.update({f"ist{i}_top": ist_top(i) for i in range(1, 8)})
    if mode == "long":
        symbols.update(kernel_cs=KERNEL_CS, kernel_ds=KERNEL_DS, user_cs=USER_CS, user_ds=USER_DS,
                       user_cs32=USER_CS32, tss_sel=TSS_SEL, kernel_cs32=KERNEL_CS32)
    else:
        symbols.update(kernel_cs=PM_KERNEL_CS, kernel_ds=PM_KERNEL_DS, user_cs=PM_USER_CS, user_ds=PM_USER_DS,
                       tss_sel=PM_TSS_SEL)
    return symbols


def pte_address(linear: int) -> int:
    """Guest-physical address of the 4 KiB page-table entry mapping ``linear`` (first 2 MiB only)."""
    if not 0 <= linear < 0x200000:
        raise LayoutError(f"{linear:#x} is not mapped by 4 KiB pages (first 2 MiB only)")
    return PT0 + 8 * (linear >> 12)


def pte_address32(linear: int) -> int:
    """Guest-physical address of the 4-byte PTE mapping ``linear`` in protected mode with paging."""
    if not 0 <= linear < 0x400000:
        raise LayoutError(f"{linear:#x} is not mapped by 4 KiB pages (first 4 MiB only)")
    return PT0 + 4 * (linear >> 12)


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    low = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    high = ((base >> 16) & 0xFF) | (access << 8) | (((limit >> 16) & 0xF) << 16) | (flags << 20) \
        | (base & 0xFF000000)
    return struct.pack("<II", low, high)


def _gate64(offset: int, selector: int, gate: Gate) -> bytes:
    kind = 0xE if gate.kind == "interrupt" else 0xF
    attributes = (gate.ist & 7) | (kind << 8) | ((gate.dpl & 3) << 13) | ((1 if gate.present else 0) << 15)
    low = (offset & 0xFFFF) | (selector << 16) | (attributes << 32) | ((offset >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", low, offset >> 32)


def _gate32(offset: int, selector: int, gate: Gate) -> bytes:
    kind = 0xE if gate.kind == "interrupt" else 0xF
    high = (offset & 0xFFFF0000) | (kind << 8) | ((gate.dpl & 3) << 13) | ((1 if gate.present else 0) << 15)
    return struct.pack("<II", (offset & 0xFFFF) | (selector << 16), high)


def _stub(vector: int) -> bytes:
    """16 bytes valid as 32- and 64-bit code: mov eax, UNEXPECTED|vector; mov dx, EXIT_PORT; out dx, eax;
    hlt; jmp back to the start."""
    code = b"\xb8" + struct.pack("<I", UNEXPECTED_VECTOR | vector) + b"\x66\xba" + struct.pack("<H", EXIT_PORT)
    code += b"\xef\xf4"
    code += b"\xeb" + bytes([(-(len(code) + 2)) & 0xFF])
    return code.ljust(16, b"\x90")


def _place_sections(sections: dict[str, str], bits: int, symbols: dict[str, int]) -> dict[str, bytes]:
    """Two passes: size every section with placeholder symbols, give each a 4 KiB-aligned slot, then
    assemble for real with every section address known."""
    addresses: dict[str, int] = {}
    cursor = CODE_BASE
    for name, source in sections.items():
        size = len(assemble(source, address=cursor, bits=bits, symbols=symbols, section=name,
                            default_symbol=CODE_BASE))
        addresses[name] = cursor
        cursor += (size + 256 + _PAGE - 1) // _PAGE * _PAGE
    if cursor > 0x200000:
        raise LayoutError("guest program sections exceed 1 MiB")
    symbols.update(addresses)
    placed = {}
    for name, source in sections.items():
        code = assemble(source, address=addresses[name], bits=bits, symbols=symbols, section=name)
        slot_end = min([a for a in addresses.values() if a > addresses[name]], default=0x200000)
        if addresses[name] + len(code) > slot_end:
            raise LayoutError(f"section {name} grew beyond its slot between assembly passes")
        placed[name] = code
    return placed


def _resolve(value: int | str, symbols: dict[str, int]) -> int:
    if isinstance(value, str):
        if value not in symbols:
            raise LayoutError(f"unknown symbol {value!r}")
        return symbols[value]
    return value


def build(program: GuestProgram, memory: GuestMemory) -> BuiltProgram:
    """Write the environment and the program into ``memory``; return the entry state and symbols."""
    long_mode = program.mode == "long"
    bits = 64 if long_mode else 32
    symbols = base_symbols(program.mode)
    symbols.update(program.symbols)
    # After the program's last instruction: stop here (an exit-port OUT does not end the engine's
    # translation block, so the instructions after it still run before the vCPU notices the stop).
    sections: dict[str, str] = {"main": program.code + "\npyemu_main_end:\ncli\nhlt\njmp pyemu_main_end\n"}
    for vector, source in program.handlers.items():
        sections[f"vector_{vector}"] = source
    sections.update(program.sections)
    placed = _place_sections(sections, bits, symbols)
    for name, code in placed.items():
        memory.write(symbols[name], code)
    if program.catch_unexpected:
        memory.write(STUBS, b"".join(_stub(vector) for vector in range(256)))
    if long_mode:
        state = _long_mode_tables(program, memory, symbols)
    else:
        state = _protected_mode_tables(program, memory, symbols)
    for name, value in program.regs.items():
        state.regs[name] = _resolve(value, symbols)
    return BuiltProgram(state, symbols)


def _handler_address(vector: int, program: GuestProgram, symbols: dict[str, int]) -> int | None:
    if vector in program.handlers:
        return symbols[f"vector_{vector}"]
    if program.catch_unexpected:
        return STUBS + 16 * vector
    return None


def _long_mode_tables(program: GuestProgram, memory: GuestMemory, symbols: dict[str, int]) -> X86CpuState:
    memory.write_u64(PML4, PDPT | 0x7)
    for gib in range(4):
        memory.write_u64(PDPT + 8 * gib, (PD0 + _PAGE * gib) | 0x7)
        for entry in range(512):
            memory.write_u64(PD0 + _PAGE * gib + 8 * entry, ((gib << 30) | (entry << 21)) | 0x87)
    memory.write_u64(PD0, PT0 | 0x7)
    for page in range(512):
        memory.write_u64(PT0 + 8 * page, (page << 12) | 0x7 if page else 0)
    gdt = b"".join([
        bytes(8),
        _descriptor(0, 0xFFFFF, 0x9A, 0xA),   # 0x08 kernel code64
        _descriptor(0, 0xFFFFF, 0x92, 0xC),   # 0x10 kernel data
        _descriptor(0, 0xFFFFF, 0xFA, 0xC),   # 0x18 user code32
        _descriptor(0, 0xFFFFF, 0xF2, 0xC),   # 0x20 user data
        _descriptor(0, 0xFFFFF, 0xFA, 0xA),   # 0x28 user code64
        _descriptor(TSS, 0x67, 0x8B, 0x0),    # 0x30 64-bit TSS (busy), low half
        bytes(8),                             # 0x38 high half of the TSS base
        _descriptor(0, 0xFFFFF, 0x9A, 0xC),   # 0x40 kernel code32
    ])
    memory.write(GDT, gdt)
    tss = bytearray(0x68)
    struct.pack_into("<Q", tss, 4, RSP0_TOP)
    for index in range(1, 8):
        struct.pack_into("<Q", tss, 0x24 + 8 * (index - 1), ist_top(index))
    struct.pack_into("<H", tss, 0x66, 0x68)
    memory.write(TSS, bytes(tss))
    for vector in range(256):
        address = _handler_address(vector, program, symbols)
        if address is None:
            continue
        gate = program.gates.get(vector, Gate())
        memory.write(IDT + 16 * vector, _gate64(address, KERNEL_CS if gate.selector is None else gate.selector, gate))
    state = X86CpuState()
    state.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    state.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    state.cr3 = PML4
    state.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE
    state.cs = Segment.flat_code64(KERNEL_CS)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, Segment.flat_data(KERNEL_DS))
    state.tr = Segment.tss64(TSS_SEL, TSS, 0x67)
    state.gdt = DescriptorTable(GDT, len(gdt) - 1)
    state.idt = DescriptorTable(IDT, 16 * 256 - 1)
    state.rip = symbols["main"]
    state.regs["rsp"] = STACK_TOP
    state.msrs = {MSR_STAR: ((USER_CS32 & ~3 | 3) << 48) | (KERNEL_CS << 32), MSR_FMASK: DEFAULT_FMASK}
    if "syscall_entry" in symbols:
        state.msrs[MSR_LSTAR] = symbols["syscall_entry"]
    for index, value in program.msrs.items():
        state.msrs[index] = _resolve(value, symbols)
    return state


def _protected_mode_tables(program: GuestProgram, memory: GuestMemory, symbols: dict[str, int]) -> X86CpuState:
    gdt = b"".join([
        bytes(8),
        _descriptor(0, 0xFFFFF, 0x9A, 0xC),   # 0x08 code32
        _descriptor(0, 0xFFFFF, 0x92, 0xC),   # 0x10 data32
        _descriptor(0, 0xFFFFF, 0xFA, 0xC),   # 0x18 user code32
        _descriptor(0, 0xFFFFF, 0xF2, 0xC),   # 0x20 user data32
        _descriptor(TSS, 0x67, 0x8B, 0x0),    # 0x28 32-bit TSS (busy)
    ])
    memory.write(GDT, gdt)
    tss = bytearray(0x68)
    struct.pack_into("<IH", tss, 4, RSP0_TOP, PM_KERNEL_DS)
    struct.pack_into("<H", tss, 0x66, 0x68)
    memory.write(TSS, bytes(tss))
    for vector in range(256):
        address = _handler_address(vector, program, symbols)
        if address is None:
            continue
        gate = program.gates.get(vector, Gate())
        memory.write(IDT + 8 * vector, _gate32(address, PM_KERNEL_CS if gate.selector is None else gate.selector, gate))
    state = X86CpuState()
    state.cr0 = CR0_PE | CR0_ET | CR0_NE
    if program.paging:
        memory.write_u32(PML4, PT0 | 0x7)
        for entry in range(1, 1024):
            memory.write_u32(PML4 + 4 * entry, (entry << 22) | 0x87)
        for page in range(1024):
            memory.write_u32(PT0 + 4 * page, (page << 12) | 0x7 if page else 0)
        state.cr0 |= CR0_PG | CR0_WP
        state.cr3 = PML4
        state.cr4 = CR4_PSE
    state.cs = Segment.flat_code32(PM_KERNEL_CS)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(state, name, Segment.flat_data(PM_KERNEL_DS))
    state.tr = Segment(PM_TSS_SEL, TSS, 0x67, type=0xB, s=False)
    state.gdt = DescriptorTable(GDT, len(gdt) - 1)
    state.idt = DescriptorTable(IDT, 8 * 256 - 1)
    state.rip = symbols["main"]
    state.regs["rsp"] = STACK_TOP
    for index, value in program.msrs.items():
        state.msrs[index] = _resolve(value, symbols)
    return state
