"""Guest-to-host cluster mapping: the active L1 table and a bounded cache of L2 tables.

A guest offset splits into an L1 index, an L2 index and an offset in the cluster; the L2 entry (plus, with
extended L2 entries, a 64-bit subcluster bitmap) says whether the data is stored, compressed, zero or left
to the backing file. This module reads and changes entries; it never touches guest data, so the I/O path
(:mod:`.driver`) and the snapshot and check code share one idea of what an entry means.

Every table offset read from the image is validated before use (alignment, inside the file, not the header):
a bad one raises the driver's corruption error, which marks the image corrupt and fails the request with EIO.
"""

from __future__ import annotations

import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from pyemu.block.qcow2.layout import (ALL_ALLOC, FLAG_COMPRESSED, FLAG_COPIED, FLAG_ZERO, L1_RESERVED,
                                      L2_RESERVED, OFFSET_MASK, ClusterKind, Geometry)
from pyemu.block.qcow2.refcount import (CorruptionReporter, MetadataFile, Refcounts, array_from_be64,
                                        be64_bytes)


@dataclass(frozen=True)
class Mapping:
    """What one (sub)cluster of the guest disk is: ``host_offset`` of the (sub)cluster's data for NORMAL, of
    the compressed stream for COMPRESSED (``compressed_length`` bytes to read), else 0."""

    kind: ClusterKind
    host_offset: int = 0
    compressed_length: int = 0


class L2Table:
    """One L2 table as native integers (two per entry with extended L2: the entry, then its bitmap)."""

    __slots__ = ("offset", "words", "dirty")

    def __init__(self, offset: int, words: array.array) -> None:
        self.offset = offset
        self.words = words
        self.dirty = False


def decode(geometry: Geometry, word: int, bitmap: int, subcluster: int) -> Mapping:
    """The meaning of entry ``word`` (+ ``bitmap``) for one subcluster (0 without extended L2)."""
    if word & FLAG_COMPRESSED:
        offset, length = geometry.compressed_range(word)
        return Mapping(ClusterKind.COMPRESSED, offset, length)
    host = word & OFFSET_MASK
    if geometry.extended_l2:
        if bitmap >> 32 >> subcluster & 1:
            return Mapping(ClusterKind.ZERO)
        if bitmap >> subcluster & 1:
            return Mapping(ClusterKind.NORMAL, host + subcluster * geometry.subcluster_size)
        return Mapping(ClusterKind.UNALLOCATED)
    if word & FLAG_ZERO:
        return Mapping(ClusterKind.ZERO)
    if host:
        return Mapping(ClusterKind.NORMAL, host)
    return Mapping(ClusterKind.UNALLOCATED)


def entry_problem(geometry: Geometry, word: int, bitmap: int) -> str | None:
    """Why an L2 entry is invalid, or None."""
    if word & FLAG_COMPRESSED:
        return None
    host = word & OFFSET_MASK
    reserved = L2_RESERVED | (FLAG_ZERO if geometry.extended_l2 else 0)
    if word & reserved & ~FLAG_ZERO or (geometry.extended_l2 and word & FLAG_ZERO):
        return f"reserved bits set in L2 entry {word:#x}"
    if host % geometry.cluster_size:
        return f"Cluster allocation offset {host:#x} unaligned"
    if geometry.extended_l2:
        if bitmap & (bitmap >> 32) & ALL_ALLOC:
            return f"Invalid cluster entry found (L2 bitmap {bitmap:#x}: a subcluster is both allocated and zero)"
        if not host and bitmap & ALL_ALLOC:
            return "Invalid cluster entry found (subclusters allocated without a host cluster)"
    return None


class ClusterMap:
    """The active L1 table and the L2 cache. Not thread safe: the driver calls it under its metadata lock."""

    def __init__(self, file: MetadataFile, geometry: Geometry, *, l1_offset: int, l1_size: int,
                 refcounts: Refcounts | None, corrupt: CorruptionReporter, file_size: Callable[[], int],
                 cache_bytes: int = 32 << 20) -> None:
        self.file = file
        self.geometry = geometry
        self.l1_offset = l1_offset
        self.refcounts = refcounts
        self._corrupt = corrupt
        self._file_size = file_size
        self.l1 = list(array_from_be64(file.read_meta(l1_offset, l1_size * 8))) if l1_size else []
        for i, entry in enumerate(self.l1):
            if entry & L1_RESERVED:
                raise corrupt(f"L1 entry {i} has reserved bits set ({entry:#x})")
        self.l1_dirty = False
        self._cache: OrderedDict[int, L2Table] = OrderedDict()
        self._cache_limit = max(16, cache_bytes >> geometry.cluster_bits)

    # -- reading -------------------------------------------------------------------------------------------

    def split(self, vcluster: int) -> tuple[int, int]:
        return vcluster >> self.geometry.l2_bits, vcluster & ((1 << self.geometry.l2_bits) - 1)

    def l2_table(self, l1_index: int) -> L2Table | None:
        if l1_index >= len(self.l1):
            return None
        offset = self.l1[l1_index] & OFFSET_MASK
        if not offset:
            return None
        return self.load_l2(offset, what=f"L1 index {l1_index:#x}")

    def load_l2(self, offset: int, *, what: str) -> L2Table:
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
            return table
        cs = self.geometry.cluster_size
        if offset % cs or offset < cs or offset >= self._file_size():
            raise self._corrupt(f"L2 table offset {offset:#x} invalid ({what})")
        words = array_from_be64(self.file.read_meta(offset, cs))
        table = L2Table(offset, words)
        self._cache[offset] = table
        self._evict()
        return table

    def table_entry(self, table: L2Table, l2_index: int) -> tuple[int, int]:
        """(L2 entry, bitmap) at ``l2_index`` of ``table`` (bitmap 0 without extended L2 entries)."""
        if self.geometry.extended_l2:
            return table.words[2 * l2_index], table.words[2 * l2_index + 1]
        return table.words[l2_index], 0

    def entry(self, vcluster: int) -> tuple[int, int]:
        """(L2 entry, bitmap) of a guest cluster; (0, 0) when no L2 table maps it."""
        l1_index, l2_index = self.split(vcluster)
        table = self.l2_table(l1_index)
        if table is None:
            return 0, 0
        return self.table_entry(table, l2_index)

    def checked_entry(self, vcluster: int) -> tuple[int, int]:
        word, bitmap = self.entry(vcluster)
        problem = entry_problem(self.geometry, word, bitmap)
        if problem:
            raise self._corrupt(f"{problem} (guest cluster {vcluster})")
        return word, bitmap

    # -- writing -------------------------------------------------------------------------------------------

    def writable_l2(self, l1_index: int) -> L2Table:
        """The L2 table for ``l1_index``, made private to the active image (allocated, or copied when shared
        with a snapshot)."""
        assert self.refcounts is not None
        if l1_index >= len(self.l1):
            raise self._corrupt(f"guest cluster beyond the L1 table (index {l1_index})")
        entry = self.l1[l1_index]
        old = entry & OFFSET_MASK
        if old and entry & FLAG_COPIED:
            return self.load_l2(old, what=f"L1 index {l1_index:#x}")
        cs = self.geometry.cluster_size
        if old:
            words = array.array("Q", self.load_l2(old, what=f"L1 index {l1_index:#x}").words)
        else:
            words = array.array("Q", bytes(cs))
        new = self.refcounts.alloc(1)
        table = L2Table(new, words)
        table.dirty = True
        self._cache[new] = table
        self.l1[l1_index] = new | FLAG_COPIED
        self.l1_dirty = True
        if old:
            self.refcounts.free(old, cs)
        self._evict()
        return table

    def set_entry(self, vcluster: int, word: int, bitmap: int = 0) -> None:
        l1_index, l2_index = self.split(vcluster)
        table = self.writable_l2(l1_index)
        if self.geometry.extended_l2:
            table.words[2 * l2_index] = word
            table.words[2 * l2_index + 1] = bitmap
        else:
            table.words[l2_index] = word
        table.dirty = True

    def write_dirty_l2(self) -> bool:
        wrote = False
        for table in self._cache.values():
            if table.dirty:
                self.file.write_meta(table.offset, be64_bytes(table.words))
                table.dirty = False
                wrote = True
        return wrote

    def write_l1(self) -> bool:
        if not self.l1_dirty:
            return False
        self.file.write_meta(self.l1_offset, be64_bytes(self.l1))
        self.l1_dirty = False
        return True

    @property
    def dirty_tables(self) -> int:
        return sum(1 for t in self._cache.values() if t.dirty)

    def forget(self, offset: int) -> None:
        """Drop a table from the cache (it was freed or rewritten behind the cache)."""
        self._cache.pop(offset, None)

    def drop_cache(self) -> None:
        self._cache = OrderedDict((o, t) for o, t in self._cache.items() if t.dirty)

    def over_limit(self) -> bool:
        return len(self._cache) > self._cache_limit

    def _evict(self) -> None:
        while len(self._cache) > self._cache_limit:
            victim = next((o for o, t in self._cache.items() if not t.dirty), None)
            if victim is None:
                return  # all dirty: the driver flushes when over_limit() says so
            del self._cache[victim]
