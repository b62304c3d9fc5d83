"""The e820 memory map: which guest-physical ranges are RAM, reserved, or hold ACPI tables.

The board knows its memory map; the loaders only translate it into each protocol's own format (the zero
page's ``e820_table``, PVH's ``hvm_memmap_table_entry`` array, multiboot's ``mmap``) and use its RAM entries
to decide where the kernel and initrd may go. Validating it once here means every protocol sees the same
sorted, non-overlapping list.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable, Iterator, Union

from pyemu.target.x86.boot.errors import MemoryMapError

ADDRESS_LIMIT = 1 << 64


class E820Type(IntEnum):
    """Entry types shared by the BIOS e820 call, the zero page, PVH and multiboot (same numbering)."""

    RAM = 1
    RESERVED = 2
    ACPI = 3  # ACPI tables, reclaimable once the OS has read them
    NVS = 4  # ACPI non-volatile storage, must be preserved
    UNUSABLE = 5
    PMEM = 7


E820_ENTRY_FORMAT = "<QQI"
E820_ENTRY_SIZE = struct.calcsize(E820_ENTRY_FORMAT)  # 20 bytes, packed, as in boot_params


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size

    def overlaps(self, addr: int, size: int) -> bool:
        return addr < self.end and self.addr < addr + size

    def contains(self, addr: int, size: int) -> bool:
        return self.addr <= addr and addr + size <= self.end

    def pack(self) -> bytes:
        return struct.pack(E820_ENTRY_FORMAT, self.addr, self.size, int(self.type))


EntryLike = Union[E820Entry, tuple[int, int, int]]


class E820Map:
    """A validated, address-sorted e820 map.

    Entries may be added in any order; overlapping entries, empty entries, ranges past 2**64 and unknown
    types raise :class:`MemoryMapError` at once, so a board bug shows up where the map is built.
    """

    def __init__(self, entries: Iterable[EntryLike] = ()) -> None:
        self._entries: list[E820Entry] = []
        for entry in entries:
            if isinstance(entry, E820Entry):
                self.add(entry.addr, entry.size, entry.type)
            else:
                try:
                    addr, size, kind = entry
                except (TypeError, ValueError) as exc:
                    raise MemoryMapError(f"e820 entry {entry!r} is not (addr, size, type)") from exc
                self.add(addr, size, kind)

    @classmethod
    def coerce(cls, value: "E820Map | Iterable[EntryLike]") -> "E820Map":
        """Accept either a map or the board's plain list of ``(addr, size, type)`` tuples."""
        return value if isinstance(value, E820Map) else cls(value)

    def add(self, addr: int, size: int, kind: int) -> "E820Map":
        """Add one entry; returns the map so calls can be chained."""
        try:
            entry_type = E820Type(kind)
        except ValueError as exc:
            raise MemoryMapError(f"e820 entry at {addr:#x}: unknown type {kind}") from exc
        if addr < 0 or size <= 0 or addr + size > ADDRESS_LIMIT:
            raise MemoryMapError(f"e820 entry at {addr:#x} of {size:#x} bytes is empty or out of range")
        for other in self._entries:
            if other.overlaps(addr, size):
                raise MemoryMapError(
                    f"e820 entry {addr:#x}-{addr + size - 1:#x} ({entry_type.name}) overlaps "
                    f"{other.addr:#x}-{other.end - 1:#x} ({other.type.name})"
                )
        self._entries.append(E820Entry(addr, size, entry_type))
        self._entries.sort(key=lambda e: e.addr)
        return self

    # -- queries ------------------------------------------------------------------------------------------
    @property
    def entries(self) -> tuple[E820Entry, ...]:
        return tuple(self._entries)

    def __iter__(self) -> Iterator[E820Entry]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def ram(self) -> tuple[E820Entry, ...]:
        """The usable-RAM entries, in address order."""
        return tuple(e for e in self._entries if e.type == E820Type.RAM)

    @property
    def ram_end(self) -> int:
        """First address after the highest RAM entry (0 when there is no RAM)."""
        ram = self.ram()
        return ram[-1].end if ram else 0

    def is_ram(self, addr: int, size: int) -> bool:
        """True when ``[addr, addr+size)`` lies within a single RAM entry."""
        return any(e.contains(addr, size) for e in self.ram())

    def conflicting_entry(self, addr: int, size: int) -> E820Entry | None:
        """The first non-RAM entry overlapping ``[addr, addr+size)``, if any."""
        for entry in self._entries:
            if entry.type != E820Type.RAM and entry.overlaps(addr, size):
                return entry
        return None

    def lower_memory_kib(self) -> int:
        """KiB of RAM contiguous from address 0 (capped at 640 KiB), as multiboot's ``mem_lower``."""
        end = 0
        for entry in self.ram():
            if entry.addr <= end < entry.end:
                end = entry.end
        return min(end, 0xA0000) // 1024

    def upper_memory_kib(self) -> int:
        """KiB of RAM contiguous from 1 MiB up to the first hole (multiboot's ``mem_upper``)."""
        end = 0x100000
        for entry in self.ram():
            if entry.addr <= end < entry.end:
                end = entry.end
        return min((end - 0x100000) // 1024, 0xFFFFFFFF)

    def pack(self) -> bytes:
        """The entries as the packed 20-byte records of the zero page's ``e820_table``."""
        return b"".join(e.pack() for e in self._entries)

    def __repr__(self) -> str:
        inner = ", ".join(f"({e.addr:#x}, {e.size:#x}, {e.type.name})" for e in self._entries)
        return f"E820Map([{inner}])"
