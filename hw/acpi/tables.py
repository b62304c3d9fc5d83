"""The root tables (RSDP, XSDT) and the DSDT wrapper.

* RSDP (ACPI 6.x, 5.2.5): not an SDT. 36 bytes for revision 2+: "RSD PTR " signature, checksum over the
  first 20 bytes (the ACPI 1.0 part), OEMID, revision 2, RsdtAddress, length 36, XsdtAddress, extended
  checksum over all 36 bytes, 3 reserved bytes. It must sit on a 16-byte boundary; an OS without a boot
  loader hint finds it by scanning 0xE0000-0xFFFFF for the signature.
* XSDT (5.2.8): an SDT whose body is 64-bit addresses of the other tables (not the DSDT: the FADT points
  to it). No RSDT is produced: an ACPI 2.0+ OS uses the XSDT whenever the RSDP has one.
* DSDT (5.2.11.1): an SDT whose body is AML. Revision 2 makes AML integers 64-bit.
"""

from __future__ import annotations

import struct

from pyemu.hw.acpi.sdt import OEM_ID, checksum, sdt

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2
RSDP_LENGTH = 36
RSDP_V1_LENGTH = 20
RSDP_ALIGNMENT = 16
XSDT_REVISION = 1
DSDT_REVISION = 2


def build_rsdp(xsdt_address: int) -> bytes:
    """The ACPI 2.0+ RSDP pointing at the XSDT, both checksums filled in."""
    rsdp = bytearray(
        struct.pack("<8sB6sBIIQB3s", RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP_LENGTH, xsdt_address, 0, b"")
    )
    rsdp[8] = checksum(rsdp[:RSDP_V1_LENGTH])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_xsdt(table_addresses: list[int]) -> bytes:
    """The XSDT listing ``table_addresses`` (FADT first, by convention)."""
    return sdt("XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in table_addresses))


def build_dsdt(aml: bytes) -> bytes:
    """The DSDT wrapping a definition block's AML term list."""
    return sdt("DSDT", DSDT_REVISION, aml)
