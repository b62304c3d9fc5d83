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
from typing import Callable, Iterator, NamedTuple, Sequence

from pyemu.block.qcow2.layout import (ALL_ALLOC, FLAG_COMPRESSED, FLAG_COPIED, FLAG_ZERO, L1_RESERVED,
                                      L2_RESERVED, OFFSET_MASK, ClusterKind, Geometry)
from pyemu.block.qcow2.read_map import ReadMap
from pyemu.block.qcow2.refcount import (CorruptionReporter, MetadataFile, Refcounts, array_from_be64,
                                        be64_bytes)


class Mapping(NamedTuple):
    """What one (sub)cluster of the guest disk is: ``host_offset`` of the (sub)cluster's data for NORMAL, of
    the compressed stream for COMPRESSED (``compressed_length`` bytes to read), else 0. A named tuple (not
    a frozen dataclass) because every request makes one, and a tuple is made in half the time."""

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


def continuing_entries(words: array.array, first: int, stop: int, kind: ClusterKind, next_host: int,
                       cluster_size: int, file_size: int) -> int:
    """How many standard (not extended) L2 entries ``words[first:stop]`` in a row continue an extent of
    ``kind``: valid (as :func:`entry_problem` and the driver's data-offset check judge them) and meaning the
    same, a NORMAL one also stored at the next host cluster (``next_host``, then onwards; the first entry
    itself may be judged by passing its own kind and host). Stops at the first that does not; the caller
    looks at that one on its own, so it reports a bad entry exactly as the per-entry code does.

    Why: reads and status queries of large ranges spend most of their time decoding entry after entry in
    Python; one tight loop over the table's words keeps a 2 MiB read or status query to a few microseconds.
    """
    invalid = (L2_RESERVED & ~FLAG_ZERO) | FLAG_COMPRESSED
    count = 0
    for index in range(first, stop):
        word = words[index]
        host = word & OFFSET_MASK
        if word & invalid:
            break
        if kind is ClusterKind.ZERO:
            if not word & FLAG_ZERO or host % cluster_size:
                break
        elif word & FLAG_ZERO:
            break
        elif kind is ClusterKind.UNALLOCATED:
            if host:
                break
        elif host != next_host or host % cluster_size or host >= file_size:
            break
        else:
            next_host += cluster_size
        count += 1
    return count


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
        self.read_map: ReadMap | None = None
        """The table readers in C map guest clusters with (:mod:`.read_map`), kept current from here."""

    # -- reading -------------------------------------------------------------------------------------------

    def split(self, vcluster: int) -> tuple[int, int]:
        return vcluster >> self.geometry.l2_bits, vcluster & ((1 << self.geometry.l2_bits) - 1)

    def l2_table(self, l1_index: int) -> L2Table | None:
        if l1_index >= len(self.l1):
            return None
        offset = self.l1[l1_index] & OFFSET_MASK
        if not offset:
            if self.read_map is not None and not self.read_map.published(l1_index):
                self.read_map.publish_no_table(l1_index, self.geometry.l2_bits)
            return None
        table = self._cached(offset)  # first, so a hit (every request, nearly) formats no error context
        if table is None:
            table = self.load_l2(offset, what=f"L1 index {l1_index:#x}")
        read_map = self.read_map
        if read_map is not None and not read_map.published(l1_index):
            read_map.publish_table(l1_index, table.words, self.geometry.l2_bits, self._file_size())
        return table

    def _cached(self, offset: int) -> L2Table | None:
        table = self._cache.get(offset)
        if table is not None:
            self._cache.move_to_end(offset)
        return table

    def load_l2(self, offset: int, *, what: str) -> L2Table:
        table = self._cached(offset)
        if table is not None:
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
        self._check(vcluster, word, bitmap)
        return word, bitmap

    def walk(self, first: int, stop: int) -> Iterator[tuple[int, int]]:
        """:meth:`checked_entry` of guest clusters ``first, first + 1, ... < stop`` in turn, each checked when
        it is reached (so a bad entry is reported where a cluster-by-cluster loop would have met it), with one
        table lookup per L2 table instead of one per cluster: allocating writes look at every cluster they
        cover twice, and the per-cluster lookups were most of their Python time.

        The caller must not change the tables while it walks (it reads the tables it has looked up)."""
        l2_bits = self.geometry.l2_bits
        vcluster = first
        while vcluster < stop:
            l1_index = vcluster >> l2_bits
            table_end = min(stop, (l1_index + 1) << l2_bits)
            table = self.l2_table(l1_index)
            for index in range(vcluster & ((1 << l2_bits) - 1), table_end - (l1_index << l2_bits)):
                word, bitmap = (0, 0) if table is None else self.table_entry(table, index)
                if word or bitmap:  # an all-zero entry is always valid (unallocated)
                    self._check((l1_index << l2_bits) + index, word, bitmap)
                yield word, bitmap
            vcluster = table_end

    def unallocated_run(self, first: int, stop: int) -> int:
        """How many guest clusters from ``first`` (before ``stop``) in a row have an all-zero entry (and
        bitmap): unallocated, no flags, valid. Compared as bytes, so a fresh image's allocating writes do not
        look at their clusters one by one in Python."""
        l2_bits = self.geometry.l2_bits
        width = 2 if self.geometry.extended_l2 else 1
        count = 0
        while first + count < stop:
            vcluster = first + count
            l1_index = vcluster >> l2_bits
            span = min(stop, (l1_index + 1) << l2_bits) - vcluster
            table = self.l2_table(l1_index)
            if table is not None:
                lo = (vcluster - (l1_index << l2_bits)) * width
                raw = table.words[lo:lo + span * width].tobytes()
                zeros = (len(raw) - len(raw.lstrip(b"\0"))) // (8 * width)
                if zeros < span:
                    return count + zeros
            count += span
        return count

    def _check(self, vcluster: int, word: int, bitmap: int) -> None:
        problem = entry_problem(self.geometry, word, bitmap)
        if problem:
            raise self._corrupt(f"{problem} (guest cluster {vcluster})")

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
        self.set_entries(vcluster, [(word, bitmap)])

    def set_entries(self, first: int, entries: Sequence[tuple[int, int]]) -> None:
        """Set ``(entry, bitmap)`` of guest clusters ``first, first + 1, ...``: one writable-table lookup per L2
        table, not per cluster."""
        l2_bits = self.geometry.l2_bits
        extended = self.geometry.extended_l2
        done = 0
        while done < len(entries):
            vcluster = first + done
            l1_index = vcluster >> l2_bits
            table = self.writable_l2(l1_index)
            index = vcluster & ((1 << l2_bits) - 1)
            count = min(len(entries) - done, (1 << l2_bits) - index)
            for i, (word, bitmap) in enumerate(entries[done:done + count], index):
                if extended:
                    table.words[2 * i] = word
                    table.words[2 * i + 1] = bitmap
                else:
                    table.words[i] = word
            table.dirty = True
            done += count
        if self.read_map is not None:
            self.read_map.publish(first, [word for word, _ in entries], self._file_size())

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
