"""Internal snapshots: the snapshot table as qcow2 stores it, and create / apply / delete.

A snapshot is a copy of the L1 table plus one more reference on every cluster reachable from it; the active
image then copies a cluster before writing it (its refcount is above 1, the COPIED flag is clear). The
table format follows the specification (40-byte entry head, extra data with the 64-bit VM state size, disk
size and instruction count, then id and name), so qemu-img lists pyemu's snapshots and pyemu applies
qemu-img's. Every operation changes refcounts first, then the tables, and syncs between steps, so a crash
leaves at worst leaked clusters.

Callers (the driver's methods) hold the metadata lock and the exclusive I/O gate.
"""

from __future__ import annotations

import errno
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from pyemu.block.errors import BlockError
from pyemu.block.qcow2.layout import (FLAG_COMPRESSED, FLAG_COPIED, L1_RESERVED, MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA,
                                      OFFSET_MASK)
from pyemu.block.qcow2.refcount import array_from_be64, be64_bytes

if TYPE_CHECKING:
    from pyemu.block.qcow2.driver import Qcow2Format

_ENTRY = struct.Struct(">QIHHIIQII")
_EXTRA = struct.Struct(">QQQ")
MAX_TABLE_BYTES = 64 << 20


class SnapshotError(BlockError):
    """A snapshot operation was refused (unknown name, duplicate name, refcount overflow ...)."""

    def __init__(self, message: str, *, errno: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int
    icount: int | None
    l1_table_offset: int = 0
    l1_size: int = 0
    extra: bytes = b""

    def entry_bytes(self) -> bytes:
        extra = bytearray(self.extra)
        fixed = _EXTRA.pack(self.vm_state_size, self.disk_size, 0xFFFFFFFFFFFFFFFF if self.icount is None
                            else self.icount)
        extra[:len(fixed)] = fixed
        id_b, name_b = self.id.encode(), self.name.encode()
        head = _ENTRY.pack(self.l1_table_offset, self.l1_size, len(id_b), len(name_b), self.date_sec,
                           self.date_nsec, self.vm_clock_nsec, min(self.vm_state_size, 0xFFFFFFFF), len(extra))
        out = head + bytes(extra) + id_b + name_b
        return out + bytes(-len(out) % 8)


def read_snapshot_table(image: "Qcow2Format") -> list[SnapshotInfo]:
    """Parse the table the header points at, validating every entry (raises the image's corruption error)."""
    header = image.header
    if not header.nb_snapshots:
        return []
    cs = image.cluster_size
    offset = header.snapshots_offset
    if offset < cs or offset >= image.file.size():
        raise image.corruption(f"Snapshot table offset {offset:#x} invalid")
    snapshots: list[SnapshotInfo] = []
    pos = offset
    for index in range(header.nb_snapshots):
        if pos - offset + _ENTRY.size > MAX_TABLE_BYTES or pos >= image.file.size():
            raise image.corruption("Snapshot table is too large or runs past the end of the image")
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state32,
         extra_size) = _ENTRY.unpack(image.read_meta(pos, _ENTRY.size))
        if extra_size > MAX_SNAPSHOT_EXTRA:
            raise image.corruption(f"Snapshot {index}: too much extra metadata ({extra_size} bytes)")
        if l1_size * 8 > MAX_L1_BYTES:
            raise image.corruption(f"Snapshot {index}: L1 table is too large")
        if l1_size and (l1_offset % cs or l1_offset < cs or l1_offset >= image.file.size()):
            raise image.corruption(f"Snapshot {index}: L1 table offset {l1_offset:#x} invalid")
        pos += _ENTRY.size
        extra = image.read_meta(pos, extra_size)
        pos += extra_size
        vm_state = vm_state32
        disk_size = header.size
        icount: int | None = None
        if extra_size >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_size >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if extra_size >= 24:
            raw_icount = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if raw_icount == 0xFFFFFFFFFFFFFFFF else raw_icount
        names = image.read_meta(pos, id_size + name_size)
        pos += id_size + name_size
        pos += -(pos - offset) % 8
        snapshots.append(SnapshotInfo(
            id=names[:id_size].decode(errors="replace"), name=names[id_size:].decode(errors="replace"),
            vm_state_size=vm_state, date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock,
            disk_size=disk_size, icount=icount, l1_table_offset=l1_offset, l1_size=l1_size, extra=extra))
    table_end = pos
    h = image.header
    for name, start, length in (("L1 table", h.l1_table_offset, h.l1_size * 8),
                                ("refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs)):
        if length and offset < start + length and start < table_end:
            raise image.corruption(f"Snapshot table overlaps the {name}")
    image.snapshot_table_bytes = table_end - offset
    return snapshots


def list_snapshots(image: "Qcow2Format") -> list[SnapshotInfo]:
    return list(image.snapshot_table)


def find_snapshot(image: "Qcow2Format", name_or_id: str) -> SnapshotInfo:
    """By id first, then by name (QEMU's lookup order for savevm/loadvm/qemu-img snapshot)."""
    for snap in image.snapshot_table:
        if snap.id == name_or_id:
            return snap
    for snap in image.snapshot_table:
        if snap.name == name_or_id:
            return snap
    raise SnapshotError(f"Can't find snapshot '{name_or_id}'", errno=errno.ENOENT)


def _tree(image: "Qcow2Format", l1: list[int], what: str) -> Iterator[tuple[str, int, int]]:
    """Every (kind, host offset, length) an L1 tree references: "l2" tables and "data" (incl. compressed)."""
    geometry = image.geometry
    for i, entry in enumerate(l1):
        l2_offset = entry & OFFSET_MASK
        if not l2_offset:
            continue
        table = image.map.load_l2(l2_offset, what=f"{what} L1 index {i:#x}")
        yield "l2", l2_offset, image.cluster_size
        step = 2 if geometry.extended_l2 else 1
        for word in table.words[::step]:
            if word & FLAG_COMPRESSED:
                offset, length = geometry.compressed_range(word)
                yield "data", offset, length
            elif word & OFFSET_MASK:
                yield "data", word & OFFSET_MASK, image.cluster_size


def _clusters(image: "Qcow2Format", offset: int, length: int) -> range:
    return range(offset >> image.cluster_bits, ((offset + length - 1) >> image.cluster_bits) + 1)


def adjust_tree(image: "Qcow2Format", l1: list[int], delta: int, what: str) -> None:
    """Add ``delta`` to every cluster the tree references, refusing overflow before changing anything."""
    counts: dict[int, int] = {}
    for _, offset, length in _tree(image, l1, what):
        for cluster in _clusters(image, offset, length):
            counts[cluster] = counts.get(cluster, 0) + 1
    if delta > 0:
        for cluster in counts:
            if image.refcounts.get(cluster) + delta > image.refcounts.max:
                raise SnapshotError(f"qcow2: refcount overflow for cluster {cluster} "
                                    f"({image.header.refcount_bits}-bit refcounts cannot hold another snapshot)",
                                    errno=errno.ERANGE)
    for cluster, _ in counts.items():
        image.refcounts.update(cluster, 1, delta)


def fix_copied_flags(image: "Qcow2Format") -> None:
    """Set COPIED exactly where the active tree owns a cluster alone (refcount 1)."""
    geometry = image.geometry
    step = 2 if geometry.extended_l2 else 1
    for i, entry in enumerate(image.map.l1):
        l2_offset = entry & OFFSET_MASK
        if not l2_offset:
            continue
        owned_l2 = image.refcounts.get(l2_offset >> image.cluster_bits) == 1
        new_entry = l2_offset | (FLAG_COPIED if owned_l2 else 0)
        if new_entry != entry:
            image.map.l1[i] = new_entry
            image.map.l1_dirty = True
        table = image.map.load_l2(l2_offset, what=f"L1 index {i:#x}")
        for j in range(0, len(table.words), step):
            word = table.words[j]
            if word & FLAG_COMPRESSED or not word & OFFSET_MASK:
                continue
            # Entries of a shared table reach their clusters through several L1 tables: never COPIED.
            owned = owned_l2 and image.refcounts.get((word & OFFSET_MASK) >> image.cluster_bits) == 1
            new_word = word | FLAG_COPIED if owned else word & ~FLAG_COPIED
            if new_word != word:
                table.words[j] = new_word
                table.dirty = True


def _write_table(image: "Qcow2Format", snapshots: list[SnapshotInfo]) -> None:
    """Write a new snapshot table, point the header at it, free the old one."""
    old_offset = image.header.snapshots_offset if image.header.nb_snapshots else 0
    old_bytes = image.snapshot_table_bytes
    data = b"".join(s.entry_bytes() for s in snapshots)
    if len(data) > MAX_TABLE_BYTES:
        raise SnapshotError("Snapshot table too large", errno=errno.EFBIG)
    new_offset = 0
    if data:
        clusters = -(-len(data) // image.cluster_size)
        new_offset = image.refcounts.alloc(clusters)
        image.write_meta(new_offset, data)
    image.quiesce_metadata()
    image.write_header_fields(nb_snapshots=len(snapshots), snapshots_offset=new_offset)
    image.snapshot_table = snapshots
    image.snapshot_table_bytes = len(data)
    if old_offset and old_bytes:
        image.refcounts.free(old_offset, old_bytes)
    image.quiesce_metadata()


def create_snapshot(image: "Qcow2Format", name: str, *, vm_state_size: int = 0,
                    vm_clock_nsec: int = 0, icount: int | None = 0) -> SnapshotInfo:
    """``icount`` None is QEMU's -1: no instruction count (savevm without -icount)."""
    # Names need not be unique (QEMU allows duplicates and empty names; lookups take the first match).
    if len(image.snapshot_table) >= 65536:
        raise SnapshotError("Too many snapshots", errno=errno.EFBIG)
    image.quiesce_metadata()
    l1 = list(image.map.l1)
    adjust_tree(image, l1, +1, "active")
    snap_l1 = [e & ~FLAG_COPIED for e in l1]
    l1_offset = 0
    if snap_l1:
        l1_offset = image.refcounts.alloc(-(-len(snap_l1) * 8 // image.cluster_size))
        image.write_meta(l1_offset, be64_bytes(snap_l1))
    fix_copied_flags(image)
    image.quiesce_metadata()
    ids = [int(s.id) for s in image.snapshot_table if s.id.isdigit()]
    now = time.time_ns()
    snap = SnapshotInfo(id=str(max(ids, default=0) + 1), name=name, vm_state_size=vm_state_size,
                        date_sec=now // 1_000_000_000, date_nsec=now % 1_000_000_000, vm_clock_nsec=vm_clock_nsec,
                        disk_size=image.header.size, icount=icount, l1_table_offset=l1_offset, l1_size=len(snap_l1),
                        extra=bytes(_EXTRA.size))
    _write_table(image, image.snapshot_table + [snap])
    return snap


def read_snapshot_l1(image: "Qcow2Format", snap: SnapshotInfo) -> list[int]:
    l1 = list(array_from_be64(image.read_meta(snap.l1_table_offset, snap.l1_size * 8))) if snap.l1_size else []
    for i, entry in enumerate(l1):
        if entry & L1_RESERVED:
            raise image.corruption(f"Snapshot '{snap.name}' L1 entry {i} has reserved bits set")
    return l1


def apply_snapshot(image: "Qcow2Format", name_or_id: str) -> None:
    snap = find_snapshot(image, name_or_id)
    image.quiesce_metadata()
    snap_l1 = read_snapshot_l1(image, snap)
    from pyemu.block.qcow2.resize import grow_l1
    needed = max(len(snap_l1), image.geometry.l1_entries_for(snap.disk_size))
    if needed > len(image.map.l1):
        grow_l1(image, needed)
    old_l1 = list(image.map.l1)
    adjust_tree(image, snap_l1, +1, f"snapshot '{snap.name}'")
    image.quiesce_metadata()
    new_l1 = [e & ~FLAG_COPIED for e in snap_l1] + [0] * (len(image.map.l1) - len(snap_l1))
    image.map.l1 = new_l1
    image.map.l1_dirty = True
    image.quiesce_metadata()
    adjust_tree(image, old_l1, -1, "active")
    if snap.disk_size != image.header.size:
        image.write_header_fields(size=snap.disk_size)
    fix_copied_flags(image)
    image.map.drop_cache()
    image.quiesce_metadata()


def delete_snapshot(image: "Qcow2Format", name_or_id: str) -> None:
    snap = find_snapshot(image, name_or_id)
    image.quiesce_metadata()
    remaining = [s for s in image.snapshot_table if s is not snap]
    snap_l1 = read_snapshot_l1(image, snap)
    _write_table(image, remaining)
    adjust_tree(image, snap_l1, -1, f"snapshot '{snap.name}'")
    if snap.l1_size:
        image.refcounts.update(snap.l1_table_offset >> image.cluster_bits,
                               -(-snap.l1_size * 8 // image.cluster_size), -1)
    fix_copied_flags(image)
    image.map.drop_cache()
    image.quiesce_metadata()
