"""The e820 map builder: validation, ordering, packing, and the memory sizes multiboot derives from it."""

import struct

import pytest

from pyemu.target.x86.boot.e820 import E820_ENTRY_SIZE, E820Map, E820Type
from pyemu.target.x86.boot.errors import MemoryMapError

MiB = 1 << 20


def microvm_map(ram: int = 256 * MiB) -> E820Map:
    return E820Map([(0x100000, ram - 0x100000, 1), (0, 0x9FC00, 1), (0x9FC00, 0x60400, 2)])


def test_entries_are_sorted_and_typed():
    memory_map = microvm_map()
    assert [e.addr for e in memory_map] == [0, 0x9FC00, 0x100000]
    assert [e.type for e in memory_map] == [E820Type.RAM, E820Type.RESERVED, E820Type.RAM]
    assert memory_map.ram_end == 256 * MiB
    assert memory_map.is_ram(0x200000, 0x1000)
    assert not memory_map.is_ram(0x9F000, 0x2000)  # crosses into the reserved range


def test_overlap_empty_and_unknown_type_are_refused():
    memory_map = microvm_map()
    with pytest.raises(MemoryMapError, match="overlaps"):
        memory_map.add(0x9F000, 0x2000, E820Type.ACPI)
    with pytest.raises(MemoryMapError, match="empty"):
        memory_map.add(0x200000000, 0, 1)
    with pytest.raises(MemoryMapError, match="unknown type 9"):
        memory_map.add(0x200000000, 0x1000, 9)
    with pytest.raises(MemoryMapError, match="out of range"):
        memory_map.add((1 << 64) - 0x1000, 0x2000, 1)
    with pytest.raises(MemoryMapError, match="not \\(addr, size, type\\)"):
        E820Map([(0, 1)])


def test_pack_matches_the_zero_page_record_layout():
    memory_map = E820Map([(0x100000, 0x1000, 1), (0xFEC00000, 0x1000, 2)])
    packed = memory_map.pack()
    assert len(packed) == 2 * E820_ENTRY_SIZE == 40
    assert struct.unpack_from("<QQI", packed, 20) == (0xFEC00000, 0x1000, 2)


def test_conflicting_entry_finds_non_ram():
    memory_map = microvm_map()
    assert memory_map.conflicting_entry(0x9F000, 0x2000).type == E820Type.RESERVED
    assert memory_map.conflicting_entry(0x100000, 0x1000) is None


def test_lower_and_upper_memory_for_multiboot():
    memory_map = microvm_map(128 * MiB)
    assert memory_map.lower_memory_kib() == 0x9FC00 // 1024  # 639
    assert memory_map.upper_memory_kib() == (128 * MiB - MiB) // 1024
    # A hole at 64 MiB ends the "upper memory" that multiboot reports.
    holed = E820Map([(0, 0x9FC00, 1), (0x100000, 63 * MiB, 1), (65 * MiB, 63 * MiB, 1)])
    assert holed.upper_memory_kib() == 63 * 1024
