"""PVH direct boot of an ELF ``vmlinux`` (Xen's HVM direct-boot ABI, also used by QEMU and Firecracker).

Facts from Xen's ``arch-x86/hvm/start_info.h`` and Linux's ``arch/x86/platform/pvh``:

* The kernel advertises its 32-bit entry with a ``XEN_ELFNOTE_PHYS32_ENTRY`` (type 18) note in the "Xen"
  note namespace; its descriptor is the physical entry address (4 or 8 bytes).
* Segments are loaded at their physical addresses (``p_paddr``).
* Entry state: flat 32-bit protected mode, paging off, interrupts off, EBX = the physical address of a
  ``struct hvm_start_info``; CS 32-bit execute/read, DS/ES/SS 32-bit read/write, all flat.
* ``hvm_start_info`` (version 1, 56 bytes): magic 0x336ec578, version, flags, nr_modules, modlist_paddr,
  cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved. Modules are 32-byte
  ``hvm_modlist_entry`` records (paddr, size, cmdline_paddr, reserved); Linux takes the first as its
  initrd. The memory map is 24-byte ``hvm_memmap_table_entry`` records (addr, size, type, reserved) with
  the e820 type numbers.
"""

from __future__ import annotations

import os
import struct
from typing import Iterable

from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.cmdline import place_cmdline
from pyemu.target.x86.boot.e820 import E820Map, EntryLike
from pyemu.target.x86.boot.elfimage import ElfImage, place_segments, read_elf
from pyemu.target.x86.boot.errors import MemoryMapError, UnsupportedProtocolError
from pyemu.target.x86.boot.gdt import install_gdt
from pyemu.target.x86.boot.image import ImageFile
from pyemu.target.x86.boot.initrd import place_initrd
from pyemu.target.x86.boot.layout import (
    BOOT_INFO_ADDR,
    BOOT_INFO_SIZE,
    GDT_ADDR,
    MEMMAP_ADDR,
    MEMMAP_AREA_SIZE,
    STACK_TOP,
    start_plan,
)
from pyemu.target.x86.boot.result import BootResult
from pyemu.target.x86.cpu_state import X86CpuState

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = "Xen"
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO_FORMAT = "<IIIIQQQQII"
START_INFO_SIZE = struct.calcsize(START_INFO_FORMAT)  # 56
MODLIST_ENTRY_FORMAT = "<QQQQ"
MODLIST_ENTRY_SIZE = struct.calcsize(MODLIST_ENTRY_FORMAT)  # 32
MEMMAP_ENTRY_FORMAT = "<QQII"
MEMMAP_ENTRY_SIZE = struct.calcsize(MEMMAP_ENTRY_FORMAT)  # 24
MODLIST_ADDR = BOOT_INFO_ADDR + 0x40  # right after the 56-byte start_info, 64-byte aligned
# PVH carries no command-line limit; Linux x86 copies at most COMMAND_LINE_SIZE (2048) bytes with the NUL,
# so a longer line would be cut silently. Refusing it is clearer.
PVH_CMDLINE_LIMIT = 2047
INITRD_LIMIT = 1 << 32  # keep the initrd where a 32-bit entry path can reach it
assert MODLIST_ADDR + MODLIST_ENTRY_SIZE <= BOOT_INFO_ADDR + BOOT_INFO_SIZE


def pvh_entry_point(image: ElfImage) -> int | None:
    """The PHYS32_ENTRY address from the "Xen" notes, or None when the kernel has no PVH entry."""
    note = image.find_note(XEN_NOTE_NAME, XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        return None
    if len(note.desc) >= 8:
        return int(struct.unpack_from("<Q", note.desc)[0])
    if len(note.desc) >= 4:
        return int(struct.unpack_from("<I", note.desc)[0])
    return None


def build_start_info(
    *,
    cmdline_addr: int,
    rsdp_addr: int,
    modlist_addr: int,
    nr_modules: int,
    memmap_addr: int,
    memmap_entries: int,
) -> bytes:
    """The 56-byte version-1 ``hvm_start_info``."""
    return struct.pack(
        START_INFO_FORMAT,
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,  # flags: no SIF_* apply to an HVM guest
        nr_modules,
        modlist_addr if nr_modules else 0,
        cmdline_addr,
        rsdp_addr,
        memmap_addr,
        memmap_entries,
        0,
    )


def build_modlist_entry(addr: int, size: int, cmdline_addr: int = 0) -> bytes:
    return struct.pack(MODLIST_ENTRY_FORMAT, addr, size, cmdline_addr, 0)


def build_memmap(e820: E820Map) -> bytes:
    """The e820 map as ``hvm_memmap_table_entry`` records."""
    return b"".join(struct.pack(MEMMAP_ENTRY_FORMAT, e.addr, e.size, int(e.type), 0) for e in e820)


def load_pvh(
    memory: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str,
    e820: E820Map | Iterable[EntryLike],
    rsdp_addr: int | None = None,
) -> BootResult:
    """Load an ELF kernel with a PVH entry note; return vCPU 0's flat 32-bit entry state."""
    memory_map = E820Map.coerce(e820)
    with ImageFile(kernel_path, "kernel") as image:
        path = image.path
        elf = read_elf(image.stream, path=path, file_size=image.size)
        entry = pvh_entry_point(elf)
        if entry is None:
            raise UnsupportedProtocolError(
                f"kernel '{path}' has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y",
                path=path,
            )
        if not elf.segments:
            raise UnsupportedProtocolError(f"kernel '{path}' has no PT_LOAD segments", path=path)
        if entry >= 1 << 32:
            raise UnsupportedProtocolError(f"kernel '{path}': PVH entry {entry:#x} is above 4 GiB", path=path)
        plan = start_plan(memory, memory_map, path=path, rsdp_addr=rsdp_addr)
        memmap_size = len(memory_map) * MEMMAP_ENTRY_SIZE
        if memmap_size > MEMMAP_AREA_SIZE:
            raise MemoryMapError(f"the memory map has {len(memory_map)} entries, more than PVH's area holds")
        plan.reserve("hvm_start_info", BOOT_INFO_ADDR, BOOT_INFO_SIZE)
        plan.reserve("memory map", MEMMAP_ADDR, MEMMAP_AREA_SIZE)
        cmdline_addr = place_cmdline(plan, cmdline, limit=PVH_CMDLINE_LIMIT, path=path)
        kernel = place_segments(plan, image, elf)

    initrd = place_initrd(plan, initrd_path, limit=INITRD_LIMIT) if initrd_path is not None else None
    memory.fill(BOOT_INFO_ADDR, BOOT_INFO_SIZE)
    if initrd is not None:
        memory.write(MODLIST_ADDR, build_modlist_entry(initrd.addr, initrd.size))
    memory.write(MEMMAP_ADDR, build_memmap(memory_map))
    memory.write(
        BOOT_INFO_ADDR,
        build_start_info(
            cmdline_addr=cmdline_addr,
            rsdp_addr=rsdp_addr or 0,
            modlist_addr=MODLIST_ADDR,
            nr_modules=1 if initrd else 0,
            memmap_addr=MEMMAP_ADDR,
            memmap_entries=len(memory_map),
        ),
    )

    cpu = X86CpuState()
    cpu.set_flat_protected32(entry)
    install_gdt(memory, GDT_ADDR, cpu)
    cpu.regs["rbx"] = BOOT_INFO_ADDR
    cpu.regs["rsp"] = STACK_TOP
    return BootResult(
        protocol="pvh",
        cpu=cpu,
        entry=entry,
        boot_info_addr=BOOT_INFO_ADDR,
        cmdline_addr=cmdline_addr,
        kernel=kernel,
        initrd=initrd,
        placements=tuple(plan.placements),
    )
