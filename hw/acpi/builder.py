"""Lay out a board's ACPI tables at a guest-physical address: one blob to copy into guest RAM.

Why one contiguous blob: the tables point at each other by guest-physical address, so their places must be
decided before the pointer tables (RSDP, XSDT, FADT) are built; keeping them together makes that a simple
running offset, and the board copies one byte string. The default window, 0xE0000-0xFFFFF, is where an OS
scans for the RSDP when no boot loader hands it over (Linux: ``boot_params.acpi_rsdp_addr`` or PVH
``rsdp_paddr`` take precedence; :attr:`AcpiBlob.rsdp_address` is the value to pass). The window must be
RAM that the e820 map reports as reserved (or ACPI) so the guest does not reuse it.

Order in the blob: RSDP, XSDT, FADT, MADT, DSDT, each starting on a 16-byte boundary (the RSDP must; the
others get the same alignment so every 64-bit field is naturally aligned).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass

from pyemu.hw.acpi.dsdt import SerialPortInfo, VirtioMmioSlot, build_dsdt_aml
from pyemu.hw.acpi.errors import AcpiLayoutError
from pyemu.hw.acpi.ged import RESET_VALUE, GedLayout
from pyemu.hw.acpi.fadt import FADT_LENGTH, IAPC_8042, IAPC_CMOS_RTC_NOT_PRESENT, IAPC_VGA_NOT_PRESENT, build_fadt
from pyemu.hw.acpi.madt import (
    DEFAULT_IOAPIC_ADDRESS,
    DEFAULT_LAPIC_ADDRESS,
    IRQ0_TO_GSI2,
    MadtConfig,
    build_madt,
)
from pyemu.hw.acpi.sdt import HEADER_SIZE, Gas
from pyemu.hw.acpi.tables import RSDP_ALIGNMENT, RSDP_LENGTH, build_dsdt, build_rsdp, build_xsdt

TABLE_ALIGNMENT = 16
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000


@dataclass(frozen=True)
class AcpiConfig:
    """What the tables describe. Defaults: one vCPU, COM1, no virtio, no legacy PC devices."""

    cpus: int = 1
    """vCPUs, with APIC IDs 0..cpus-1 and ACPI processor UIDs equal to them."""
    ged: GedLayout = GedLayout()
    serial_ports: tuple[SerialPortInfo, ...] = (SerialPortInfo(),)
    virtio_slots: tuple[VirtioMmioSlot, ...] = ()
    device_aml: tuple[bytes, ...] = ()
    """DSDT terms that devices supply themselves (a board's device manager), placed under ``\\_SB``."""
    pic: bool = False
    """An 8259 pair exists: MADT PCAT_COMPAT, ISA-style IRQNoFlags for the serial ports."""
    pit: bool = False
    """An 8254 PIT exists. With a PIT or a PIC the MADT gets the PC's IRQ0 -> GSI 2 source override."""
    rtc: bool = False
    """A CMOS RTC exists at ports 0x70/0x71 (otherwise the FADT says "CMOS RTC not present")."""
    i8042: bool = False
    """An i8042 keyboard controller exists at ports 0x60/0x64."""
    ioapic_id: int = 0
    ioapic_address: int = DEFAULT_IOAPIC_ADDRESS
    lapic_address: int = DEFAULT_LAPIC_ADDRESS
    address: int = BIOS_AREA_START
    """Guest-physical address of the blob (the RSDP is its first byte); 16-byte aligned."""
    limit: int = BIOS_AREA_END
    """The blob must end at or before this address."""

    def __post_init__(self) -> None:
        if self.address % RSDP_ALIGNMENT or self.address < 0:
            raise AcpiLayoutError(
                f"ACPI tables at {self.address:#x}: the RSDP needs a 16-byte aligned address",
                address=self.address,
                size=0,
            )

    def madt_config(self) -> MadtConfig:
        return MadtConfig(
            apic_ids=tuple(range(self.cpus)),
            ioapic_id=self.ioapic_id,
            ioapic_address=self.ioapic_address,
            lapic_address=self.lapic_address,
            pcat_compat=self.pic,
            overrides=(IRQ0_TO_GSI2,) if (self.pit or self.pic) else (),
        )

    def iapc_boot_arch(self) -> int:
        flags = IAPC_VGA_NOT_PRESENT
        if not self.rtc:
            flags |= IAPC_CMOS_RTC_NOT_PRESENT
        if self.i8042:
            flags |= IAPC_8042
        return flags


@dataclass(frozen=True)
class AcpiBlob:
    """The tables as placed: copy ``data`` to guest-physical ``address``; the OS starts at ``rsdp_address``."""

    address: int
    data: bytes
    rsdp_address: int
    tables: Mapping[str, int]
    """Guest-physical address of each table by signature ("RSDP", "XSDT", "FACP", "APIC", "DSDT")."""

    @property
    def end(self) -> int:
        return self.address + len(self.data)

    def table(self, signature: str) -> bytes:
        """The bytes of one table (for tests and dumps)."""
        start = self.tables[signature] - self.address
        if signature == "RSDP":
            return self.data[start : start + RSDP_LENGTH]
        length = int.from_bytes(self.data[start + 4 : start + 8], "little")
        return self.data[start : start + length]


def _align(value: int) -> int:
    return (value + TABLE_ALIGNMENT - 1) // TABLE_ALIGNMENT * TABLE_ALIGNMENT


def build_acpi(config: AcpiConfig) -> AcpiBlob:
    """Build and place every table for ``config``."""
    dsdt = build_dsdt(
        build_dsdt_aml(
            ged_layout=config.ged,
            serial_ports=config.serial_ports,
            virtio_slots=config.virtio_slots,
            device_aml=config.device_aml,
            legacy_pic=config.pic,
            rtc=config.rtc,
        )
    )
    madt = build_madt(config.madt_config())
    xsdt_length = HEADER_SIZE + 8 * 2  # FADT, MADT

    # Sizes do not depend on addresses, so place first, then build the tables that hold pointers.
    offsets: dict[str, int] = {}
    cursor = 0
    for signature, length in (
        ("RSDP", RSDP_LENGTH),
        ("XSDT", xsdt_length),
        ("FACP", FADT_LENGTH),
        ("APIC", len(madt)),
        ("DSDT", len(dsdt)),
    ):
        cursor = _align(cursor)
        offsets[signature] = cursor
        cursor += length
    size = cursor
    if config.address + size > config.limit:
        raise AcpiLayoutError(
            f"ACPI tables ({size} bytes at {config.address:#x}) do not fit below {config.limit:#x}",
            address=config.address,
            size=size,
        )
    addresses = {sig: config.address + off for sig, off in offsets.items()}

    layout = config.ged
    fadt = build_fadt(
        dsdt_address=addresses["DSDT"],
        sleep_control=Gas.byte_register(layout.sleep_control_address),
        sleep_status=Gas.byte_register(layout.sleep_status_address),
        reset_register=Gas.byte_register(layout.reset_address),
        reset_value=RESET_VALUE,
        iapc_boot_arch=config.iapc_boot_arch(),
    )
    xsdt = build_xsdt([addresses["FACP"], addresses["APIC"]])
    rsdp = build_rsdp(addresses["XSDT"])

    data = bytearray(size)
    for signature, table in (("RSDP", rsdp), ("XSDT", xsdt), ("FACP", fadt), ("APIC", madt), ("DSDT", dsdt)):
        start = offsets[signature]
        data[start : start + len(table)] = table
    return AcpiBlob(
        address=config.address,
        data=bytes(data),
        rsdp_address=addresses["RSDP"],
        tables=types.MappingProxyType(addresses),
    )
