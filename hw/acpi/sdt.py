"""What every ACPI system description table shares: the 36-byte header, the checksum, the Generic Address
Structure, and pyemu's OEM identification.

ACPI 6.x, 5.2.6 "System Description Table Header": Signature(4) Length(4) Revision(1) Checksum(1)
OEMID(6) OEM Table ID(8) OEM Revision(4) Creator ID(4) Creator Revision(4). The checksum byte makes the
sum of all bytes of the table 0 modulo 256; the OS rejects (or warns about) a table whose sum is not 0.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pyemu.hw.acpi.errors import AcpiError

OEM_ID = b"PYEMU "
OEM_TABLE_ID = b"PYEMUVM "
OEM_REVISION = 1
CREATOR_ID = b"PYEM"
CREATOR_REVISION = 1

HEADER_SIZE = 36
CHECKSUM_OFFSET = 9


def checksum(data: bytes | bytearray) -> int:
    """The byte that, added to ``data``, makes the sum 0 modulo 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: str, revision: int, body: bytes) -> bytes:
    """A complete table: header for ``signature``/``revision`` in front of ``body``, checksum filled in."""
    sig = signature.encode("ascii")
    if len(sig) != 4:
        raise AcpiError(f"ACPI table signature {signature!r} is not 4 characters")
    length = HEADER_SIZE + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        sig,
        length,
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


class AddressSpace(enum.IntEnum):
    """Generic Address Structure address space IDs (the ones a virtual board uses)."""

    SYSTEM_MEMORY = 0
    SYSTEM_IO = 1


class AccessSize(enum.IntEnum):
    """GAS access size: how wide each access to the register must be."""

    UNDEFINED = 0
    BYTE = 1
    WORD = 2
    DWORD = 3
    QWORD = 4


@dataclass(frozen=True)
class Gas:
    """ACPI 6.x 5.2.3.2 Generic Address Structure (12 bytes): where a fixed register lives.

    An absent register is written as 12 zero bytes (:data:`GAS_NONE`).
    """

    space: AddressSpace
    bit_width: int
    address: int
    access_size: AccessSize = AccessSize.UNDEFINED
    bit_offset: int = 0

    def pack(self) -> bytes:
        return struct.pack(
            "<BBBBQ", int(self.space), self.bit_width, self.bit_offset, int(self.access_size), self.address
        )

    @staticmethod
    def byte_register(address: int) -> "Gas":
        """An 8-bit MMIO register accessed with byte accesses (the FADT's sleep and reset registers)."""
        return Gas(AddressSpace.SYSTEM_MEMORY, 8, address, AccessSize.BYTE)


GAS_NONE = bytes(12)
