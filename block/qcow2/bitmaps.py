"""qcow2's bitmaps extension: persistent dirty bitmaps stored the way QEMU stores them.

Layout (QEMU's docs/interop/qcow2.txt, "Bitmaps extension"): header extension 0x23852875 holds the number of
bitmaps and the offset and size of the *bitmap directory*; each directory entry names one bitmap (table
offset and size, flags IN_USE/AUTO, type 1, granularity bits, name) and its *bitmap table* lists one entry
per cluster of bitmap data (0: all zeros, 1: all ones, else the cluster's offset). Autoclear bit 0 says the
extension is valid: a writer that does not know bitmaps clears it, and then nobody may trust them.

The life cycle follows QEMU, so a crash is detectable:

* open read-write: load every bitmap, then rewrite the directory with IN_USE set on those loaded, before any
  guest write. A bitmap already IN_USE at open was in use by a writer that did not close it: it is loaded
  *inconsistent* (listed, refused for use, only removable) and its clusters are kept untouched;
* close: write each consistent bitmap's data to new clusters, a new table and directory with IN_USE clear,
  switch the header to them, then free the old clusters (the frees are queued behind the header sync, so a
  crash leaks clusters but never leaves the header pointing at freed ones);
* removal of a persistent bitmap rewrites the directory at once, as QEMU does.

Everything read from the image is validated before use (directory inside the file and bounded, entry
fields, names, table sizes against the image size, table entries aligned and inside the file), and
failures are :class:`~pyemu.block.qcow2.header.Qcow2FormatError` naming the problem.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

from pyemu.block.dirty_bitmap import BitmapError, DirtyBitmap, bitmaps_of, check_modifiable
from pyemu.block.qcow2.layout import EXT_BITMAPS, Autoclear
from pyemu.block.qcow2.refcount import array_from_be64, be64_bytes

if TYPE_CHECKING:
    from pyemu.block.qcow2.driver import Qcow2Format

_EXT = struct.Struct(">IIQQ")            # nb_bitmaps, reserved, directory size, directory offset
_ENTRY = struct.Struct(">QIIBBHI")       # table offset, table size, flags, type, granularity bits, name size,
                                         # extra data size
FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE
TYPE_DIRTY_TRACKING = 1
MAX_BITMAPS = 65535
MAX_DIRECTORY_BYTES = 64 << 20
MAX_NAME_BYTES = 1023
MAX_EXTRA_DATA = 16
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_TABLE_ENTRIES = 0x8000000    # QEMU's BME_MAX_TABLE_SIZE
MAX_BITMAP_BYTES = 0x20000000    # QEMU's BME_MAX_PHYS_SIZE: bounds the memory one bitmap may take
MAX_LOADED_BYTES = 1 << 30       # and all bitmaps of one image together (a hostile directory may list 65535)
TABLE_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
TABLE_RESERVED = 0xFF00_0000_0000_01FE
TABLE_ALL_ONES = 1


class BitmapFormatError(BitmapError):
    """The bitmaps extension or a bitmap in it is damaged (raised while loading; the open fails)."""


@dataclass
class BitmapEntry:
    """One directory entry as stored, plus its table (kept for refcount checks and frees)."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    extra_data: bytes = b""
    table: list[int] = field(default_factory=list, repr=False)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    def flag_names(self) -> list[str]:
        """qemu-img info's spelling of the flags."""
        return [n for f, n in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")) if self.flags & f]

    def serialize(self) -> bytes:
        name = self.name.encode()
        out = _ENTRY.pack(self.table_offset, self.table_size, self.flags, TYPE_DIRTY_TRACKING,
                          self.granularity_bits, len(name), len(self.extra_data)) + self.extra_data + name
        return out + bytes(-len(out) % 8)


def bitmap_bytes(size: int, granularity: int) -> int:
    """Bytes of bitmap data for a ``size``-byte image."""
    return -(-(-(-size // granularity)) // 8)


def table_entries(size: int, granularity: int, cluster_size: int) -> int:
    return -(-bitmap_bytes(size, granularity) // cluster_size)


def find_extension(image: "Qcow2Format") -> bytes | None:
    for kind, data in image.header.unknown_extensions:
        if kind == EXT_BITMAPS:
            return data
    return None


def _in_file(image: "Qcow2Format", offset: int, length: int) -> bool:
    cs = image.cluster_size
    return offset >= cs and offset % cs == 0 and offset + length <= image.file.size()


def parse_directory(image: "Qcow2Format", data: bytes) -> tuple[int, int, list[BitmapEntry]]:
    """Validate the extension ``data`` and read the directory: (offset, size, entries)."""
    def bad(problem: str) -> BitmapFormatError:
        return BitmapFormatError(f"bitmaps_ext: {problem}")

    if len(data) != _EXT.size:
        raise bad("Invalid extension length")
    count, reserved, dir_size, dir_offset = _EXT.unpack(data)
    if reserved:
        raise bad("Reserved field is not zero")
    if count == 0:
        raise bad("found bitmaps extension with zero bitmaps")
    if count > MAX_BITMAPS:
        raise bad("File has too many bitmaps")
    if dir_size > MAX_DIRECTORY_BYTES:
        raise bad("Bitmap directory is too large")
    if dir_size < count * _ENTRY.size:
        raise bad("Bitmap directory is too small for its bitmaps")
    if not _in_file(image, dir_offset, dir_size):
        raise bad("Invalid bitmap directory offset")
    raw = image.read_meta(dir_offset, dir_size)
    entries: list[BitmapEntry] = []
    names: set[str] = set()
    loaded = 0
    pos = 0
    for index in range(count):
        if pos + _ENTRY.size > dir_size:
            raise BitmapFormatError("Bitmap directory is corrupted (entries run past its end)")
        table_offset, table_size, flags, kind, gbits, name_size, extra_size = _ENTRY.unpack_from(raw, pos)
        end = pos + _ENTRY.size + extra_size + name_size
        if extra_size > MAX_EXTRA_DATA or end > dir_size:
            raise BitmapFormatError(f"Bitmap directory entry {index} is corrupted (sizes)")
        extra = raw[pos + _ENTRY.size:pos + _ENTRY.size + extra_size]
        try:
            name = raw[pos + _ENTRY.size + extra_size:end].decode()
        except UnicodeDecodeError:
            raise BitmapFormatError(f"Bitmap directory entry {index}: the name is not valid UTF-8") from None
        label = f"Bitmap '{name}'"
        if not name_size or name_size > MAX_NAME_BYTES:
            raise BitmapFormatError(f"Bitmap directory entry {index}: invalid name length {name_size}")
        if name in names:
            raise BitmapFormatError(f"{label} is stored twice in the bitmap directory")
        if kind != TYPE_DIRTY_TRACKING:
            raise BitmapFormatError(f"{label} has unknown type {kind}")
        if flags & ~KNOWN_FLAGS:
            raise BitmapFormatError(f"{label} has reserved flags set ({flags:#x})")
        if extra_size and not flags & FLAG_EXTRA_DATA_COMPATIBLE:
            raise BitmapFormatError(f"{label} has extra data pyemu does not understand")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise BitmapFormatError(f"{label} has invalid granularity 2^{gbits}")
        if bitmap_bytes(image.header.size, 1 << gbits) > MAX_BITMAP_BYTES or table_size > MAX_TABLE_ENTRIES:
            raise BitmapFormatError(f"{label} is too large")
        loaded += bitmap_bytes(image.header.size, 1 << gbits)
        if loaded > MAX_LOADED_BYTES:
            raise BitmapFormatError(f"The bitmaps of this image would need more than {MAX_LOADED_BYTES} bytes "
                                    "of memory")
        expected = table_entries(image.header.size, 1 << gbits, image.cluster_size)
        if table_size != expected:
            raise BitmapFormatError(f"{label}: bitmap table size {table_size} does not match the image "
                                    f"(expected {expected})")
        entry = BitmapEntry(name, table_offset, table_size, flags, gbits, bytes(extra))
        if table_size:
            if not _in_file(image, table_offset, table_size * 8):
                raise BitmapFormatError(f"{label}: invalid bitmap table offset {table_offset:#x}")
            entry.table = list(array_from_be64(image.read_meta(table_offset, table_size * 8)))
            for i, word in enumerate(entry.table):
                offset = word & TABLE_OFFSET_MASK
                if word & TABLE_RESERVED or (offset and word & TABLE_ALL_ONES):
                    raise BitmapFormatError(f"{label}: bitmap table entry {i} is corrupted ({word:#x})")
                if offset and not _in_file(image, offset, image.cluster_size):
                    raise BitmapFormatError(f"{label}: bitmap data cluster {offset:#x} lies outside the image")
        names.add(name)
        entries.append(entry)
        pos = end + (-end % 8)
    _check_ownership(image, dir_offset, dir_size, entries)
    return dir_offset, dir_size, entries


def _check_ownership(image: "Qcow2Format", dir_offset: int, dir_size: int, entries: list[BitmapEntry]) -> None:
    """Every cluster the bitmaps use must be theirs alone: counted exactly once by the refcounts, used once,
    and not one of the image's tables. Otherwise storing them later (which frees the old clusters) would
    free clusters something else still uses -- a hostile image could make pyemu reuse guest data."""
    cs = image.cluster_size
    h = image.header
    tables = [(h.l1_table_offset, h.l1_size * 8), (h.refcount_table_offset, h.refcount_table_clusters * cs)]
    if h.nb_snapshots:
        tables.append((h.snapshots_offset, max(image.snapshot_table_bytes, 1)))
    seen: set[int] = set()
    ranges = [("bitmap directory", dir_offset, dir_size)]
    for entry in entries:
        if entry.table_size:
            ranges.append((f"bitmap '{entry.name}' table", entry.table_offset, entry.table_size * 8))
        ranges.extend((f"bitmap '{entry.name}' data", word & TABLE_OFFSET_MASK, cs) for word in entry.table
                      if word & TABLE_OFFSET_MASK)
    for what, offset, length in ranges:
        for table_offset, table_length in tables:
            if table_length and offset < table_offset + table_length and table_offset < offset + length:
                raise BitmapFormatError(f"The {what} at {offset:#x} overlaps qcow2 metadata")
        for cluster in range(offset // cs, -(-(offset + length) // cs)):
            if cluster in seen:
                raise BitmapFormatError(f"The {what} at {offset:#x} shares a cluster with other bitmap data")
            seen.add(cluster)
            refcount = image.refcounts.get(cluster)
            if refcount != 1:
                raise BitmapFormatError(f"The {what} at {offset:#x} has refcount {refcount} (expected 1)")


class Qcow2BitmapStore:
    """The persistent bitmaps of one open qcow2 image: what is on disk, and the set they are loaded into."""

    def __init__(self, image: "Qcow2Format") -> None:
        self.image = image
        self.entries: dict[str, BitmapEntry] = {}
        self.dir_offset = 0
        self.dir_size = 0
        self.ignored = False
        """True when the extension exists but the autoclear bit says it is stale (nothing is loaded)."""

    # -- opening -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the directory and every bitmap into the image's :class:`BitmapSet` (a writable image then
        calls :meth:`mark_in_use`)."""
        image = self.image
        bitmaps_of(image).store = self
        data = find_extension(image)
        if data is None:
            return
        if not image.header.autoclear_features & Autoclear.BITMAPS:
            # A program without bitmap support wrote the image: every bitmap is stale (QEMU ignores them).
            self.ignored = True
            return
        self.dir_offset, self.dir_size, entries = parse_directory(image, data)
        self.entries = {e.name: e for e in entries}
        target = bitmaps_of(image)
        for entry in entries:
            bitmap = DirtyBitmap(entry.name, image.header.size, entry.granularity, enabled=entry.auto,
                                 persistent=True, inconsistent=entry.in_use, readonly=image.read_only)
            if not entry.in_use:
                self._read_data(entry, bitmap)
            target.add(bitmap, check_store=False)

    def mark_in_use(self) -> None:
        """Flag every loaded bitmap IN_USE on disk (read-write open, before the first guest write), so a
        crash leaves them recognisably untrustworthy."""
        if self.entries and not all(e.in_use for e in self.entries.values()):
            self._commit([replace(e, flags=e.flags | FLAG_IN_USE) for e in self.entries.values()], frees=[])

    def _read_data(self, entry: BitmapEntry, bitmap: DirtyBitmap) -> None:
        cs = self.image.cluster_size
        for i, word in enumerate(entry.table):
            offset = word & TABLE_OFFSET_MASK
            if offset:
                bitmap.deserialize(i * cs, self.image.read_meta(offset, cs))
            elif word & TABLE_ALL_ONES:
                bitmap.deserialize(i * cs, b"\xff" * cs)

    # -- the BitmapStore protocol --------------------------------------------------------------------------

    def check_new_persistent(self, name: str, granularity: int) -> None:
        image = self.image
        if image.header.version < 3:
            raise BitmapError("Cannot store dirty bitmaps in qcow2 v2 files")
        if image.read_only:
            raise BitmapError("the image is opened read-only")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise BitmapError(f"Name length exceeds maximum ({MAX_NAME_BYTES} characters)")
        if granularity > 1 << MAX_GRANULARITY_BITS:
            raise BitmapError(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
        if granularity < 1 << MIN_GRANULARITY_BITS:
            raise BitmapError(f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
        persistent = [b for b in bitmaps_of(image) if b.persistent]
        if len(persistent) >= MAX_BITMAPS:
            raise BitmapError("Maximum number of persistent bitmaps is already reached")
        if bitmap_bytes(image.header.size, granularity) > MAX_BITMAP_BYTES:
            raise BitmapError("Too large bitmap for this image (use a larger granularity)")
        size = sum(len(e.serialize()) for e in self.entries.values()) + len(
            BitmapEntry(name, 0, 0, 0, 9).serialize())
        if size > MAX_DIRECTORY_BYTES:
            raise BitmapError("Bitmap directory size would exceed maximum")

    def remove_persistent(self, name: str) -> None:
        """Drop ``name`` from the image now; its clusters are freed once the new directory is durable."""
        image = self.image
        entry = self.entries.get(name)
        if entry is None:
            return
        with image.gate.exclusive(), image._meta:
            self._commit([e for e in self.entries.values() if e.name != name], frees=self._extents(entry))

    def has_persistent(self) -> bool:
        """Does the image hold (or will it store at close) any persistent bitmap?"""
        return bool(self.entries) or any(b.persistent for b in bitmaps_of(self.image))

    # -- resize --------------------------------------------------------------------------------------------

    def check_resize(self) -> None:
        """Refuse a resize that would leave a stored bitmap behind (QEMU's qcow2_truncate_bitmaps_check):
        every bitmap must be loaded and usable, since the resized ones are written at close."""
        bitmaps = bitmaps_of(self.image)
        for name in self.entries:
            bitmap = bitmaps.get(name)
            if bitmap is None:
                raise BitmapError("Cannot resize qcow2 with persistent bitmaps that were not loaded")
            check_modifiable(bitmap)

    def resize(self, size: int) -> None:
        """The image now has ``size`` bytes: every bitmap of the node follows."""
        for bitmap in bitmaps_of(self.image):
            bitmap.resize(size)

    # -- closing -------------------------------------------------------------------------------------------

    def store(self) -> None:
        """Write every persistent bitmap with IN_USE clear (clean close). Inconsistent ones keep their
        old, IN_USE-flagged entries. Caller holds the exclusive gate and the metadata lock."""
        image = self.image
        if image.read_only:
            return
        bitmaps = [b for b in bitmaps_of(image) if b.persistent]
        if not bitmaps and not self.entries:
            return
        new: list[BitmapEntry] = []
        frees: list[tuple[int, int]] = []
        kept: set[str] = set()
        for bitmap in bitmaps:
            old = self.entries.get(bitmap.name)
            if bitmap.inconsistent and old is not None:
                new.append(old)
                kept.add(bitmap.name)
                continue
            new.append(self._write_bitmap(bitmap))
        for name, old in self.entries.items():
            if name not in kept:
                frees.extend(self._extents(old))
        self._commit(new, frees=frees)

    def _write_bitmap(self, bitmap: DirtyBitmap) -> BitmapEntry:
        image = self.image
        cs = image.cluster_size
        count = table_entries(bitmap.size, bitmap.granularity, cs)
        table = []
        for i in range(count):
            chunk = bitmap.serialize(i * cs, cs)
            if not chunk.strip(b"\0"):
                table.append(0)
                continue
            offset = image.refcounts.alloc(1)
            image.file.pwritev(offset, [chunk])
            table.append(offset)
        table_offset = 0
        if count:
            data = be64_bytes(table)
            table_offset = image.refcounts.alloc(-(-len(data) // cs))
            image.file.pwritev(table_offset, [data + bytes(-len(data) % cs)])
        return BitmapEntry(bitmap.name, table_offset, count, FLAG_AUTO if bitmap.enabled else 0,
                           bitmap.granularity.bit_length() - 1, b"", table)

    def _extents(self, entry: BitmapEntry) -> list[tuple[int, int]]:
        """Host ranges an entry owns: its table and its data clusters."""
        out = [(word & TABLE_OFFSET_MASK, self.image.cluster_size) for word in entry.table
               if word & TABLE_OFFSET_MASK]
        if entry.table_size:
            out.append((entry.table_offset, entry.table_size * 8))
        return out

    def _commit(self, entries: list[BitmapEntry], *, frees: list[tuple[int, int]]) -> None:
        """Write ``entries`` as the new directory and switch the header to it, then free the old directory
        and ``frees``. Order: new clusters and their refcounts durable, header, then the frees."""
        image = self.image
        cs = image.cluster_size
        old_dir = (self.dir_offset, self.dir_size) if self.dir_size else None
        if entries:
            directory = b"".join(e.serialize() for e in entries)
            dir_offset = image.refcounts.alloc(-(-len(directory) // cs))
            image.file.pwritev(dir_offset, [directory])
            image.quiesce_metadata()  # bitmap data, tables, directory and their refcounts on disk first
        header = image.header  # after the flush: growing the refcount table changes the header
        others = tuple((k, d) for k, d in header.unknown_extensions if k != EXT_BITMAPS)
        if entries:
            ext = _EXT.pack(len(entries), 0, len(directory), dir_offset)
            new_header = replace(header, unknown_extensions=others + ((EXT_BITMAPS, ext),),
                                 autoclear_features=header.autoclear_features | Autoclear.BITMAPS)
            self.dir_offset, self.dir_size = dir_offset, len(directory)
        else:
            new_header = replace(header, unknown_extensions=others,
                                 autoclear_features=header.autoclear_features & ~Autoclear.BITMAPS)
            self.dir_offset = self.dir_size = 0
        image._update_header(new_header)
        image._sync()
        self.entries = {e.name: e for e in entries}
        if old_dir is not None:
            image.refcounts.free(*old_dir)
        for offset, length in frees:
            image.refcounts.free(offset, length)
        image.quiesce_metadata()

    # -- check ---------------------------------------------------------------------------------------------

    def count_references(self, inc: Callable[[int, int], object]) -> None:
        """Report every cluster the extension uses (directory, tables, data) to ``check``'s counter."""
        if self.dir_size:
            inc(self.dir_offset, self.dir_size)
        for entry in self.entries.values():
            for offset, length in self._extents(entry):
                inc(offset, length)


def info_list(image: "Qcow2Format") -> list[dict[str, object]]:
    """qemu-img info's ``bitmaps`` list (format-specific data), from what is on disk."""
    store: Qcow2BitmapStore | None = getattr(image, "bitmap_store", None)
    if store is None:
        return []
    return [{"flags": e.flag_names(), "name": e.name, "granularity": e.granularity}
            for e in store.entries.values()]

