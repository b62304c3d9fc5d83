"""FADT ("FACP"): the Fixed ACPI Description Table, revision 6, for a hardware-reduced platform.

ACPI 6.x, 5.2.9. With HW_REDUCED_ACPI set the OS ignores every legacy fixed-hardware block (PM1, PM2, PM
timer, GPE, SCI, SMI command), so those fields are 0. What remains meaningful:

* X_DSDT (and the 32-bit DSDT field, filled too when the DSDT is below 4 GiB, with the same value),
* SLEEP_CONTROL_REG / SLEEP_STATUS_REG: how the OS enters S5 (soft-off) on such a platform; Linux offers
  ACPI power-off only when both are present and the DSDT has an ``_S5`` object,
* RESET_REG / RESET_VALUE with the RESET_REG_SUP flag: how the OS reboots (Linux's default on x86),
* IAPC_BOOT_ARCH: which legacy PC devices exist (Linux skips the CMOS RTC, VGA probing, the i8042...),
* the Hypervisor Vendor Identity (added in FADT revision 6).

Revision 6 with minor version 3 is the ACPI 6.3 layout: 276 bytes.
"""

from __future__ import annotations

import struct

from pyemu.hw.acpi.errors import AcpiError
from pyemu.hw.acpi.sdt import GAS_NONE, Gas, sdt

FADT_REVISION = 6
FADT_MINOR_VERSION = 3
FADT_LENGTH = 276

# Flags (offset 112).
FLAG_WBINVD = 1 << 0
FLAG_PWR_BUTTON = 1 << 4
"""Set: the power button, if any, is a control-method device (our ``PNP0C0C``), not a fixed feature."""
FLAG_SLP_BUTTON = 1 << 5
"""Set: the sleep button, if any, is a control-method device (we have none)."""
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20

# IA-PC boot architecture flags (offset 109).
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

HYPERVISOR_VENDOR = b"PYEMU"
"""Hypervisor Vendor Identity: vendor-chosen, 8 bytes; pyemu's name, NUL padded."""


def build_fadt(
    *,
    dsdt_address: int,
    sleep_control: Gas,
    sleep_status: Gas,
    reset_register: Gas,
    reset_value: int,
    iapc_boot_arch: int,
    hypervisor_vendor: bytes = HYPERVISOR_VENDOR,
) -> bytes:
    """The complete FADT (checksummed) for a hardware-reduced platform."""
    if len(hypervisor_vendor) > 8:
        raise AcpiError(f"hypervisor vendor identity {hypervisor_vendor!r} is longer than 8 bytes")
    flags = FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON
    dsdt32 = dsdt_address if dsdt_address <= 0xFFFFFFFF else 0

    body = bytearray()
    # FIRMWARE_CTRL (no FACS on a hardware-reduced platform), DSDT.
    body += struct.pack("<II", 0, dsdt32)
    # Reserved, Preferred_PM_Profile (0 unspecified), SCI_INT, SMI_CMD, ACPI_ENABLE, ACPI_DISABLE,
    # S4BIOS_REQ, PSTATE_CNT.
    body += struct.pack("<BBHIBBBB", 0, 0, 0, 0, 0, 0, 0, 0)
    # PM1a/b_EVT_BLK, PM1a/b_CNT_BLK, PM2_CNT_BLK, PM_TMR_BLK, GPE0_BLK, GPE1_BLK.
    body += bytes(8 * 4)
    # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN, GPE0_BLK_LEN, GPE1_BLK_LEN, GPE1_BASE, CST_CNT.
    body += bytes(8)
    # P_LVL2_LAT, P_LVL3_LAT, FLUSH_SIZE, FLUSH_STRIDE, DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY.
    body += struct.pack("<HHHHBBBBB", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    # IAPC_BOOT_ARCH, Reserved, Flags.
    body += struct.pack("<HBI", iapc_boot_arch, 0, flags)
    # RESET_REG, RESET_VALUE, ARM_BOOT_ARCH, FADT Minor Version.
    body += reset_register.pack() + struct.pack("<BHB", reset_value, 0, FADT_MINOR_VERSION)
    # X_FIRMWARE_CTRL, X_DSDT.
    body += struct.pack("<QQ", 0, dsdt_address)
    # X_PM1a_EVT_BLK, X_PM1b_EVT_BLK, X_PM1a_CNT_BLK, X_PM1b_CNT_BLK, X_PM2_CNT_BLK, X_PM_TMR_BLK,
    # X_GPE0_BLK, X_GPE1_BLK.
    body += GAS_NONE * 8
    body += sleep_control.pack() + sleep_status.pack()
    body += hypervisor_vendor.ljust(8, b"\x00")

    table = sdt("FACP", FADT_REVISION, bytes(body))
    assert len(table) == FADT_LENGTH, len(table)
    return table
