"""Where the loaders put things in guest memory, and the bookkeeping that keeps them apart.

Fixed low-memory layout (every protocol uses the same addresses, so a crash dump or a ``-d boot`` log
reads the same whatever was booted)::

    0x00000-0x00fff  real-mode IVT and BIOS data area: left untouched (zero)
    0x01000-0x01fff  GDT (null, null, __BOOT_CS 0x10, __BOOT_DS 0x18)
    0x02000-0x02fff  boot information: PVH hvm_start_info + module list, or multiboot info + modules
                     + boot-loader name
    0x03000-0x06fff  memory map for PVH (hvm_memmap_table_entry) or multiboot (mmap)
    0x07000-0x07fff  zero page (struct boot_params) for the bzImage protocol
    0x08000-0x0ffff  unused
    0x10000-0x1ffff  initial stack (RSP = 0x1fff0); no protocol requires one, small kernels like it
    0x20000-0x2ffff  kernel command line (NUL-terminated)
    0x30000-0x30fff  PML4 (bzImage 64-bit entry only)
    0x31000-0x31fff  PDPT
    0x32000-0x71fff  64 page directories: 2 MiB identity pages up to 64 GiB
    0x72000-0x9fbff  unused
    0x9fc00-0xfffff  not ours: EBDA, BIOS area, the board's ACPI tables and RSDP

Kernels and initrds go above 1 MiB, only into ranges that are RAM in the board's e820 map and backed by
guest memory; :class:`BootPlan` refuses any two placements that overlap, and any placement over a
non-RAM e820 entry (such as ACPI tables the board put high).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.e820 import E820Map
from pyemu.target.x86.boot.errors import BootError, MemoryMapError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

GDT_ADDR = 0x1000
GDT_AREA_SIZE = 0x1000
BOOT_INFO_ADDR = 0x2000
BOOT_INFO_SIZE = 0x1000
MEMMAP_ADDR = 0x3000
MEMMAP_AREA_SIZE = 0x4000
ZERO_PAGE_ADDR = 0x7000
ZERO_PAGE_SIZE = 0x1000
STACK_BOTTOM = 0x10000
STACK_TOP = 0x1FFF0
CMDLINE_ADDR = 0x20000
CMDLINE_AREA_SIZE = 0x10000
PML4_ADDR = 0x30000
PDPT_ADDR = 0x31000
PD_BASE_ADDR = 0x32000
PD_MAX_COUNT = 64
PAGE_TABLE_AREA_END = PD_BASE_ADDR + PD_MAX_COUNT * 0x1000
LOW_AREA_LIMIT = 0x9FC00  # first byte the board owns (EBDA, BIOS, ACPI)
HIGH_MEMORY_START = 1 * MiB  # kernels and initrds never go below this
RSDP_SIZE = 36  # an ACPI 2.0+ RSDP, which no placement may overwrite

assert PAGE_TABLE_AREA_END <= LOW_AREA_LIMIT


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


@dataclass(frozen=True)
class Placement:
    """One range of guest memory the loader wrote (or zero-filled), with a name for messages and logs."""

    name: str
    addr: int
    size: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def overlaps(self, addr: int, size: int) -> bool:
        return addr < self.end and self.addr < addr + size

    def __str__(self) -> str:
        return f"{self.name} {self.addr:#x}-{self.end - 1:#x}"


class BootPlan:
    """Records every placement of one load and checks each against RAM, the e820 map and the others.

    Why a plan object: the three protocols place different things, but the same three mistakes are
    possible in each (outside RAM, over the board's ACPI tables, over each other) and must give a
    clear error rather than a silently corrupted guest.
    """

    def __init__(self, memory: GuestMemory, e820: E820Map, *, path: str | None = None) -> None:
        self.memory = memory
        self.e820 = e820
        self.path = path
        self.placements: list[Placement] = []

    def reserve(
        self, name: str, addr: int, size: int, *, error: type[BootError] = MemoryMapError
    ) -> Placement:
        """Claim ``[addr, addr+size)`` for ``name``; raise ``error`` if it cannot be used."""
        size = max(size, 1)
        if not self.memory.contains(addr, size):
            raise error(
                f"{self._subject()}{name} at {addr:#x}-{addr + size - 1:#x} is outside guest RAM",
                path=self.path,
            )
        conflict = self.e820.conflicting_entry(addr, size)
        if conflict is not None:
            raise error(
                f"{self._subject()}{name} at {addr:#x}-{addr + size - 1:#x} overlaps the "
                f"{conflict.type.name} range {conflict.addr:#x}-{conflict.end - 1:#x} of the memory map",
                path=self.path,
            )
        for other in self.placements:
            if other.overlaps(addr, size):
                raise error(
                    f"{self._subject()}{name} at {addr:#x}-{addr + size - 1:#x} overlaps {other}",
                    path=self.path,
                )
        placement = Placement(name, addr, size)
        self.placements.append(placement)
        return placement

    def protect(self, name: str, addr: int, size: int) -> Placement:
        """Mark a range the board already uses (e.g. its RSDP) so no later placement may overlap it.

        Unlike :meth:`reserve` this does not require RAM: the range may be ROM or reserved memory.
        """
        for other in self.placements:
            if other.overlaps(addr, size):
                raise MemoryMapError(
                    f"{self._subject()}{name} at {addr:#x}-{addr + size - 1:#x} overlaps {other}", path=self.path
                )
        placement = Placement(name, addr, max(size, 1))
        self.placements.append(placement)
        return placement

    def is_free(self, addr: int, size: int) -> bool:
        """True when ``[addr, addr+size)`` is RAM, backed by guest memory and not yet placed."""
        return (
            self.e820.is_ram(addr, size)
            and self.memory.contains(addr, size)
            and not any(p.overlaps(addr, size) for p in self.placements)
        )

    def free_ranges(self, floor: int = 0, limit: int = 1 << 64) -> list[tuple[int, int]]:
        """Unplaced RAM (per e820 and guest memory) inside ``[floor, limit)``, as sorted (start, end)."""
        ranges: list[tuple[int, int]] = []
        for entry in self.e820.ram():
            for region in self.memory.regions:
                start = max(entry.addr, region.gpa, floor)
                end = min(entry.end, region.end, limit)
                if start < end:
                    ranges.append((start, end))
        for placed in self.placements:
            split: list[tuple[int, int]] = []
            for start, end in ranges:
                if placed.end <= start or end <= placed.addr:
                    split.append((start, end))
                    continue
                if start < placed.addr:
                    split.append((start, placed.addr))
                if placed.end < end:
                    split.append((placed.end, end))
            ranges = split
        return sorted(ranges)

    def highest_fit(self, size: int, *, align: int, floor: int, limit: int) -> int | None:
        """The highest ``align``-aligned address where ``size`` bytes fit in free RAM below ``limit``."""
        for start, end in reversed(self.free_ranges(floor, limit)):
            addr = align_down(end - size, align)
            if end - start >= size and addr >= start:
                return addr
        return None

    def lowest_fit(self, size: int, *, align: int, floor: int, limit: int = 1 << 64) -> int | None:
        """The lowest ``align``-aligned address at or above ``floor`` where ``size`` bytes fit."""
        for start, end in self.free_ranges(floor, limit):
            addr = align_up(start, align)
            if addr + size <= end:
                return addr
        return None

    def _subject(self) -> str:
        return f"{self.path}: " if self.path else ""


def start_plan(
    memory: GuestMemory, e820: E820Map, *, path: str | None, rsdp_addr: int | None
) -> BootPlan:
    """A plan with what every protocol places: the board's RSDP kept clear, the GDT and the stack."""
    plan = BootPlan(memory, e820, path=path)
    if rsdp_addr is not None:
        plan.protect("ACPI RSDP", rsdp_addr, RSDP_SIZE)
    plan.reserve("GDT", GDT_ADDR, GDT_AREA_SIZE)
    plan.reserve("stack", STACK_BOTTOM, STACK_TOP + 16 - STACK_BOTTOM)
    return plan
