"""A flat guest-cluster -> host-offset table of a qcow2 image's plain data clusters, for readers in C.

Why: virtio-blk's C data plane (hw/virtio/blk_plane.c) serves reads of a raw image without Python, but a
qcow2 disk's reads took the device's Python path: ~150 µs more per 1 MiB guest read than the plane before
the host read began (perf trace, 2026-12-07), and the guest's sequential read of a qcow2 disk was 0.84 of
QEMU's. With this table the plane maps a read itself: every cluster it covers must have an entry here, and
anything else -- a cluster that is unallocated (backing file), zero, compressed, not looked up yet, or an
image with subclusters -- leaves the request to Python, which owns every rule and error of the format.

What an entry means: 0 (Python serves the cluster); :data:`ZEROES` for a cluster that reads as zeros (the
zero flag, or unallocated in an image without a backing file, or no L2 table there at all); else the host
offset of a cluster whose standard L2 entry is plain data (no zero or compressed flag, no reserved bits),
cluster-aligned, past the header and inside the file when it was published. The table is *derived* from the
cluster map and never the other way round:

* the active L2 tables publish their entries when :class:`~pyemu.block.qcow2.mapping.ClusterMap` first
  hands them out (a loaded table, or one already cached), under the image's metadata lock;
* every entry the map sets is published again at once (an allocating or copy-on-write write has put its
  data in the file before it sets the entry; a discard or zero write clears it before the old cluster can
  be freed);
* a tree-wide change (snapshot create/apply/delete, resize, repair, reopen, bitmaps, close) holds the
  image's I/O gate exclusively -- which also waits for a C reader between its pass-through's begin and
  end -- and clears the table when it ends, and nothing is published while it runs;
* damage found in the image clears it for good.

Memory: one 64-bit word per guest cluster in an anonymous mapping, touched only where a table was published
(a 1 TiB disk with 64 KiB clusters reserves 128 MiB of address space). Larger disks get no table.
"""

from __future__ import annotations

import array
import mmap

from pyemu.block.qcow2.layout import FLAG_COMPRESSED, FLAG_ZERO, L2_RESERVED, OFFSET_MASK

MAX_CLUSTERS = 1 << 24
"""Guest clusters a table covers at most (128 MiB of address space); a larger disk has none."""
ZEROES = 1
"""The entry of a cluster that reads as zeros (never a host offset: those are cluster-aligned and past the
header)."""


class ReadMap:
    """One image's table (see the module docstring). Changed under the image's metadata lock or with its
    I/O gate held exclusively; read by C at any time, one aligned 64-bit word at a time."""

    def __init__(self, clusters: int, cluster_bits: int, *, zero_unallocated: bool) -> None:
        if not 0 < clusters <= MAX_CLUSTERS:
            raise ValueError(f"{clusters} guest clusters: outside what a read map covers")
        self.clusters = clusters
        self.cluster_bits = cluster_bits
        self.zero_unallocated = zero_unallocated
        """Unallocated clusters read as zeros (the image had no backing file when the map was made)."""
        self._area = mmap.mmap(-1, clusters * 8, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._words = memoryview(self._area).cast("Q")
        self._published: set[int] = set()
        self._suspended = 0
        self._retired = False
        self.address = _buffer_address(self._area)
        """Where the table's first word is, for C."""

    @property
    def usable(self) -> bool:
        """Whether readers may use the table now (not retired, no tree-wide change running)."""
        return not self._retired and not self._suspended

    @property
    def retired(self) -> bool:
        return self._retired

    def published(self, l1_index: int) -> bool:
        return l1_index in self._published

    def publish_table(self, l1_index: int, words: object, l2_bits: int, file_size: int) -> None:
        """The entries of the active L2 table at ``l1_index`` (native words, standard entries)."""
        span = self._claim(l1_index, l2_bits)
        if span is None:
            return
        first, count = span
        cluster_size, zeroes = 1 << self.cluster_bits, self.zero_unallocated
        table = self._words
        for index, word in enumerate(words[:count]):  # type: ignore[index]
            table[first + index] = _entry(word, cluster_size, file_size, zeroes)

    def publish_no_table(self, l1_index: int, l2_bits: int) -> None:
        """The clusters of an L1 entry with no L2 table: unallocated, so zeros without a backing file."""
        span = self._claim(l1_index, l2_bits)
        if span is not None:
            first, count = span
            self._words[first:first + count] = _fill(ZEROES if self.zero_unallocated else 0, count)

    def _claim(self, l1_index: int, l2_bits: int) -> tuple[int, int] | None:
        """The first guest cluster and the count the L1 entry ``l1_index`` maps in this table, marked
        published; None when it is published already, maps nothing here, or nothing may be published."""
        if not self.usable or l1_index in self._published:
            return None
        first = l1_index << l2_bits
        count = min(1 << l2_bits, self.clusters - first)
        if count <= 0:
            return None
        self._published.add(l1_index)
        return first, count

    def publish(self, first: int, words: list[int], file_size: int) -> None:
        """The new entries of guest clusters ``first, first + 1, ...`` (standard entries)."""
        cluster_size, zeroes = 1 << self.cluster_bits, self.zero_unallocated
        table = self._words
        live = self.usable
        for vcluster, word in enumerate(words, first):
            if vcluster >= self.clusters:
                break
            table[vcluster] = _entry(word, cluster_size, file_size, zeroes) if live else 0

    def suspend(self) -> None:
        """A tree-wide change begins (its exclusive gate held): forget everything, publish nothing."""
        self._suspended += 1
        self.clear()

    def resume(self) -> None:
        """The change is over: start again from nothing (tables publish at their next use)."""
        self._suspended -= 1
        self.clear()

    def retire(self) -> None:
        """Damage was found, or the image closes: no reader uses the table again."""
        self._retired = True
        self.clear()

    def clear(self) -> None:
        self._published.clear()
        self._area.madvise(mmap.MADV_DONTNEED)  # a private anonymous mapping reads as zeros again

    def host_of(self, vcluster: int) -> int:
        """The entry of one guest cluster (tests, diagnostics)."""
        return int(self._words[vcluster])


def _entry(word: int, cluster_size: int, file_size: int, zero_unallocated: bool) -> int:
    """A reader's entry for a standard L2 entry, as the driver's ``decode`` reads it: a checked host offset,
    :data:`ZEROES`, or 0 (compressed, reserved bits, an offset the driver would call corrupt, or left to the
    backing file)."""
    if word & (FLAG_COMPRESSED | (L2_RESERVED & ~FLAG_ZERO)):
        return 0
    host = word & OFFSET_MASK
    if word & FLAG_ZERO:
        return ZEROES if not host % cluster_size else 0
    if not host:
        return ZEROES if zero_unallocated else 0
    if host < cluster_size or host % cluster_size or host >= file_size:
        return 0
    return host


def _fill(value: int, count: int) -> memoryview:
    return memoryview(array.array("Q", [value]) * count)


def _buffer_address(area: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(area))
