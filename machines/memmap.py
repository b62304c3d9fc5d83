"""The microvm memory map: where RAM, the boot area and the fixed MMIO devices live.

Follows the shape of QEMU's microvm (and Firecracker): RAM from 0 up to the 32-bit gap, the rest above
4 GiB; the top of the 32-bit space holds the GED, virtio-mmio slots, IOAPIC and LAPIC. The ISA hole
0xa0000-0xfffff stays RAM in the mapping (it holds the RSDP and ACPI tables) but is reserved in e820.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20

LOWMEM_LIMIT = 3 * GiB          # start of the 32-bit MMIO gap
HIGHMEM_BASE = 4 * GiB
EBDA_START = 0x9FC00            # top 1 KiB of conventional memory, reserved like a BIOS EBDA
BIOS_AREA_START = 0xE0000       # ACPI tables and RSDP (the RSDP search range starts here)
BIOS_AREA_END = 0x100000
ACPI_TABLES_BASE = 0xE0000
ACPI_TABLES_SIZE = 0x1F000
RESET_VECTOR = 0xFFFF0          # where a CPU reset, or a jump to the BIOS reset entry, starts (F000:FFF0)

GED_BASE = 0xFEA00000           # generic event device, sleep and reset registers
GED_SIZE = 0x1000
VIRTIO_MMIO_BASE = 0xFEB00000   # virtio-mmio transports, 512 bytes each
VIRTIO_MMIO_SLOT_SIZE = 0x200
VIRTIO_MMIO_SLOTS = 8
VIRTIO_MMIO_FIRST_GSI = 16
IOAPIC_BASE = 0xFEC00000
IOAPIC_SIZE = 0x1000
LAPIC_BASE = 0xFEE00000
LAPIC_SIZE = 0x1000

E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class RamLayout:
    """How ``ram_size`` bytes of guest RAM are split around the 32-bit gap."""

    low_size: int
    high_size: int

    @staticmethod
    def for_size(ram_size: int) -> "RamLayout":
        low = min(ram_size, LOWMEM_LIMIT)
        return RamLayout(low, ram_size - low)

    def regions(self) -> list[tuple[int, int]]:
        """(gpa, size) pairs for :class:`~pyemu.system.memory.GuestMemory`."""
        regions = [(0, self.low_size)]
        if self.high_size:
            regions.append((HIGHMEM_BASE, self.high_size))
        return regions

    def e820(self) -> list[tuple[int, int, int]]:
        """The e820 map the guest is given: (address, size, type)."""
        entries = [
            (0, EBDA_START, E820_RAM),
            (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
            (BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, E820_RESERVED),
            (BIOS_AREA_END, self.low_size - BIOS_AREA_END, E820_RAM),
        ]
        if self.high_size:
            entries.append((HIGHMEM_BASE, self.high_size, E820_RAM))
        return entries
