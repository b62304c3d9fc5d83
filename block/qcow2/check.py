"""Consistency check and repair: recount every reference and compare with the stored refcounts.

The walk visits what the image's structure says is in use -- the header cluster, the active L1 table and
every snapshot's, the L2 tables and data clusters they reach (each L1 tree counts once, which is how qcow2
counts sharing), compressed streams (every host cluster they touch), the refcount table and blocks, the
snapshot table -- and counts references per host cluster. A stored refcount above the count is a leak
(wasted space, harmless), below it a corruption (a cluster could be reused while in use). Table entries
that are unaligned or point past the end of the file are corruptions too. The messages and counters follow
qemu-img's so the two tools agree on the same damaged image; ``repair="leaks"`` lowers leaked refcounts,
``repair="all"`` also raises refcounts that are too low (creating missing refcount blocks past the end of
the image) and fixes COPIED flags.

Memory stays proportional to the clusters actually referenced (a dict), not to the virtual size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyemu.block.errors import BlockIOError
from pyemu.block.qcow2.layout import FLAG_COMPRESSED, FLAG_COPIED, L1_RESERVED, OFFSET_MASK, REFTABLE_OFFSET_MASK
from pyemu.block.qcow2.mapping import entry_problem
from pyemu.block.qcow2.refcount import array_from_be64

if TYPE_CHECKING:
    from pyemu.block.qcow2.driver import Qcow2Format


@dataclass
class CheckResult:
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)


class _Walker:
    def __init__(self, image: "Qcow2Format", result: CheckResult, repair: str | None) -> None:
        self.image = image
        self.result = result
        self.repair = repair
        self.cs = image.cluster_size
        self.bits = image.cluster_bits
        self.file_size = image.file.size()
        self.nb_clusters = -(-self.file_size // self.cs)
        self.refs: dict[int, int] = {}
        self.copied_fixes: list[tuple[int, int]] = []
        """(L2 table offset, word index) of every active data entry, for the COPIED check."""
        self.needs_rebuild = False

    def corrupt(self, message: str) -> None:
        self.result.messages.append(message)
        self.result.corruptions += 1

    def inc(self, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        if last >= self.nb_clusters:
            self.corrupt(f"ERROR: counting reference for region exceeding the end of the file by one cluster or "
                         f"more: offset {offset:#x} size {length:#x}")
            last = self.nb_clusters - 1
            if first > last:
                return False
        for cluster in range(first, last + 1):
            self.refs[cluster] = self.refs.get(cluster, 0) + 1
        return True

    def walk_l1(self, l1_offset: int, l1: list[int], *, active: bool, what: str) -> None:
        self.inc(l1_offset, len(l1) * 8)
        image = self.image
        geometry = image.geometry
        step = 2 if geometry.extended_l2 else 1
        for i, entry in enumerate(l1):
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            if entry & L1_RESERVED:
                self.corrupt(f"ERROR: {what} L1 entry {i} has reserved bits set: {entry:#x}")
            if l2_offset % self.cs:
                self.corrupt(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
                continue
            if l2_offset >= self.file_size:
                self.corrupt(f"ERROR l2_offset={l2_offset:x}: L2 table is outside the image file")
                continue
            if not self.inc(l2_offset, self.cs):
                continue
            try:
                table = image.map.load_l2(l2_offset, what=f"{what} L1 index {i:#x}")
            except BlockIOError as exc:
                self.result.check_errors += 1
                self.result.messages.append(f"ERROR: I/O error in check_refcounts_l2: {exc}")
                continue
            words = table.words
            prev_host = -1  # contiguity is judged within one L2 table, as qemu-img does
            for j in range(0, len(words), step):
                word = words[j]
                bitmap = words[j + 1] if step == 2 else 0
                if word & FLAG_COMPRESSED:
                    offset, length = geometry.compressed_range(word)
                    if word & FLAG_COPIED:
                        self.corrupt(f"ERROR: coffset={offset:#x}: copied flag must never be set for "
                                     "compressed clusters")
                    if active:
                        # Compressed clusters count as fragmented: they never sit at cluster boundaries.
                        self.result.compressed_clusters += 1
                        self.result.allocated_clusters += 1
                        self.result.fragmented_clusters += 1
                    self.inc(offset & ~511, length + (offset & 511))
                    continue
                problem = entry_problem(geometry, word, bitmap)
                host = word & OFFSET_MASK
                if problem and host % self.cs:
                    self.corrupt(f"ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted.")
                    continue
                if problem:
                    self.corrupt(f"ERROR: invalid cluster entry {word:#x}: {problem}")
                if not host:
                    continue
                if active:
                    self.result.allocated_clusters += 1
                    if prev_host >= 0 and host != prev_host + self.cs:
                        self.result.fragmented_clusters += 1
                    prev_host = host
                self.inc(host, self.cs)
                if active:
                    self.copied_fixes.append((l2_offset, j))

    def run(self) -> None:
        image = self.image
        h = image.header
        self.inc(0, self.cs)
        self.walk_l1(h.l1_table_offset, image.map.l1, active=True, what="active")
        for snap in image.snapshot_table:
            try:
                l1 = list(array_from_be64(image.read_meta(snap.l1_table_offset, snap.l1_size * 8)))
            except BlockIOError as exc:
                self.result.check_errors += 1
                self.result.messages.append(f"ERROR: cannot read snapshot '{snap.name}' L1 table: {exc}")
                continue
            self.walk_l1(snap.l1_table_offset, l1, active=False, what=f"snapshot '{snap.name}'")
        if h.nb_snapshots:
            self.inc(h.snapshots_offset, max(image.snapshot_table_bytes, 1))
        self.inc(image.refcounts.table_offset, image.refcounts.table_clusters * self.cs)
        store = getattr(image, "bitmap_store", None)
        if store is not None:  # persistent bitmaps: directory, tables and data clusters are in use
            store.count_references(self.inc)
        for i, entry in enumerate(image.refcounts.table):
            block = entry & REFTABLE_OFFSET_MASK
            if not block:
                continue
            if block % self.cs:
                self.corrupt(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                continue
            if block >= self.file_size:
                self.corrupt(f"ERROR refcount block {i} is outside image")
                continue
            self.inc(block, self.cs)


def _compare(walker: _Walker) -> None:
    image = walker.image
    result = walker.result
    refcounts = image.refcounts
    highest = max(walker.refs, default=0)
    limit = max(walker.nb_clusters, highest + 1)
    fix_leaks = walker.repair in ("leaks", "all")
    fix_errors = walker.repair == "all"
    if fix_leaks and not fix_errors and any(c < limit and walker.refs[c] and not refcounts.get(c)
                                            for c in walker.refs):
        # A referenced cluster counted as free: only a full repair (rebuilding refcounts) can fix that.
        fix_leaks = False
        walker.needs_rebuild = True
    for cluster in range(limit):
        try:
            stored = refcounts.get(cluster)
        except BlockIOError as exc:
            result.check_errors += 1
            result.messages.append(f"ERROR: cannot get refcount of cluster {cluster}: {exc}")
            continue
        counted = walker.refs.get(cluster, 0)
        if stored == counted:
            continue
        if stored > counted and fix_leaks or stored < counted and fix_errors:
            counted_fit = min(counted, refcounts.max)
            result.messages.append(f"Repairing cluster {cluster} refcount={stored} reference={counted}")
            _set_refcount(image, cluster, counted_fit, walker)
            if stored > counted:
                result.leaks_fixed += 1
            else:
                result.corruptions_fixed += 1
            continue
        kind = "ERROR" if stored < counted else "Leaked"
        result.messages.append(f"{kind} cluster {cluster} refcount={stored} reference={counted}")
        if stored < counted:
            result.corruptions += 1
        else:
            result.leaks += 1
    result.image_end_offset = (highest + 1) * walker.cs if walker.refs else 0
    if walker.needs_rebuild:
        result.messages.append("ERROR need to rebuild refcount structures")
        result.check_errors += 1


def _set_refcount(image: "Qcow2Format", cluster: int, value: int, walker: _Walker) -> None:
    refcounts = image.refcounts
    index = cluster >> refcounts.block_bits
    if index < len(refcounts.table) and refcounts.table[index] & REFTABLE_OFFSET_MASK:
        refcounts.set(cluster, value)
        return
    # The range has no refcount block but something in it is in use: place the new block past everything
    # referenced and past the end of the file, where it cannot overwrite anything.
    end_cluster = max(walker.nb_clusters, max(walker.refs, default=0) + 1)
    refcounts.place_block(index, at_cluster=end_cluster)
    walker.refs[end_cluster] = walker.refs.get(end_cluster, 0) + 1
    walker.nb_clusters = end_cluster + 1
    refcounts.set(cluster, value)


def _check_copied(walker: _Walker) -> None:
    """COPIED must be set exactly where the refcount is 1 (active tree only)."""
    image = walker.image
    result = walker.result
    fix = walker.repair == "all"
    refcounts = image.refcounts
    for i, entry in enumerate(image.map.l1):
        l2_offset = entry & OFFSET_MASK
        if not l2_offset or l2_offset % walker.cs or l2_offset >= walker.file_size:
            continue
        refcount = refcounts.get(l2_offset >> walker.bits)
        if (refcount == 1) != bool(entry & FLAG_COPIED):
            verb = "Repairing" if fix else "ERROR"
            result.messages.append(f"{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={entry:x} "
                                   f"refcount={refcount}")
            if fix:
                image.map.l1[i] = l2_offset | (FLAG_COPIED if refcount == 1 else 0)
                image.map.l1_dirty = True
                result.corruptions_fixed += 1
            else:
                result.corruptions += 1
    for l2_offset, j in walker.copied_fixes:
        table = image.map.load_l2(l2_offset, what="check")
        word = table.words[j]
        host = word & OFFSET_MASK
        refcount = refcounts.get(host >> walker.bits)
        if (refcount == 1) != bool(word & FLAG_COPIED):
            verb = "Repairing" if fix else "ERROR"
            result.messages.append(f"{verb} OFLAG_COPIED data cluster: l2_entry={word:x} refcount={refcount}")
            if fix:
                table.words[j] = word | FLAG_COPIED if refcount == 1 else word & ~FLAG_COPIED
                table.dirty = True
                result.corruptions_fixed += 1
            else:
                result.corruptions += 1


def check_image(image: "Qcow2Format", *, repair: str | None = None) -> CheckResult:
    """One check pass (callers wanting qemu-img's "double check" run it again without repair)."""
    if repair not in (None, "leaks", "all"):
        raise ValueError(f"unknown repair mode {repair!r}")
    result = CheckResult()
    size = image.header.size
    result.total_clusters = -(-size // image.cluster_size)
    walker = _Walker(image, result, repair)
    walker.run()
    _compare(walker)
    _check_copied(walker)
    if repair is not None and not image.read_only:
        image.quiesce_metadata()
    return result
