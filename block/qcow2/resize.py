"""Whole-image changes that rewrite the header: growing the L1 table, resizing the virtual disk, and
``amend`` (compat level, lazy refcounts).

Each follows the same rule as the rest of the driver: new structures are written and synced before the
header points at them, old ones are freed afterwards. Callers hold the metadata lock and the exclusive gate.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from typing import TYPE_CHECKING

from pyemu.block.errors import BlockError
from pyemu.block.qcow2.layout import (FLAG_COMPRESSED, FLAG_COPIED, FLAG_ZERO, MAX_L1_BYTES, MAX_VIRTUAL_SIZE,
                                      OFFSET_MASK, Compatible, Incompatible)
from pyemu.block.qcow2.refcount import be64_bytes

if TYPE_CHECKING:
    from pyemu.block.qcow2.driver import Qcow2Format


class ImageOperationError(BlockError):
    """A resize or amend the image cannot do (with QEMU's reasons)."""

    def __init__(self, message: str, *, errno: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


def grow_l1(image: "Qcow2Format", entries: int) -> None:
    """Move the active L1 table to a new place with room for ``entries`` entries."""
    if entries * 8 > MAX_L1_BYTES:
        raise ImageOperationError("Active L1 table too large", errno=errno.EFBIG)
    old_offset, old_size = image.header.l1_table_offset, image.header.l1_size
    image.quiesce_metadata()
    new_l1 = list(image.map.l1) + [0] * (entries - len(image.map.l1))
    cs = image.cluster_size
    new_offset = image.refcounts.alloc(-(-entries * 8 // cs))
    image.write_meta(new_offset, be64_bytes(new_l1))
    image.quiesce_metadata()  # the table and the refcounts saying it is used, before the header points at it
    image.write_header_fields(l1_size=entries, l1_table_offset=new_offset)
    image.map.l1 = new_l1
    image.map.l1_offset = new_offset
    if old_size:
        image.refcounts.free(old_offset, old_size * 8)
    image.quiesce_metadata()


def resize_image(image: "Qcow2Format", size: int, *, shrink: bool) -> None:
    old = image.header.size
    if size % 512:
        raise ImageOperationError("The new size must be a multiple of 512")
    if size < 0 or size > MAX_VIRTUAL_SIZE:
        raise ImageOperationError(f"Invalid image size {size}", errno=errno.EFBIG)
    if size == old:
        return
    if size < old:
        if not shrink:
            raise ImageOperationError("Use the --shrink option to perform a shrink operation.")
        if image.snapshot_table:
            raise ImageOperationError("Can't shrink an image with internal snapshots", errno=errno.ENOTSUP)
        _drop_clusters_beyond(image, size)
        image.write_header_fields(size=size)
        image.quiesce_metadata()
        _trim_file(image)
        return
    needed = image.geometry.l1_entries_for(size)
    if needed > len(image.map.l1):
        grow_l1(image, needed)
    cs = image.cluster_size
    if old % cs:
        # The old last cluster's bytes past the old end may hold stale data; the grown disk must read zeros.
        tail_end = min(size, -(-old // cs) * cs)
        vcluster = old >> image.cluster_bits
        word, bitmap = image.map.checked_entry(vcluster)
        if word & OFFSET_MASK and not word & FLAG_COMPRESSED and not word & FLAG_ZERO:
            host = word & OFFSET_MASK
            image.write_meta(host + old % cs, bytes(tail_end - old))
        elif word & FLAG_COMPRESSED:
            data = bytearray(image._old_bytes(vcluster, word, bitmap, 0, cs))
            data[old % cs:] = bytes(cs - old % cs)
            host = image.refcounts.alloc(1)
            image.write_meta(host, bytes(data))
            image.map.set_entry(vcluster, host | FLAG_COPIED, 0xFFFFFFFF if image.geometry.extended_l2 else 0)
            image._release_old(word)
    image.quiesce_metadata()
    image.write_header_fields(size=size)


def _drop_clusters_beyond(image: "Qcow2Format", size: int) -> None:
    cs = image.cluster_size
    first = -(-size // cs)
    per_l2 = 1 << image.geometry.l2_bits
    for l1_index, entry in enumerate(image.map.l1):
        l2_offset = entry & OFFSET_MASK
        if not l2_offset or (l1_index + 1) * per_l2 <= first:
            continue
        table = image.map.writable_l2(l1_index)
        step = 2 if image.geometry.extended_l2 else 1
        for i in range(per_l2):
            vcluster = l1_index * per_l2 + i
            if vcluster < first:
                continue
            word = table.words[i * step]
            image._release_old(word)
            table.words[i * step] = 0
            if step == 2:
                table.words[i * step + 1] = 0
            table.dirty = True
        if l1_index * per_l2 >= first:  # the whole table is beyond the end: drop it
            image.map.l1[l1_index] = 0
            image.map.l1_dirty = True
            image.refcounts.free(table.offset, cs)
            image.map.forget(table.offset)


def _trim_file(image: "Qcow2Format") -> None:
    """Cut the file after its last used cluster (what a shrink gives back to the host)."""
    cs = image.cluster_size
    last = -(-image.file.size() // cs) - 1
    while last > 0 and image.refcounts.get(last) == 0:
        last -= 1
    end = (last + 1) * cs
    if end < image.file.size() and hasattr(image.file, "truncate"):
        image.file.truncate(end)


def amend_image(image: "Qcow2Format", *, compat: str | None, lazy_refcounts: bool | None) -> None:
    header = image.header
    version = header.version
    if compat is not None:
        if compat in ("0.10", "v2"):
            version = 2
        elif compat in ("1.1", "v3"):
            version = 3
        else:
            raise ImageOperationError(f"Invalid compatibility level: '{compat}'")
    lazy = header.lazy_refcounts if lazy_refcounts is None else lazy_refcounts
    if lazy and version < 3:
        raise ImageOperationError("Lazy refcounts only supported with compatibility level 1.1 and above "
                                  "(use compat=1.1 or greater)")
    image.quiesce_metadata()
    if version < header.version:
        if header.extended_l2:
            raise ImageOperationError("Cannot downgrade an image with extended L2 entries", errno=errno.ENOTSUP)
        if header.refcount_order != 4:
            raise ImageOperationError("compat=0.10 requires refcount_bits=16", errno=errno.ENOTSUP)
        if image.bitmap_store.has_persistent():
            # v2 has no autoclear bits: its bitmaps would be stale for every reader and their clusters leak
            # (qemu-img 7.2 downgrades anyway and leaves exactly that); refuse and keep the image intact.
            raise ImageOperationError("Cannot downgrade an image with persistent bitmaps (remove them with "
                                      "'bitmap --remove' first)", errno=errno.ENOTSUP)
        _expand_zero_clusters(image)
    compatible = (header.compatible_features | Compatible.LAZY_REFCOUNTS) if lazy else \
        (header.compatible_features & ~Compatible.LAZY_REFCOUNTS)
    new = replace(header, version=version, compatible_features=int(compatible) if version == 3 else 0,
                  incompatible_features=header.incompatible_features & ~Incompatible.DIRTY if version == 3 else 0,
                  autoclear_features=header.autoclear_features if version == 3 else 0,
                  refcount_order=header.refcount_order)
    image.quiesce_metadata()
    image._update_header(new)
    image._sync()


def _expand_zero_clusters(image: "Qcow2Format") -> None:
    """Before a downgrade to v2 (no zero flag): zero clusters become unallocated (no backing file) or
    allocated clusters of zeros."""
    for snap in image.snapshot_table:
        del snap
        raise ImageOperationError("Cannot downgrade an image with internal snapshots", errno=errno.ENOTSUP)
    cs = image.cluster_size
    per_l2 = 1 << image.geometry.l2_bits
    for l1_index, entry in enumerate(image.map.l1):
        if not entry & OFFSET_MASK:
            continue
        table = image.map.load_l2(entry & OFFSET_MASK, what=f"L1 index {l1_index:#x}")
        for i, word in enumerate(table.words):
            if word & FLAG_COMPRESSED or not word & FLAG_ZERO:
                continue
            vcluster = l1_index * per_l2 + i
            host = word & OFFSET_MASK
            if image.header.backing_file is None:
                image.map.set_entry(vcluster, 0)
                image._release_old(word)
                continue
            if not host or not word & FLAG_COPIED:
                image._release_old(word)
                host = image.refcounts.alloc(1)
            image.write_meta(host, bytes(cs))
            image.map.set_entry(vcluster, host | FLAG_COPIED)
    image.quiesce_metadata()
