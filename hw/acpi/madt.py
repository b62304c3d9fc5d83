"""MADT ("APIC"): the Multiple APIC Description Table.

ACPI 6.x, 5.2.12. It tells the OS where the local APICs and the IOAPIC are and how ISA IRQs map onto
global system interrupts (GSIs). Without it Linux leaves the local APIC in virtual-wire mode and never uses
its timer (see DESIGN.md). Body: Local Interrupt Controller Address (4), Flags (4: bit 0 PCAT_COMPAT =
"a dual 8259 PIC is also installed"), then entries:

* type 0 Processor Local APIC (8 bytes): ACPI processor UID, APIC ID, flags (bit 0 enabled),
* type 1 I/O APIC (12 bytes): IOAPIC ID, reserved, address, GSI base,
* type 2 Interrupt Source Override (10 bytes): bus 0 (ISA), source IRQ, GSI, MPS INTI flags,
* type 4 Local APIC NMI (6 bytes): processor UID (0xFF = all), MPS INTI flags, LINT pin.

Revision 5 is the ACPI 6.3 MADT (same x86 entries; Linux reads the "online capable" bit only from it on).
Only xAPIC entries are produced: pyemu's software CPU has no x2APIC, so APIC IDs must be below 255.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyemu.hw.acpi.errors import AcpiError
from pyemu.hw.acpi.sdt import sdt

MADT_REVISION = 5
DEFAULT_LAPIC_ADDRESS = 0xFEE00000
DEFAULT_IOAPIC_ADDRESS = 0xFEC00000

PCAT_COMPAT = 1 << 0
LAPIC_ENABLED = 1 << 0
ALL_PROCESSORS = 0xFF

ENTRY_LOCAL_APIC = 0
ENTRY_IO_APIC = 1
ENTRY_INTERRUPT_OVERRIDE = 2
ENTRY_LOCAL_APIC_NMI = 4

# MPS INTI flags: polarity in bits 0-1, trigger mode in bits 2-3 (0 = conforms to the bus).
INTI_CONFORMS = 0
INTI_ACTIVE_HIGH = 0b01
INTI_ACTIVE_LOW = 0b11
INTI_EDGE = 0b01 << 2
INTI_LEVEL = 0b11 << 2


@dataclass(frozen=True)
class InterruptOverride:
    """ISA IRQ ``source`` arrives on ``gsi`` (with MPS INTI ``flags``), e.g. the PIT's IRQ0 on GSI 2."""

    source: int
    gsi: int
    flags: int = INTI_CONFORMS


IRQ0_TO_GSI2 = InterruptOverride(source=0, gsi=2)
"""On a PC the PIT's IRQ0 is wired to IOAPIC input 2 (input 0 carries the 8259's INTR)."""


@dataclass(frozen=True)
class MadtConfig:
    apic_ids: tuple[int, ...] = (0,)
    """One local APIC per vCPU; the ACPI processor UID is the index in this tuple."""
    ioapic_id: int = 0
    ioapic_address: int = DEFAULT_IOAPIC_ADDRESS
    ioapic_gsi_base: int = 0
    lapic_address: int = DEFAULT_LAPIC_ADDRESS
    pcat_compat: bool = False
    overrides: tuple[InterruptOverride, ...] = field(default_factory=tuple)
    lint1_nmi: bool = True
    """Declare LINT1 of every local APIC as the NMI input, as PC firmware does."""

    def __post_init__(self) -> None:
        if not 1 <= len(self.apic_ids) <= 255:
            raise AcpiError(f"MADT: {len(self.apic_ids)} vCPUs (1..255 supported)")
        if len(set(self.apic_ids)) != len(self.apic_ids):
            raise AcpiError(f"MADT: duplicate APIC IDs in {self.apic_ids}")
        for apic_id in self.apic_ids:
            if not 0 <= apic_id <= 254:
                raise AcpiError(f"MADT: APIC ID {apic_id} needs x2APIC (xAPIC IDs are 0..254)")
        if not 0 <= self.ioapic_id <= 255:
            raise AcpiError(f"MADT: IOAPIC ID {self.ioapic_id} is not a byte")
        for address in (self.ioapic_address, self.lapic_address):
            if not 0 <= address <= 0xFFFFFFFF:
                raise AcpiError(f"MADT: APIC address {address:#x} is above 4 GiB")
        for override in self.overrides:
            if not 0 <= override.source <= 15 or not 0 <= override.gsi <= 0xFFFFFFFF:
                raise AcpiError(f"MADT: bad interrupt source override {override}")
            if override.flags & ~0xF or override.flags & 0b11 == 0b10 or override.flags & 0b1100 == 0b1000:
                raise AcpiError(f"MADT: reserved MPS INTI flags in {override}")


def build_madt(config: MadtConfig) -> bytes:
    """The complete MADT (checksummed)."""
    body = bytearray(struct.pack("<II", config.lapic_address, PCAT_COMPAT if config.pcat_compat else 0))
    for uid, apic_id in enumerate(config.apic_ids):
        body += struct.pack("<BBBBI", ENTRY_LOCAL_APIC, 8, uid, apic_id, LAPIC_ENABLED)
    body += struct.pack(
        "<BBBBII", ENTRY_IO_APIC, 12, config.ioapic_id, 0, config.ioapic_address, config.ioapic_gsi_base
    )
    for override in config.overrides:
        body += struct.pack(
            "<BBBBIH", ENTRY_INTERRUPT_OVERRIDE, 10, 0, override.source, override.gsi, override.flags
        )
    if config.lint1_nmi:
        body += struct.pack("<BBBHB", ENTRY_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, INTI_CONFORMS, 1)
    return sdt("APIC", MADT_REVISION, bytes(body))
