"""The qcow2 header and its extensions: parsing with every sanity check, and writing it back.

Everything the rest of the driver trusts about an image's layout comes through :func:`parse_header`, so this
is where a hostile or damaged image is stopped: offsets must be cluster aligned and below the largest file,
sizes bounded (L1 and refcount tables, snapshot counts), unknown incompatible features refused by name
(the feature-name table supplies names). Errors are :class:`Qcow2FormatError` naming the image, the messages
QEMU users know ("Unsupported qcow2 feature(s): ...", "Image is corrupt; cannot be opened read/write").

The header is data (a frozen dataclass); the driver replaces it with ``dataclasses.replace`` and writes the
affected fields. Unknown header extensions are kept byte for byte and written back, as the specification asks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from pyemu.block.errors import BlockConfigError
from pyemu.block.qcow2.layout import (EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_END,
                                      EXT_FEATURE_TABLE, FEATURE_NAMES, KNOWN_INCOMPATIBLE, MAGIC,
                                      MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
                                      MAX_SNAPSHOTS, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS, V2_HEADER_LENGTH,
                                      V3_HEADER_LENGTH, Autoclear, Compatible, Geometry, Incompatible)

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_V3_EXTRA = struct.Struct(">QQQII")
_EXT = struct.Struct(">II")
assert _V2.size == V2_HEADER_LENGTH and _V2.size + _V3_EXTRA.size == V3_HEADER_LENGTH

# Byte offsets of fields the driver rewrites in place (each group lies in one sector, so one write is atomic).
OFF_L1 = 36             # l1_size (4) + l1_table_offset (8)
OFF_REFTABLE = 48       # refcount_table_offset (8) + refcount_table_clusters (4)
OFF_SNAPSHOTS = 60      # nb_snapshots (4) + snapshots_offset (8)
OFF_INCOMPATIBLE = 72   # incompatible_features (8)
OFF_SIZE = 24           # size (8)


class Qcow2FormatError(BlockConfigError):
    """The image is not a qcow2 image pyemu can open (bad or hostile header, unsupported feature)."""

    def __init__(self, filename: str, problem: str) -> None:
        super().__init__(f"Could not open '{filename}': {problem}", option=None)
        self.filename = filename
        self.problem = problem


@dataclass(frozen=True)
class Qcow2Header:
    """Every header field (v2 fields, the v3 additions, and what the extensions say)."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: tuple[tuple[int, int, str], ...] = ()
    unknown_extensions: tuple[tuple[int, bytes], ...] = field(default=(), repr=False)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & Incompatible.EXTENDED_L2)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & Incompatible.DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & Incompatible.CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & Compatible.LAZY_REFCOUNTS)

    @property
    def compat(self) -> str:
        return "0.10" if self.version == 2 else "1.1"

    @property
    def compression_type_name(self) -> str:
        return {0: "zlib", 1: "zstd"}.get(self.compression_type, f"unknown({self.compression_type})")

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cluster_bits, self.extended_l2)

    def with_incompatible(self, flag: int, on: bool) -> "Qcow2Header":
        bits = self.incompatible_features | flag if on else self.incompatible_features & ~flag
        return replace(self, incompatible_features=int(bits))


def _aligned(offset: int, cluster_size: int) -> bool:
    return offset % cluster_size == 0


def parse_header(buf: bytes, filename: str, *, file_size: int) -> Qcow2Header:
    """Parse and validate the header cluster ``buf`` (at least the first cluster, or the whole file if
    shorter). Raises Qcow2FormatError naming the problem."""

    def bad(problem: str) -> Qcow2FormatError:
        return Qcow2FormatError(filename, problem)

    if len(buf) < V2_HEADER_LENGTH:
        raise bad("Image is not in qcow2 format (file too short)")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size, l1_offset,
     reftable_offset, reftable_clusters, nb_snapshots, snapshots_offset) = _V2.unpack_from(buf)
    if magic != MAGIC:
        raise bad("Image is not in qcow2 format")
    if version not in (2, 3):
        raise bad(f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise bad(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    incompatible = compatible = autoclear = 0
    refcount_order = 4
    header_length = V2_HEADER_LENGTH
    compression_type = 0
    if version == 3:
        if len(buf) < V3_HEADER_LENGTH:
            raise bad("qcow2 header too short")
        incompatible, compatible, autoclear, refcount_order, header_length = _V3_EXTRA.unpack_from(buf, _V2.size)
        if header_length < V3_HEADER_LENGTH:
            raise bad("qcow2 header too short")
        if header_length > cluster_size:
            raise bad("qcow2 header exceeds cluster size")
        if header_length > len(buf):
            raise bad("qcow2 header is truncated")
        if incompatible & Incompatible.COMPRESSION:
            if header_length < V3_HEADER_LENGTH + 1:
                raise bad("qcow2 header is too short for the compression type")
            compression_type = buf[V3_HEADER_LENGTH]
        if refcount_order > 6:
            raise bad("Reference count entry width too large; may not exceed 64 bits")
    ext_start = header_length
    extensions = _parse_extensions(buf, ext_start, min(len(buf), cluster_size), filename,
                                   backing_offset=backing_offset)
    names = extensions.feature_names
    unknown = incompatible & ~KNOWN_INCOMPATIBLE
    if unknown:
        labels = [next((n for t, b, n in names if t == 0 and 1 << b == bit), f"Unknown incompatible feature: "
                       f"{bit:x}") for bit in (1 << i for i in range(64)) if unknown & bit]
        raise bad("Unsupported qcow2 feature(s): " + ", ".join(labels))
    if incompatible & Incompatible.COMPRESSION and compression_type != 0:
        raise bad(f"compression type {compression_type} (zstd) is not supported by pyemu")
    if not incompatible & Incompatible.COMPRESSION and compression_type:
        raise bad("Invalid compression type: the compression-type feature bit is not set")
    if incompatible & Incompatible.DATA_FILE:
        raise bad("external data files are not supported by pyemu")
    if crypt:
        raise bad("encrypted qcow2 images are not supported by pyemu")
    if size > MAX_VIRTUAL_SIZE:
        raise bad(f"Image is too big (virtual size {size})")
    geometry = Geometry(cluster_bits, bool(incompatible & Incompatible.EXTENDED_L2))
    if geometry.extended_l2 and cluster_bits < 14:
        raise bad("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if l1_size * 8 > MAX_L1_BYTES:
        raise bad("Active L1 table too large")
    if l1_size < geometry.l1_entries_for(size):
        raise bad("L1 table is too small")
    if l1_size and (not _aligned(l1_offset, cluster_size) or l1_offset == 0):
        raise bad("Invalid L1 table offset")
    if reftable_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise bad("Reference count table too large")
    if reftable_clusters == 0 or not _aligned(reftable_offset, cluster_size) or reftable_offset == 0:
        raise bad("Invalid reference count table offset")
    if nb_snapshots > MAX_SNAPSHOTS:
        raise bad("Too many snapshots")
    if nb_snapshots and (not _aligned(snapshots_offset, cluster_size) or snapshots_offset == 0):
        raise bad("Invalid snapshot table offset")
    for what, offset, length in (("L1 table", l1_offset, l1_size * 8),
                                 ("reference count table", reftable_offset, reftable_clusters * cluster_size)):
        if length and offset < cluster_size:
            raise bad(f"{what} overlaps the image header")
        if length and offset + length > file_size + cluster_size * 0:
            raise bad(f"{what} lies beyond the end of the image")
    backing_file: str | None = None
    if backing_offset:
        if backing_size > MAX_BACKING_FILE_NAME:
            raise bad("Backing file name too long")
        if backing_offset + backing_size > min(len(buf), cluster_size):
            raise bad("Invalid backing file offset")
        try:
            backing_file = bytes(buf[backing_offset:backing_offset + backing_size]).decode()
        except UnicodeDecodeError:
            raise bad("Backing file name is not valid UTF-8") from None
        if not backing_file:
            backing_file = None
    return Qcow2Header(
        version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=reftable_offset, refcount_table_clusters=reftable_clusters,
        nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset, incompatible_features=incompatible,
        compatible_features=compatible, autoclear_features=autoclear, refcount_order=refcount_order,
        header_length=header_length, compression_type=compression_type, backing_file=backing_file,
        backing_format=extensions.backing_format, data_file=extensions.data_file, feature_names=names,
        unknown_extensions=extensions.unknown)


@dataclass
class _Extensions:
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: tuple[tuple[int, int, str], ...] = ()
    unknown: tuple[tuple[int, bytes], ...] = ()


def _parse_extensions(buf: bytes, start: int, end: int, filename: str, *, backing_offset: int) -> _Extensions:
    ext = _Extensions()
    unknown: list[tuple[int, bytes]] = []
    # Extensions end at the end marker, the backing file name, or the end of the first cluster.
    limit = min(end, backing_offset) if backing_offset > start else end
    pos = start
    while pos + _EXT.size <= limit:
        kind, length = _EXT.unpack_from(buf, pos)
        pos += _EXT.size
        if kind == EXT_END:
            break
        if pos + length > limit:
            raise Qcow2FormatError(filename, "Invalid header extension (it runs past the header cluster)")
        data = bytes(buf[pos:pos + length])
        pos += (length + 7) & ~7
        if kind == EXT_BACKING_FORMAT:
            ext.backing_format = data.decode(errors="replace") or None
        elif kind == EXT_FEATURE_TABLE:
            names = []
            for i in range(0, length - length % 48, 48):
                ftype, bit = data[i], data[i + 1]
                names.append((ftype, bit, data[i + 2:i + 48].split(b"\0", 1)[0].decode(errors="replace")))
            ext.feature_names = tuple(names)
        elif kind == EXT_DATA_FILE:
            ext.data_file = data.decode(errors="replace")
        elif kind == EXT_CRYPTO:
            raise Qcow2FormatError(filename, "encrypted qcow2 images are not supported by pyemu")
        else:
            unknown.append((kind, data))  # includes EXT_BITMAPS, which qcow2/bitmaps.py reads and rewrites
    ext.unknown = tuple(unknown)
    return ext


def serialize_header(header: Qcow2Header) -> bytes:
    """The header, its extensions and the backing file name, as they go at offset 0 (fits one cluster).
    The feature name table is only a help for other tools: when it does not fit (512-byte clusters with
    a bitmaps extension or a backing file), it is left out, as QEMU does."""
    try:
        return _serialize_header(header, feature_table=True)
    except BlockConfigError:
        if header.version < 3:
            raise
        return _serialize_header(header, feature_table=False)


def _serialize_header(header: Qcow2Header, *, feature_table: bool) -> bytes:
    out = bytearray(_V2.pack(MAGIC, header.version, 0, 0, header.cluster_bits, header.size, 0, header.l1_size,
                             header.l1_table_offset, header.refcount_table_offset,
                             header.refcount_table_clusters, header.nb_snapshots, header.snapshots_offset))
    if header.version == 3:
        header_length = 112  # with the compression type byte, as current writers do
        out += _V3_EXTRA.pack(header.incompatible_features, header.compatible_features,
                              header.autoclear_features, header.refcount_order, header_length)
        out += bytes([header.compression_type]) + bytes(7)

    def extension(kind: int, data: bytes) -> None:
        out.extend(_EXT.pack(kind, len(data)))
        out.extend(data)
        out.extend(bytes(-len(data) % 8))

    if header.backing_file and header.backing_format:
        extension(EXT_BACKING_FORMAT, header.backing_format.encode())
    if header.version == 3 and feature_table:
        table = b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in FEATURE_NAMES)
        extension(EXT_FEATURE_TABLE, table)
    for kind, data in header.unknown_extensions:
        if kind == EXT_BITMAPS and not header.autoclear_features & Autoclear.BITMAPS:
            continue  # the autoclear bit was dropped: the bitmaps are no longer valid, so drop them too
        extension(kind, data)
    out.extend(_EXT.pack(EXT_END, 0))
    if header.backing_file:
        name = header.backing_file.encode()
        if len(name) > MAX_BACKING_FILE_NAME:
            raise BlockConfigError(f"Backing file name too long: '{header.backing_file}'", option=None)
        struct.pack_into(">QI", out, 8, len(out), len(name))
        out.extend(name)
    if len(out) > header.cluster_size:
        raise BlockConfigError("qcow2 header does not fit into the first cluster (backing file name too long?)",
                               option=None)
    return bytes(out)
