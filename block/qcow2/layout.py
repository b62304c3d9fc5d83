"""qcow2's on-disk constants and the encoding of table entries (L1, L2, extended L2, compressed descriptors).

Kept apart from the code that walks tables so the bit layout is written down once, checked once, and the
check/repair code, the I/O path and the snapshot code all decode entries the same way. Facts from the qcow2
specification (QEMU's docs/interop/qcow2.txt).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # without the optional compression-type byte and its padding (112 with them)
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_FILE_NAME = 1023
MAX_L1_BYTES = 32 << 20  # QEMU refuses larger L1 tables; so do we (bounds memory for hostile images)
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_VIRTUAL_SIZE = 1 << 61  # 2 EiB, comfortably below every 64-bit overflow in offset arithmetic
SUBCLUSTERS = 32  # per cluster with extended L2 entries

# Offsets that sit in bits 9..55 of L1/L2 entries.
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
L1_RESERVED = 0x7F00_0000_0000_01FF
L2_RESERVED = 0x3F00_0000_0000_01FE
FLAG_COPIED = 1 << 63
FLAG_COMPRESSED = 1 << 62
FLAG_ZERO = 1  # standard L2 entries of v3 images; reserved with extended L2
REFTABLE_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
ALL_ALLOC = 0xFFFF_FFFF
ALL_ZERO = 0xFFFF_FFFF_0000_0000


# Feature bits are plain ints on purpose: ``~`` on an IntFlag keeps only the defined bits, which would
# silently drop the unknown bits an image may carry.
class Incompatible:
    DIRTY = 1 << 0
    CORRUPT = 1 << 1
    DATA_FILE = 1 << 2
    COMPRESSION = 1 << 3
    EXTENDED_L2 = 1 << 4


class Compatible:
    LAZY_REFCOUNTS = 1 << 0


class Autoclear:
    BITMAPS = 1 << 0
    DATA_FILE_RAW = 1 << 1


KNOWN_INCOMPATIBLE = 0x1F

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# What pyemu writes into the feature name table (type, bit, name), as every qcow2 writer does, so that a tool
# meeting an unknown bit can name it.
FEATURE_NAMES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)


class ClusterKind(enum.Enum):
    """What one L2 entry (or one subcluster of it) says about the guest data."""

    UNALLOCATED = "unallocated"  # read from the backing file (zeros without one)
    ZERO = "zero"                # reads as zeros; may still own a preallocated host cluster
    NORMAL = "normal"            # data at host_offset
    COMPRESSED = "compressed"    # deflate stream at host_offset, host_length bytes


@dataclass(frozen=True)
class Geometry:
    """Sizes derived from cluster_bits and the L2 entry width; shared by every table walker."""

    cluster_bits: int
    extended_l2: bool

    @cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @cached_property
    def l2_entry_bytes(self) -> int:
        return 16 if self.extended_l2 else 8

    @cached_property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_bytes

    @cached_property
    def l2_bits(self) -> int:
        return self.l2_entries.bit_length() - 1

    @cached_property
    def subclusters(self) -> int:
        return SUBCLUSTERS if self.extended_l2 else 1

    @cached_property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters

    @cached_property
    def compressed_offset_bits(self) -> int:
        """Bits of a compressed descriptor that hold the host byte offset (the rest count 512-byte sectors)."""
        return 62 - (self.cluster_bits - 8)

    def l1_entries_for(self, size: int) -> int:
        """L1 entries needed to map ``size`` bytes."""
        per_l2 = self.l2_entries << self.cluster_bits
        return -(-size // per_l2)

    def compressed_range(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes to read) of a compressed L2 entry. The stored count covers whole 512-byte
        sectors from the sector holding the first byte, so the stream may be shorter than what is read."""
        bits = self.compressed_offset_bits
        offset = entry & ((1 << bits) - 1)
        sectors = ((entry & ~FLAG_COPIED & ~FLAG_COMPRESSED) >> bits) + 1
        length = sectors * 512 - (offset & 511)
        return offset, length

    def compressed_entry(self, host_offset: int, length: int) -> int:
        """The L2 entry for a compressed stream of ``length`` bytes at ``host_offset``."""
        end_sector = (host_offset + length - 1) >> 9
        extra = end_sector - (host_offset >> 9)
        return FLAG_COMPRESSED | (extra << self.compressed_offset_bits) | host_offset


def refcount_max(refcount_order: int) -> int:
    return (1 << (1 << refcount_order)) - 1
