"""A boot GDT in guest RAM that matches the segment caches of the entry state.

A CPU entered directly in protected or long mode has its segment caches loaded, so it would run without
any GDT — until the kernel reloads a segment register from GDTR (Linux's PVH and 64-bit entry code do
exactly that before installing their own GDT). The descriptors here are encoded from the very
:class:`~pyemu.target.x86.cpu_state.Segment` values put into the vCPU, so a reload finds the same segment.
"""

from __future__ import annotations

from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_state import DescriptorTable, Segment, X86CpuState

BOOT_CS = 0x10  # Linux's __BOOT_CS
BOOT_DS = 0x18  # Linux's __BOOT_DS
GDT_ENTRIES = 4  # null, unused, code, data


def encode_descriptor(segment: Segment) -> int:
    """The 8-byte code/data descriptor for ``segment`` (its limit is in bytes, as in the cache)."""
    limit = segment.limit
    if segment.g:
        limit >>= 12
    if limit > 0xFFFFF:
        raise ValueError(f"segment limit {segment.limit:#x} needs the granularity bit")
    access = (
        (segment.type & 0xF)
        | (int(segment.s) << 4)
        | ((segment.dpl & 3) << 5)
        | (int(segment.present) << 7)
    )
    flags = (int(segment.l) << 1) | (int(segment.db) << 2) | (int(segment.g) << 3)
    base = segment.base & 0xFFFFFFFF
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (access << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (flags << 52)
        | ((base >> 24) << 56)
    )


def build_gdt(code: Segment, data: Segment) -> bytes:
    """GDT bytes with ``code`` at selector 0x10 and ``data`` at 0x18 (slots 0 and 1 are null)."""
    if code.selector != BOOT_CS or data.selector != BOOT_DS:
        raise ValueError("boot GDT expects CS 0x10 and DS 0x18")
    # The accessed bit is set so the CPU never writes to the descriptor on a reload.
    entries = [0, 0, encode_descriptor(code) | (1 << 40), encode_descriptor(data) | (1 << 40)]
    return b"".join(entry.to_bytes(8, "little") for entry in entries)


def install_gdt(memory: GuestMemory, addr: int, state: X86CpuState) -> int:
    """Write the GDT for ``state``'s CS and DS at ``addr``, point ``state.gdt`` at it; returns its size."""
    table = build_gdt(state.cs, state.ds)
    memory.write(addr, table)
    state.gdt = DescriptorTable(addr, len(table) - 1)
    return len(table)
