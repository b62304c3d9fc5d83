"""Reference counts and cluster allocation: the refcount table, its blocks, and who may reuse a cluster.

Every host cluster of a qcow2 file has a reference count: 0 is free, 1 is owned by exactly one table entry
(the active image may write it in place), more means shared with snapshots (write must copy). The counts live
in refcount blocks, found through the refcount table. This module is the only code that changes them.

Crash consistency is an ordering rule (see :mod:`.driver` for the whole flush sequence):

* an *increment* must reach the disk before anything that uses the cluster: increments stay in the block
  cache (dirty) and are written in the first phase of a flush, before L2/L1 tables;
* a *decrement* must reach the disk only after nothing references the cluster any more: frees are queued
  (:meth:`Refcounts.free`) and applied in memory only after the tables that dropped the reference were
  written and synced (:meth:`Refcounts.apply_pending_frees`), so a freed cluster is never reused while an
  on-disk table may still point at it. A crash in between leaks the cluster: the repairable kind of damage.

A new refcount block is placed inside the range it describes (it then counts itself), and the table grows by
putting new block and table at the first cluster no existing block covers, where nothing can be in use.
"""

from __future__ import annotations

import array
import errno
import sys
from collections import OrderedDict
from typing import Callable, Iterable, Protocol, Sequence

from pyemu.block.errors import BlockIOError
from pyemu.block.qcow2.layout import MAX_REFTABLE_BYTES, REFTABLE_OFFSET_MASK, refcount_max

_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}
_BIG_ENDIAN_HOST = sys.byteorder == "big"


class CorruptionReporter(Protocol):
    def __call__(self, problem: str) -> BlockIOError: ...


class MetadataFile(Protocol):
    """What refcount and table code need from the file below: read (zeros past EOF), write, sync."""

    def read_meta(self, offset: int, length: int) -> bytes: ...
    def write_meta(self, offset: int, data: bytes | memoryview) -> None: ...


class RefcountBlock:
    """One refcount block's entries, with get/set for any width from 1 to 64 bits."""

    __slots__ = ("order", "_array", "_bytes", "dirty")

    def __init__(self, data: bytes, order: int) -> None:
        self.order = order
        self.dirty = False
        self._array: array.array | None
        self._bytes: bytearray | None
        if order >= 3:
            self._array = array.array(_TYPECODES[order])
            self._array.frombytes(data)
            if not _BIG_ENDIAN_HOST and order > 3:
                self._array.byteswap()
            self._bytes = None
        else:
            self._array = None
            self._bytes = bytearray(data)

    def __len__(self) -> int:
        if self._array is not None:
            return len(self._array)
        assert self._bytes is not None
        return len(self._bytes) * 8 >> self.order

    def get(self, index: int) -> int:
        if self._array is not None:
            return self._array[index]
        width = 1 << self.order
        bit = index * width
        assert self._bytes is not None
        return (self._bytes[bit >> 3] >> (bit & 7)) & ((1 << width) - 1)

    def set(self, index: int, value: int) -> None:
        self.dirty = True
        if self._array is not None:
            self._array[index] = value
            return
        width = 1 << self.order
        bit = index * width
        mask = ((1 << width) - 1) << (bit & 7)
        assert self._bytes is not None
        self._bytes[bit >> 3] = (self._bytes[bit >> 3] & ~mask) | (value << (bit & 7))

    def to_bytes(self) -> bytes:
        if self._array is None:
            assert self._bytes is not None
            return bytes(self._bytes)
        if _BIG_ENDIAN_HOST or self.order == 3:
            return self._array.tobytes()
        copy = array.array(self._array.typecode, self._array)
        copy.byteswap()
        return copy.tobytes()


class Refcounts:
    """The refcount table and a bounded cache of its blocks.

    ``set_reftable(offset, clusters)`` is called when the table moved (it must update the header on disk and
    sync). Not thread safe: the driver calls it under its metadata lock.
    """

    def __init__(self, file: MetadataFile, *, cluster_bits: int, refcount_order: int, table_offset: int,
                 table_clusters: int, file_size: Callable[[], int], corrupt: CorruptionReporter,
                 set_reftable: Callable[[int, int], None], sync: Callable[[], None],
                 cache_blocks: int = 256) -> None:
        self.file = file
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.max = refcount_max(refcount_order)
        self.block_bits = cluster_bits + 3 - refcount_order  # log2(entries per block)
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self._file_size = file_size
        self._corrupt = corrupt
        self._set_reftable = set_reftable
        self._sync = sync
        raw = file.read_meta(table_offset, table_clusters * self.cluster_size)
        self.table = list(array_from_be64(raw))
        # Reserved bits and unaligned blocks both show in an entry's low cluster_bits bits: one big-integer
        # test of the whole table first (an image's open walked its 8192+ entries in Python: ~1.5 ms).
        low = (self.cluster_size - 1).to_bytes(8, "big") * len(self.table)
        if int.from_bytes(raw[:len(low)], "big") & int.from_bytes(low, "big"):
            for i, entry in enumerate(self.table):
                if entry & ~REFTABLE_OFFSET_MASK & 0x1FF:
                    raise corrupt(f"Refcount table entry {i} has reserved bits set")
                block = entry & REFTABLE_OFFSET_MASK
                if block % self.cluster_size:
                    raise corrupt(f"Refblock offset {block:#x} unaligned (reftable index: {i:#x})")
        self.table_dirty = False
        self._cache: OrderedDict[int, RefcountBlock] = OrderedDict()
        self._cache_limit = max(cache_blocks, (4 << 20) >> cluster_bits)
        self.pending_frees: list[tuple[int, int]] = []
        self.free_hint = 0
        # Byte allocator for compressed clusters: the next free byte in a partly used cluster (0 = none).
        self.free_byte_offset = 0

    # -- lookup --------------------------------------------------------------------------------------------

    @property
    def covered_clusters(self) -> int:
        """Clusters the current table can describe."""
        return len(self.table) << self.block_bits

    def _block(self, table_index: int) -> RefcountBlock | None:
        if table_index >= len(self.table):
            return None
        offset = self.table[table_index] & REFTABLE_OFFSET_MASK
        if offset == 0:
            return None
        block = self._cache.get(offset)
        if block is None:
            if offset >= self._file_size():
                raise self._corrupt(f"Refblock at {offset:#x} is beyond the end of the image")
            block = RefcountBlock(self.file.read_meta(offset, self.cluster_size), self.order)
            self._cache[offset] = block
            self._evict()
        else:
            self._cache.move_to_end(offset)
        return block

    def get(self, cluster: int) -> int:
        block = self._block(cluster >> self.block_bits)
        if block is None:
            return 0
        return block.get(cluster & ((1 << self.block_bits) - 1))

    # -- changes -------------------------------------------------------------------------------------------

    def update(self, cluster: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``cluster`` (blocks must exist for
        increments; :meth:`alloc` guarantees that). Overflow and underflow are refused before any change."""
        spans = self._spans(cluster, count)
        for index, lo, hi in spans:
            block = self._block(index)
            for i in range(lo, hi):
                value = 0 if block is None else block.get(i)
                if not 0 <= value + delta <= self.max:
                    what = "overflow" if delta > 0 else "underflow"
                    raise BlockIOError(f"qcow2: refcount {what} for cluster {(index << self.block_bits) + i} "
                                       f"(refcount {value}, {1 << self.order}-bit refcounts)",
                                       errno=errno.ERANGE if delta > 0 else errno.EIO)
        for index, lo, hi in spans:
            block = self._ensure_block((index << self.block_bits) + lo)
            for i in range(lo, hi):
                value = block.get(i) + delta
                block.set(i, value)
                if delta < 0 and value == 0:
                    self.free_hint = min(self.free_hint, (index << self.block_bits) + i)

    def _spans(self, cluster: int, count: int) -> list[tuple[int, int, int]]:
        """``(block index, first, end)`` for the clusters ``[cluster, cluster + count)``, one per refcount
        block they fall in, so a run of clusters looks its blocks up once each rather than per cluster."""
        per_block = 1 << self.block_bits
        spans = []
        pos, end = cluster, cluster + count
        while pos < end:
            index = pos >> self.block_bits
            stop = min(end, (index + 1) * per_block)
            spans.append((index, pos - index * per_block, stop - index * per_block))
            pos = stop
        return spans

    def set(self, cluster: int, value: int) -> None:
        """Set one refcount outright (repair)."""
        block = self._ensure_block(cluster)
        block.set(cluster & ((1 << self.block_bits) - 1), value)

    def free(self, offset: int, length: int) -> None:
        """Queue a decrement of the clusters covering [offset, offset+length) for the next flush."""
        if length <= 0:
            return
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        self.pending_frees.append((first, last - first + 1))

    def apply_pending_frees(self) -> None:
        frees, self.pending_frees = self.pending_frees, []
        for cluster, count in frees:
            self.update(cluster, count, -1)

    def alloc(self, count: int) -> int:
        """Allocate ``count`` contiguous free clusters (refcount 1) and return the host offset of the first.

        When the run lies in ranges that have no refcount block yet, the missing blocks go directly in front
        of the run (a run of ``count + k`` free clusters is looked for), so they never split it.
        """
        if count <= 0:
            raise ValueError(f"allocation of {count} clusters")
        extra = 0
        while True:
            start = self._find_free_run(count + extra)
            end = start + count + extra
            missing = [i for i in range(start >> self.block_bits, ((end - 1) >> self.block_bits) + 1)
                       if self._block(i) is None]
            if not missing:
                self.update(start + extra, count, +1)
                self.free_hint = start + extra + count
                return (start + extra) << self.cluster_bits
            if missing[-1] >= len(self.table):
                self._grow_table(missing[-1])
                extra = 0
                continue
            if len(missing) > extra:
                extra = len(missing)  # look again for a run with room for the blocks in front
                continue
            for k, index in enumerate(missing):
                self._install_block(index, (start + k) << self.cluster_bits)
            self.update(start, len(missing), +1)  # the blocks' own clusters, now covered
            self.free_hint = start
            extra = 0
            self._evict()

    def alloc_bytes(self, size: int) -> int:
        """Allocate ``size`` bytes (at most one cluster) for a compressed cluster, packing several into one
        host cluster as qcow2 writers do: each compressed cluster adds one reference to its host cluster."""
        cs = self.cluster_size
        if not 0 < size <= cs:
            raise ValueError(f"compressed allocation of {size} bytes")
        offset = self.free_byte_offset
        if offset % cs and offset % cs + size <= cs:
            self.update(offset >> self.cluster_bits, 1, +1)
        else:
            offset = self.alloc(1)
        self.free_byte_offset = offset + size
        return offset

    def _find_free_run(self, count: int) -> int:
        """First run of ``count`` free clusters at or after the hint, scanning block by block (a range with
        no refcount block is entirely free)."""
        per_block = 1 << self.block_bits
        start = self.free_hint
        run = 0
        c = start
        while run < count:
            index = c >> self.block_bits
            block = self._block(index)
            block_end = (index + 1) * per_block
            if block is None:
                if run == 0:
                    start = c
                run += block_end - c
                c = block_end
                continue
            for i in range(c - index * per_block, per_block):
                if block.get(i) == 0:
                    if run == 0:
                        start = index * per_block + i
                    run += 1
                    if run >= count:
                        return start
                else:
                    run = 0
            c = block_end
        return start

    def _ensure_block(self, cluster: int) -> RefcountBlock:
        """The block describing ``cluster``, created (by allocating it like any cluster) if missing."""
        block = self._block(cluster >> self.block_bits)
        if block is None:
            if (cluster >> self.block_bits) >= len(self.table):
                self._grow_table(cluster >> self.block_bits)
                block = self._block(cluster >> self.block_bits)
            if block is None:
                self.place_block(cluster >> self.block_bits, at_cluster=None)
                block = self._block(cluster >> self.block_bits)
            assert block is not None
        return block

    def place_block(self, index: int, *, at_cluster: int | None) -> None:
        """Create the refcount block for table slot ``index`` at ``at_cluster`` (repair: past everything in
        use) or, with None, at a newly allocated cluster. Its own refcount is set in whichever block covers
        it."""
        if index >= len(self.table):
            self._grow_table(index)
        if at_cluster is None:
            block_offset = self.alloc(1)
            if self.table[index]:  # allocating created this very block already
                self.update(block_offset >> self.cluster_bits, 1, -1)
                return
            self._install_block(index, block_offset)
            return
        self._install_block(index, at_cluster << self.cluster_bits)
        self.set(at_cluster, 1)

    def _install_block(self, index: int, offset: int) -> None:
        """An empty (dirty) refcount block at ``offset`` becomes table slot ``index``; the caller counts the
        block's own cluster."""
        block = RefcountBlock(bytes(self.cluster_size), self.order)
        block.dirty = True
        self._cache[offset] = block
        self.table[index] = offset
        self.table_dirty = True

    def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a bigger one placed, after new blocks describing it, at the first
        cluster the current table cannot describe (nothing there can be in use)."""
        entries_per_cluster = self.cluster_size // 8
        per_block = 1 << self.block_bits
        first_uncovered = self.covered_clusters
        first_index = first_uncovered >> self.block_bits
        want = max(needed_index + 1, first_index + 1, len(self.table) * 3 // 2 + 1)
        while True:
            clusters = -(-want // entries_per_cluster)
            # New blocks + the new table sit at first_uncovered; the blocks must describe all of them.
            blocks = -(-clusters // (per_block - 1)) if per_block > 1 else clusters
            if first_index + blocks <= clusters * entries_per_cluster:
                break
            want = first_index + blocks
        if clusters * self.cluster_size > MAX_REFTABLE_BYTES:
            raise BlockIOError("qcow2: the image is too large for its refcount table", errno=errno.EFBIG)
        new_table = self.table + [0] * (clusters * entries_per_cluster - len(self.table))
        table_offset = (first_uncovered + blocks) << self.cluster_bits
        new_blocks: list[tuple[int, RefcountBlock]] = []
        used_end = first_uncovered + blocks + clusters  # clusters [first_uncovered, used_end) become used
        for k in range(blocks):
            start = first_uncovered + k * per_block
            block = RefcountBlock(bytes(self.cluster_size), self.order)
            for cluster in range(start, min(start + per_block, used_end)):
                block.set(cluster - start, 1)
            offset = (first_uncovered + k) << self.cluster_bits
            new_table[first_index + k] = offset
            new_blocks.append((offset, block))
        # Flush what the old table describes first, so the new table's entries point at written blocks.
        self.write_dirty_blocks()
        for offset, block in new_blocks:
            self.file.write_meta(offset, block.to_bytes())
        self.file.write_meta(table_offset, be64_bytes(new_table))
        self._sync()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self._set_reftable(table_offset, clusters)
        self.table = new_table
        self.table_offset, self.table_clusters = table_offset, clusters
        self.table_dirty = False
        for offset, block in new_blocks:
            block.dirty = False
            self._cache[offset] = block
        self.free(old_offset, old_clusters * self.cluster_size)

    # -- writing -------------------------------------------------------------------------------------------

    def write_dirty_blocks(self) -> bool:
        """Write every dirty block; True when anything was written (the caller syncs)."""
        wrote = False
        for offset, block in self._cache.items():
            if block.dirty:
                self.file.write_meta(offset, block.to_bytes())
                block.dirty = False
                wrote = True
        return wrote

    def write_table(self) -> bool:
        if not self.table_dirty:
            return False
        self.file.write_meta(self.table_offset, be64_bytes(self.table))
        self.table_dirty = False
        return True

    @property
    def dirty(self) -> bool:
        return self.table_dirty or any(b.dirty for b in self._cache.values())

    def _evict(self) -> None:
        while len(self._cache) > self._cache_limit:
            offset, block = next(iter(self._cache.items()))
            if block.dirty:
                return  # dirty blocks stay until the next flush writes them
            del self._cache[offset]

    def over_limit(self) -> bool:
        return len(self._cache) > self._cache_limit

    def drop_cache(self) -> None:
        self._cache = OrderedDict((o, b) for o, b in self._cache.items() if b.dirty)


def array_from_be64(data: bytes) -> array.array:
    """Big-endian u64 entries as a native array."""
    table = array.array("Q")
    table.frombytes(data[:len(data) - len(data) % 8])
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def be64_bytes(entries: Sequence[int] | Iterable[int]) -> bytes:
    table = array.array("Q", entries)
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table.tobytes()
