"""Identity-mapped 4-level page tables for entering a kernel in long mode.

The 64-bit boot protocol requires paging on, with the kernel, zero page and command line identity-mapped.
We map everything from 0 up to at least 4 GiB (and the RAM above it, up to what the fixed page-table area
holds) with 2 MiB pages: 2 MiB pages need no CPUID feature (1 GiB pages would), and Linux's decompressor
builds its own tables right away, mapping anything else it touches on demand.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyemu.system.memory import GuestMemory

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # in a PD entry: this entry maps a 2 MiB page
PAGE_2M = 2 << 20
GIB = 1 << 30
MIN_IDENTITY_MAP = 4 * GIB
ENTRIES = 512


@dataclass(frozen=True)
class PageTables:
    """Where the tables went and what they map."""

    pml4: int
    pdpt: int
    pd_base: int
    pd_count: int

    @property
    def mapped_bytes(self) -> int:
        return self.pd_count * GIB

    @property
    def size(self) -> int:
        """Bytes used from the PML4 on (the PML4, PDPT and PDs are contiguous pages)."""
        return self.pd_base + self.pd_count * 0x1000 - self.pml4


def identity_gib_needed(ram_end: int, max_pds: int) -> int:
    """How many GiB (one page directory each) to map: at least 4 GiB, all RAM if the area allows."""
    wanted = max(MIN_IDENTITY_MAP, ram_end)
    return min((wanted + GIB - 1) // GIB, max_pds, ENTRIES)


def build_identity_tables(
    memory: GuestMemory, *, pml4: int, pdpt: int, pd_base: int, gib: int
) -> PageTables:
    """Write PML4 -> PDPT -> ``gib`` page directories of 2 MiB pages mapping ``[0, gib GiB)`` 1:1.

    The tables are contiguous pages starting at ``pd_base``; the caller has reserved that memory.
    """
    if not 1 <= gib <= ENTRIES:
        raise ValueError(f"cannot identity-map {gib} GiB with one PDPT")
    flags = PTE_PRESENT | PTE_WRITABLE
    memory.fill(pml4, 0x1000)
    memory.fill(pdpt, 0x1000)
    memory.write_u64(pml4, pdpt | flags)
    pdpt_entries = bytearray(0x1000)
    for index in range(gib):
        struct.pack_into("<Q", pdpt_entries, index * 8, (pd_base + index * 0x1000) | flags)
    memory.write(pdpt, pdpt_entries)
    directory = bytearray(0x1000)
    for gib_index in range(gib):
        base = gib_index * GIB
        for slot in range(ENTRIES):
            struct.pack_into("<Q", directory, slot * 8, (base + slot * PAGE_2M) | flags | PTE_PAGE_SIZE)
        memory.write(pd_base + gib_index * 0x1000, directory)
    return PageTables(pml4, pdpt, pd_base, gib)


def translate(memory: GuestMemory, cr3: int, vaddr: int) -> int | None:
    """Walk 4-level tables from ``cr3`` for ``vaddr``; the physical address or None if not mapped.

    Supports 4 KiB, 2 MiB and 1 GiB pages. Used by tests and debugging to check what a table maps.
    """
    table = cr3 & ~0xFFF & ((1 << 52) - 1)
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = memory.read_u64(table + ((vaddr >> shift) & 0x1FF) * 8)
        if not entry & PTE_PRESENT:
            return None
        address = entry & 0x000F_FFFF_FFFF_F000
        if level in (1, 2) and entry & PTE_PAGE_SIZE:
            page_mask = (1 << shift) - 1
            return (address & ~page_mask) | (vaddr & page_mask)
        table = address
    return table | (vaddr & 0xFFF)
