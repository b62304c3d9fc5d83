"""The ``copy-before-write`` filter: keep a point-in-time view of a disk the guest goes on writing.

Put above the guest's disk (``file``), the filter copies the *old* contents of every cluster a guest write,
write-zeroes or discard is about to change into ``target`` first (through a shared
:class:`~pyemu.block.block_copy.BlockCopy`, so each cluster is copied once, and only those of the optional
``bitmap``). The view at the moment the filter was inserted is then: copied clusters from the target, all
others from the disk itself. A ``snapshot-access`` node (:mod:`pyemu.block.snapshot_access`) serves that
view to a reader (an NBD export for a backup tool): this is QEMU's fleecing scheme (QEMU commit af5bcd775f).

Synchronisation, as QEMU's filter: a snapshot read of a region not yet copied reads the disk while holding
the region *frozen*; a guest write to it copies first (which only reads the disk), then waits until no
frozen read overlaps it, then writes. A snapshot read never waits for a guest write, and a guest write waits
only for copies or frozen reads of its own region.

Errors: ``on-cbw-error=break-guest-write`` (default) fails the guest's write when its copy fails;
``break-snapshot`` lets the write go on and breaks the snapshot instead (every later snapshot read fails
with EACCES and the filter stops copying). ``cbw-timeout`` (seconds, 0 = none) makes a copy that takes too
long count as failed.

The reader tells the filter it is done with a region by a discard through snapshot-access: the region is
no longer readable (EACCES), no longer copied on guest writes, and discarded on the target.
"""

from __future__ import annotations

import errno
import threading
from typing import Any, Sequence

from pyemu.block import graph
from pyemu.block.block_copy import BlockCopy, BlockCopyError
from pyemu.block.blockdev import BlockdevError, DriverSpec, OpenContext, Opt, register_driver
from pyemu.block.borrowed import BorrowedNode
from pyemu.block.dirty_bitmap import DirtyBitmap, existing_bitmaps
from pyemu.block.driver import BlockDriver, BlockStatus, check_request
from pyemu.block.filter_node import FilterOverFile
from pyemu.block.errors import BlockConfigError, BlockIOError
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.locking import PERM_ALL, BlockPerm

ON_CBW_ERROR = ("break-guest-write", "break-snapshot")
MAX_CBW_TIMEOUT = (1 << 32) - 1  # QEMU's uint32 seconds

FILE_PERM = BlockPerm.CONSISTENT_READ | BlockPerm.WRITE
FILE_SHARED = BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED
"""On the disk: the filter is the writer's path (reads, writes) and lets nobody else write or resize it
behind its back -- a write that bypasses the filter would change the snapshot without a copy."""
TARGET_PERM = BlockPerm.WRITE
TARGET_SHARED = PERM_ALL & ~BlockPerm.RESIZE
"""On the target: writes; others may use it (a backing chain onto the disk) but not resize it."""


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def _unwrap(node: object) -> object:
    return node.node if isinstance(node, BorrowedNode) else node


class CopyBeforeWrite(FilterOverFile):
    """The filter over ``file`` with copies going to ``target`` (see the module doc)."""

    name = "copy-before-write"

    def __init__(self, file: BlockDriver, target: BlockDriver, *, bitmap: DirtyBitmap | None = None,
                 on_cbw_error: str = "break-guest-write", cbw_timeout: int = 0,
                 block_copy: BlockCopy | None = None, owns_children: bool = True, user: str = "") -> None:
        if on_cbw_error not in ON_CBW_ERROR:
            raise BlockConfigError(f"Parameter 'on-cbw-error' does not accept value '{on_cbw_error}'", option=None)
        if type(cbw_timeout) is not int or not 0 <= cbw_timeout <= MAX_CBW_TIMEOUT:  # noqa: E721
            raise BlockConfigError("Parameter 'cbw-timeout' expects uint32_t", option=None)
        if block_copy is None:
            block_copy = BlockCopy(file, target, bitmap=bitmap)
        elif block_copy.size != file.size():
            raise BlockConfigError("Source and target image have different sizes", option=None)
        self.file = file
        self.target = target
        self.block_copy = block_copy
        self.on_cbw_error = on_cbw_error
        self.cbw_timeout = cbw_timeout
        self.owns_children = owns_children
        self.snapshot_broken = False
        self.snapshot_error: BlockIOError | None = None
        cluster = block_copy.cluster_size
        size = file.size()
        self._size = size
        # What the reader may read (shrinks with its discards), and what the filter copied itself.
        self._access = DirtyBitmap("cbw-access", size, cluster, enabled=False)
        for start, length in block_copy.to_copy_extents():
            self._access.set_range(start, length)
        self._done = DirtyBitmap("cbw-done", size, cluster, enabled=False)
        self._lock = threading.Condition()
        self._frozen: list[tuple[int, int]] = []
        self._closed = False
        who = user or "a copy-before-write node"
        self._attachments = [graph.attach(file, user=who, role="file", perm=FILE_PERM, shared=FILE_SHARED)]
        try:
            self._attachments.append(graph.attach(target, user=who, role="target", perm=TARGET_PERM,
                                                  shared=TARGET_SHARED))
        except BaseException:
            self._attachments[0].detach()
            raise

    # -- node properties (filtered_child, filename, read_only, capabilities: FilterOverFile) --------------
    def size(self) -> int:
        return self._size

    # -- the guest's path ------------------------------------------------------------------------------
    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.file.preadv(offset, buffers)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return self.file.block_status(offset, length)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        views = byte_views(buffers, writable=False)
        length = total_length(views)
        check_request(offset, length, self._size, what="write")
        self._copy_before_write(offset, length)
        self.file.pwritev(offset, views)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        check_request(offset, length, self._size, what="write-zeroes")
        self._copy_before_write(offset, length)
        self.file.write_zeroes(offset, length, may_unmap=may_unmap)

    def discard(self, offset: int, length: int) -> None:
        check_request(offset, length, self._size, what="discard")
        self._copy_before_write(offset, length)
        self.file.discard(offset, length)

    def flush(self) -> None:
        self.file.flush()
        self.target.flush()

    def _copy_before_write(self, offset: int, length: int) -> None:
        """Copy the old data of the clusters the request touches; then wait for frozen snapshot reads of
        them. Raises the copy's error with break-guest-write."""
        if self.snapshot_broken or length == 0:
            return
        cluster = self.block_copy.cluster_size
        start = offset - offset % cluster
        end = min(self._size, -(-(offset + length) // cluster) * cluster)
        try:
            self.block_copy.copy(start, end - start, timeout=self.cbw_timeout or None)
        except BlockCopyError as exc:
            if self.on_cbw_error == "break-guest-write":
                raise
            with self._lock:
                if not self.snapshot_broken:
                    self.snapshot_broken, self.snapshot_error = True, exc
                self._wait_frozen(start, end)
            return
        with self._lock:
            self._done.set_range(start, end - start)
            self._wait_frozen(start, end)

    def _wait_frozen(self, start: int, end: int) -> None:
        while any(_overlaps(start, end, a, b) for a, b in self._frozen):
            self._lock.wait()

    # -- the snapshot interface (used by snapshot-access) ---------------------------------------------
    def _refused(self, offset: int, length: int) -> BlockIOError:
        why = "the snapshot is broken" if self.snapshot_broken else "the region is outside the snapshot"
        return BlockIOError(f"snapshot read at offset {offset} length {length} refused: {why}",
                            errno=errno.EACCES, offset=offset, length=length)

    def _snapshot_lock(self, offset: int, length: int) -> tuple[BlockDriver, int, tuple[int, int] | None]:
        """Which child serves the first part of the range, how much of it, and the frozen region (None
        when reading the target, which guest writes never touch)."""
        with self._lock:
            if self.snapshot_broken or self._closed:
                raise self._refused(offset, length)
            clean, clean_len = self._access.extent_at(offset, length)
            if not clean or clean_len < length:
                raise self._refused(offset, length)
            done, run = self._done.extent_at(offset, length)
            if done:
                return self.target, run, None
            region = (offset, offset + run)
            self._frozen.append(region)
            return self.file, run, region

    def _snapshot_unlock(self, region: tuple[int, int] | None) -> None:
        if region is not None:
            with self._lock:
                self._frozen.remove(region)
                self._lock.notify_all()

    def snapshot_preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Read the point-in-time view. Regions outside the access bitmap (or after a break) fail EACCES."""
        views = byte_views(buffers, writable=True)
        length = total_length(views)
        check_request(offset, length, self._size, what="read")
        flat = views[0] if len(views) == 1 else memoryview(bytearray(length))
        pos = 0
        while pos < length:
            child, run, region = self._snapshot_lock(offset + pos, length - pos)
            try:
                child.preadv(offset + pos, [flat[pos:pos + run]])
            finally:
                self._snapshot_unlock(region)
            pos += run
        if flat is not views[0]:
            pos = 0
            for view in views:
                view[:] = flat[pos:pos + view.nbytes]
                pos += view.nbytes

    def snapshot_block_status(self, offset: int, length: int) -> BlockStatus:
        """Allocation of the view's first extent: a copied region is data in the target (always reported
        allocated), the rest is what the disk says."""
        check_request(offset, length, self._size, what="block-status", nonempty=True)
        child, run, region = self._snapshot_lock(offset, length)
        try:
            status = child.block_status(offset, run)
        finally:
            self._snapshot_unlock(region)
        if child is self.target:
            return BlockStatus(offset, min(run, status.length), allocated=True, zero=status.zero)
        return BlockStatus(offset, min(run, status.length), allocated=status.allocated, zero=status.zero)

    def snapshot_discard(self, offset: int, length: int) -> None:
        """The reader is done with the whole clusters of the range: they become unreadable, guest writes
        there stop copying, and the target drops them."""
        check_request(offset, length, self._size, what="discard")
        cluster = self.block_copy.cluster_size
        start = -(-offset // cluster) * cluster
        end = offset + length
        end = end if end == self._size else end - end % cluster
        if end <= start:
            return
        with self._lock:
            self._access.reset_range(start, end - start)
        self.block_copy.reset(start, end - start)
        if self.target.capabilities.discard:
            self.target.discard(start, end - start)

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for copies that outlived their timeout, drop the permissions, and close the children when
        the filter owns them. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.block_copy.drain()
        for attachment in self._attachments:
            attachment.detach()
        if self.owns_children:
            self.file.close()
            self.target.close()


# -- -blockdev / blockdev-add ------------------------------------------------------------------------------
def _lookup_bitmap(ctx: OpenContext, spec: dict[str, Any]) -> DirtyBitmap:
    """QEMU's block_dirty_bitmap_lookup for the ``bitmap`` member (node-name + bitmap name)."""
    from pyemu.block.registry import NodeRegistryError

    try:
        node = ctx.registry.lookup(spec["node"])
    except NodeRegistryError:
        raise BlockdevError(f"Node '{spec['node']}' not found") from None
    bitmaps = existing_bitmaps(_unwrap(node))
    bitmap = bitmaps.get(spec["name"]) if bitmaps is not None else None
    if bitmap is None:
        raise BlockdevError(f"Dirty bitmap '{spec['name']}' not found")
    return bitmap


def _open_cbw(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    file, target = ctx.child("file"), ctx.child("target")
    bitmap = _lookup_bitmap(ctx, options["bitmap"]) if "bitmap" in options else None
    timeout = options.get("cbw-timeout", 0)
    if timeout > MAX_CBW_TIMEOUT:
        raise BlockdevError("Parameter 'cbw-timeout' expects uint32_t")
    try:
        return CopyBeforeWrite(file, target, bitmap=bitmap,
                               on_cbw_error=options.get("on-cbw-error", "break-guest-write"),
                               cbw_timeout=timeout, user=f"node '{ctx.name}'")
    except BlockConfigError as exc:
        raise BlockdevError(f"Cannot create block-copy-state: {exc}") from None


register_driver(DriverSpec("copy-before-write", (
    Opt("file", "ref", required=True), Opt("target", "ref", required=True),
    Opt("bitmap", "object", members=(Opt("node", "str", required=True), Opt("name", "str", required=True))),
    Opt("on-cbw-error", "enum", values=ON_CBW_ERROR), Opt("cbw-timeout", "int")),
    _open_cbw, "copies old data to a target before guest writes (fleecing)"))
