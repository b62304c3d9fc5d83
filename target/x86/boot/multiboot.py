"""Multiboot (version 1) for small test kernels: hand-written guests that run without Linux.

Facts from the Multiboot Specification 0.6.96:

* The header lies 4-byte aligned within the first 8192 bytes: magic 0x1BADB002, flags, checksum (the
  three sum to 0 mod 2**32). Flag bits 0-15 are requirements a loader must refuse if it does not
  understand them (0: page-align modules, 1: pass memory information, 2: video mode), bits 16-31 are
  optional; bit 16 says the header carries load addresses (the "a.out kludge": header_addr, load_addr,
  load_end_addr, bss_end_addr, entry_addr), which then take precedence over the ELF headers.
* Entry: EAX = 0x2BADB002, EBX = physical address of the multiboot information structure, 32-bit
  protected mode with paging off, CS/DS/ES/FS/GS/SS flat, interrupts off.
* Information structure: flags, mem_lower/mem_upper (KiB below 640 KiB / above 1 MiB), boot_device,
  cmdline, mods_count/mods_addr (16-byte records: start, end, string, reserved), ..., mmap_length and
  mmap_addr (records of size (u32, not counting itself), base u64, length u64, type u32), ...,
  boot_loader_name at offset 64.

We pass no video information: the video-mode request (flag 2) is accepted, and the info flags tell the
kernel none was set up.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable

from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.cmdline import place_cmdline
from pyemu.target.x86.boot.e820 import E820Map, EntryLike
from pyemu.target.x86.boot.elfimage import ElfImage, is_elf, place_segments, read_elf
from pyemu.target.x86.boot.errors import (
    ImageTooLargeError,
    MemoryMapError,
    NotAKernelError,
    TruncatedImageError,
    UnsupportedProtocolError,
)
from pyemu.target.x86.boot.gdt import install_gdt
from pyemu.target.x86.boot.image import ImageFile
from pyemu.target.x86.boot.initrd import place_initrd
from pyemu.target.x86.boot.layout import (
    BOOT_INFO_ADDR,
    BOOT_INFO_SIZE,
    CMDLINE_AREA_SIZE,
    GDT_ADDR,
    MEMMAP_ADDR,
    MEMMAP_AREA_SIZE,
    STACK_TOP,
    BootPlan,
    Placement,
    start_plan,
)
from pyemu.target.x86.boot.result import BootResult
from pyemu.target.x86.cpu_state import X86CpuState

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192

# header flags
MB_PAGE_ALIGN = 1 << 0
MB_MEMORY_INFO = 1 << 1
MB_VIDEO_MODE = 1 << 2
MB_AOUT_KLUDGE = 1 << 16
MB_KNOWN_REQUIRED = MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_VIDEO_MODE

# info flags
MBI_MEMORY = 1 << 0
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_MMAP = 1 << 6
MBI_LOADER_NAME = 1 << 9

# Layout inside the boot-information page (see layout.py for the page itself).
INFO_ADDR = BOOT_INFO_ADDR
INFO_SIZE = 0x80
MODS_ADDR = BOOT_INFO_ADDR + 0x80
MOD_ENTRY_SIZE = 16
LOADER_NAME_ADDR = BOOT_INFO_ADDR + 0x100
LOADER_NAME = b"pyemu\0"
MOD_STRING_ADDR = BOOT_INFO_ADDR + 0x200
MOD_STRING_MAX = BOOT_INFO_SIZE - 0x200
MMAP_ENTRY_FORMAT = "<IQQI"
MMAP_ENTRY_SIZE = struct.calcsize(MMAP_ENTRY_FORMAT)  # 24, of which the size field says 20
INFO_OFFSETS = {
    "flags": 0, "mem_lower": 4, "mem_upper": 8, "boot_device": 12, "cmdline": 16, "mods_count": 20,
    "mods_addr": 24, "mmap_length": 44, "mmap_addr": 48, "boot_loader_name": 64,
}
LIMIT_32BIT = 1 << 32


@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def has_addresses(self) -> bool:
        return bool(self.flags & MB_AOUT_KLUDGE)


def find_multiboot_header(head: bytes) -> MultibootHeader | None:
    """The first valid header (magic and checksum) in the first 8 KiB of ``head``, or None."""
    limit = min(len(head), MULTIBOOT_SEARCH) - 12
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, offset)
        if magic != MULTIBOOT_HEADER_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
            continue
        if flags & MB_AOUT_KLUDGE:
            if offset + 32 > len(head):
                return MultibootHeader(offset, flags)  # the caller reports the truncation
            fields = struct.unpack_from("<IIIII", head, offset + 12)
            return MultibootHeader(offset, flags, *fields)
        return MultibootHeader(offset, flags)
    return None


def build_info(
    *,
    e820: E820Map,
    cmdline_addr: int,
    mods_count: int,
    mmap_addr: int,
    mmap_length: int,
    loader_name_addr: int,
) -> bytes:
    """The multiboot information structure (first 0x80 bytes; video fields left zero)."""
    info = bytearray(INFO_SIZE)
    flags = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME
    values = {
        "flags": flags,
        "mem_lower": e820.lower_memory_kib(),
        "mem_upper": e820.upper_memory_kib(),
        "cmdline": cmdline_addr,
        "mods_count": mods_count,
        "mods_addr": MODS_ADDR if mods_count else 0,
        "mmap_length": mmap_length,
        "mmap_addr": mmap_addr,
        "boot_loader_name": loader_name_addr,
    }
    for name, value in values.items():
        struct.pack_into("<I", info, INFO_OFFSETS[name], value)
    return bytes(info)


def build_mods(mods: list[tuple[int, int, int]]) -> bytes:
    """Module records (start, end, string address, reserved) for ``(start, end, string)`` tuples."""
    if len(mods) * MOD_ENTRY_SIZE > LOADER_NAME_ADDR - MODS_ADDR:
        raise ValueError("too many multiboot modules for the boot-information page")
    return b"".join(struct.pack("<IIII", start, end, string, 0) for start, end, string in mods)


def build_mmap(e820: E820Map) -> bytes:
    """The e820 map as multiboot ``mmap`` records (``size`` = 20 excludes the size field itself)."""
    return b"".join(
        struct.pack(MMAP_ENTRY_FORMAT, MMAP_ENTRY_SIZE - 4, e.addr, e.size, int(e.type)) for e in e820
    )


def _load_with_addresses(plan: BootPlan, image: ImageFile, header: MultibootHeader) -> tuple[Placement, int]:
    """Load by the header's address fields (flag 16); returns the kernel's span and entry."""
    path = image.path
    if header.header_addr < header.load_addr:
        raise NotAKernelError(f"kernel '{path}': multiboot header_addr is below load_addr", path=path)
    file_start = header.offset - (header.header_addr - header.load_addr)
    if file_start < 0:
        raise NotAKernelError(
            f"kernel '{path}': multiboot load_addr {header.load_addr:#x} lies before the start of the file",
            path=path,
        )
    if header.load_end_addr:
        if header.load_end_addr <= header.load_addr:
            raise NotAKernelError(f"kernel '{path}': multiboot load_end_addr is not above load_addr", path=path)
        size = header.load_end_addr - header.load_addr
    else:
        size = image.size - file_start
    if file_start + size > image.size:
        raise image.truncated(file_start + size, "the multiboot load range")
    end = header.load_addr + size
    bss_end = max(header.bss_end_addr, end)
    if bss_end > LIMIT_32BIT:
        raise UnsupportedProtocolError(f"kernel '{path}': multiboot image extends above 4 GiB", path=path)
    kernel = plan.reserve("kernel", header.load_addr, bss_end - header.load_addr, error=ImageTooLargeError)
    image.copy_to_memory(plan.memory, header.load_addr, file_start, size, what="the multiboot load range")
    if bss_end > end:
        plan.memory.fill(end, bss_end - end)
    return kernel, header.entry_addr


def _elf_entry(elf: ElfImage) -> int:
    """``e_entry`` translated to a physical address through the segment that holds it."""
    for segment in elf.segments:
        if segment.vaddr <= elf.entry < segment.vaddr + segment.memsz:
            return segment.paddr + (elf.entry - segment.vaddr)
    return elf.entry


def _load_elf(plan: BootPlan, image: ImageFile) -> tuple[Placement, int]:
    path = image.path
    elf = read_elf(image.stream, path=path, file_size=image.size)
    if not elf.segments:
        raise NotAKernelError(f"kernel '{path}': ELF file has no PT_LOAD segments", path=path)
    if elf.phys_end > LIMIT_32BIT:
        raise UnsupportedProtocolError(f"kernel '{path}': multiboot ELF segments extend above 4 GiB", path=path)
    return place_segments(plan, image, elf), _elf_entry(elf)


def load_multiboot(
    memory: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str,
    e820: E820Map | Iterable[EntryLike],
    rsdp_addr: int | None = None,
) -> BootResult:
    """Load a multiboot v1 kernel (a.out-kludge addresses or ELF) with the initrd as its one module."""
    memory_map = E820Map.coerce(e820)
    with ImageFile(kernel_path, "kernel") as image:
        path = image.path
        head = image.head(MULTIBOOT_SEARCH)
        header = find_multiboot_header(head)
        if header is None:
            raise NotAKernelError(f"kernel '{path}' has no multiboot header in its first 8 KiB", path=path)
        unknown = header.flags & 0xFFFF & ~MB_KNOWN_REQUIRED
        if unknown:
            raise UnsupportedProtocolError(
                f"kernel '{path}' requires multiboot features we do not implement (flags {unknown:#x})",
                path=path,
            )
        if header.has_addresses and header.offset + 32 > image.size:
            raise TruncatedImageError(f"kernel '{path}' is truncated inside its multiboot header", path=path)
        mmap_size = len(memory_map) * MMAP_ENTRY_SIZE
        if mmap_size > MEMMAP_AREA_SIZE:
            raise MemoryMapError(f"the memory map has {len(memory_map)} entries, more than multiboot's area holds")
        plan = start_plan(memory, memory_map, path=path, rsdp_addr=rsdp_addr)
        plan.reserve("multiboot info", BOOT_INFO_ADDR, BOOT_INFO_SIZE)
        plan.reserve("memory map", MEMMAP_ADDR, MEMMAP_AREA_SIZE)
        cmdline_addr = place_cmdline(plan, cmdline, limit=CMDLINE_AREA_SIZE - 1, path=path)
        if header.has_addresses:
            kernel, entry = _load_with_addresses(plan, image, header)
        elif is_elf(head):
            kernel, entry = _load_elf(plan, image)
        else:
            raise NotAKernelError(
                f"kernel '{path}' has a multiboot header without load addresses (flag 16) and is not ELF",
                path=path,
            )
    if entry >= LIMIT_32BIT:
        raise UnsupportedProtocolError(f"kernel '{path}': multiboot entry {entry:#x} is above 4 GiB", path=path)

    memory.fill(BOOT_INFO_ADDR, BOOT_INFO_SIZE)
    mods: list[tuple[int, int, int]] = []
    initrd = place_initrd(plan, initrd_path, limit=LIMIT_32BIT) if initrd_path is not None else None
    if initrd is not None:
        # GRUB passes a module's command line as its string; ours is the initrd's file name.
        name = os.fsencode(os.path.basename(os.fspath(initrd_path or ""))).replace(b"\0", b"")
        memory.write(MOD_STRING_ADDR, name[: MOD_STRING_MAX - 1] + b"\0")
        mods.append((initrd.addr, initrd.end, MOD_STRING_ADDR))
    memory.write(MODS_ADDR, build_mods(mods))
    memory.write(LOADER_NAME_ADDR, LOADER_NAME)
    mmap = build_mmap(memory_map)
    memory.write(MEMMAP_ADDR, mmap)
    memory.write(
        INFO_ADDR,
        build_info(
            e820=memory_map,
            cmdline_addr=cmdline_addr,
            mods_count=len(mods),
            mmap_addr=MEMMAP_ADDR,
            mmap_length=len(mmap),
            loader_name_addr=LOADER_NAME_ADDR,
        ),
    )

    cpu = X86CpuState()
    cpu.set_flat_protected32(entry)
    install_gdt(memory, GDT_ADDR, cpu)
    cpu.regs["rax"] = MULTIBOOT_BOOTLOADER_MAGIC
    cpu.regs["rbx"] = INFO_ADDR
    cpu.regs["rsp"] = STACK_TOP
    return BootResult(
        protocol="multiboot",
        cpu=cpu,
        entry=entry,
        boot_info_addr=INFO_ADDR,
        cmdline_addr=cmdline_addr,
        kernel=kernel,
        initrd=initrd,
        placements=tuple(plan.placements),
    )
