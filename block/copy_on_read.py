"""The ``copy-on-read`` filter: data read from the backing chain is written into the top image.

Put above a qcow2 image (``file``) that reads part of its data through its backing chain, the filter
makes every read of a cluster the top does not allocate also *populate* it: the cluster is read through the
top (so from the chain) and written into the top. A slow or remote backing file is read once; afterwards
the top no longer needs it for that data. With ``bottom``, only data the chain holds *above* ``bottom``
is copied (QEMU's ``bottom`` option, what block-stream with a ``base`` uses).

Races: a guest write to a cluster must never be overwritten by stale backing data copied "for" a read that
raced it. All requests through the filter take a per-cluster range lock (held for at most one request's
clusters); population checks the top's allocation *inside* that lock, so a cluster the guest wrote is
never copied over, and a guest write waits at most for the one population of its own clusters. The
block-stream job (:mod:`pyemu.block.stream`) copies through the same filter with :meth:`populate`.

``-drive copy-on-read=on`` inserts this filter above the drive's image (:func:`insert_into_drive`).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from pyemu.block import graph
from pyemu.block.backing_link import backing_of, unwrap
from pyemu.block.blockdev import BlockdevError, DriverSpec, OpenContext, Opt, register_driver
from pyemu.block.driver import BlockDriver, BlockStatus, check_request
from pyemu.block.filter_node import FilterOverFile
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.locking import BlockPerm
from pyemu.system.buffers import io_buffer

DEFAULT_GRANULARITY = 64 * 1024
POPULATE_CHUNK = 1 << 20
"""At most this many bytes are copied under one range lock (a guest write waits for at most that)."""

FILE_SHARED = BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED
"""Nobody writes the top behind the filter's back (such a write could race a population)."""


class CopyOnRead(FilterOverFile):
    """The filter node. ``bottom`` (a node of ``file``'s backing chain, excluded) limits what is copied."""

    name = "copy-on-read"

    def __init__(self, file: BlockDriver, *, bottom: BlockDriver | None = None, populate_reads: bool = True,
                 owns_child: bool = True, user: str = "") -> None:
        self.file = file
        self.bottom = unwrap(bottom) if bottom is not None else None
        self.populate_reads = populate_reads
        self.owns_child = owns_child
        top = unwrap(file)
        self.granularity = int(getattr(top, "cluster_size", DEFAULT_GRANULARITY) or DEFAULT_GRANULARITY)
        self._cond = threading.Condition()
        self._locked: list[tuple[int, int]] = []
        self._closed = False
        self.populated_bytes = 0
        perm = BlockPerm.CONSISTENT_READ | (BlockPerm(0) if file.read_only else BlockPerm.WRITE)
        self._attachments = [graph.attach(file, user=user or "copy-on-read filter", role="file", perm=perm,
                                          shared=FILE_SHARED)]

    # -- BlockDriver --------------------------------------------------------------------------------------
    def size(self) -> int:
        """The top's size, asked each time: a ``block_resize`` through the filter changes it."""
        return self.file.size()

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return self.file.block_status(offset, length)

    def flush(self) -> None:
        self.file.flush()

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        length = total_length(byte_views(buffers, writable=True))
        check_request(offset, length, self.size(), what="read")
        if not self.populate_reads or self.file.read_only or length == 0:
            self.file.preadv(offset, buffers)
            return
        start, end = self._aligned(offset, length)
        with self._range(start, end):
            self._populate_locked(start, end)
            self.file.preadv(offset, buffers)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        length = total_length(byte_views(buffers, writable=False))
        check_request(offset, length, self.size(), what="write")
        with self._range(*self._aligned(offset, length)):
            self.file.pwritev(offset, buffers)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        check_request(offset, length, self.size(), what="write-zeroes")
        with self._range(*self._aligned(offset, length)):
            self.file.write_zeroes(offset, length, may_unmap=may_unmap)

    def discard(self, offset: int, length: int) -> None:
        check_request(offset, length, self.size(), what="discard")
        with self._range(*self._aligned(offset, length)):
            self.file.discard(offset, length)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for attachment in self._attachments:
            attachment.detach()
        if self.owns_child:
            self.file.close()

    # -- population -----------------------------------------------------------------------------------------
    def populate(self, offset: int, length: int) -> int:
        """Copy into the top what the chain (above ``bottom``) holds for ``[offset, offset+length)`` and the
        top does not allocate; returns the bytes written. Safe against concurrent guest writes."""
        check_request(offset, length, self.size(), what="populate")
        written = 0
        start, end = self._aligned(offset, length)
        pos = start
        while pos < end:
            stop = min(end, pos + POPULATE_CHUNK)
            with self._range(pos, stop):
                written += self._populate_locked(pos, stop)
            pos = stop
        return written

    def _populate_locked(self, start: int, end: int) -> int:
        written = 0
        pos = start
        while pos < end:
            status = self.file.block_status(pos, end - pos)
            run = max(1, min(status.length, end - pos))
            if not status.allocated:
                above, run = self._allocated_above(pos, run)
                if above:
                    data = io_buffer(run)
                    self.file.preadv(pos, [data])
                    self.file.pwritev(pos, [data])
                    written += run
            pos += run
        if written:
            with self._cond:
                self.populated_bytes += written
        return written

    def _allocated_above(self, offset: int, length: int) -> tuple[bool, int]:
        """Whether a node of the chain below the top and above ``bottom`` defines the first bytes of the
        range, and how many bytes that answer holds for."""
        node = backing_of(self.file)
        run = length
        while node is not None and node is not self.bottom:
            size = node.size()
            if offset >= size:
                return False, run
            status = node.block_status(offset, min(run, size - offset))
            if status.allocated:
                return True, max(1, min(run, status.length))
            run = max(1, min(run, status.length))
            node = backing_of(node)
        return False, run

    # -- the range lock -------------------------------------------------------------------------------------
    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        g = self.granularity
        start = offset - offset % g
        end = min(self.size(), -(-(offset + max(length, 1)) // g) * g)
        return start, max(end, start)

    def _range(self, start: int, end: int) -> "_RangeHold":
        return _RangeHold(self, start, end)

    def _lock(self, start: int, end: int) -> None:
        with self._cond:
            while any(a < end and start < b for a, b in self._locked):
                self._cond.wait()
            self._locked.append((start, end))

    def _unlock(self, start: int, end: int) -> None:
        with self._cond:
            self._locked.remove((start, end))
            self._cond.notify_all()


class _RangeHold:
    def __init__(self, owner: CopyOnRead, start: int, end: int) -> None:
        self.owner, self.start, self.end = owner, start, end

    def __enter__(self) -> None:
        self.owner._lock(self.start, self.end)

    def __exit__(self, *exc: object) -> None:
        self.owner._unlock(self.start, self.end)


def insert_into_drive(backend: Any, *, bottom: BlockDriver | None = None, populate_reads: bool = True,
                      user: str = "") -> CopyOnRead:
    """Put a copy-on-read filter above ``backend``'s root (drained); returns it. Remove it with
    ``backend.remove_filter(node)`` (the filter does not close the image then)."""
    def make(below: BlockDriver) -> BlockDriver:
        return CopyOnRead(below, bottom=bottom, populate_reads=populate_reads, owns_child=False,
                          user=user or f"copy-on-read filter of drive '{backend.id}'")

    node = backend.insert_filter(make)
    assert isinstance(node, CopyOnRead)
    return node


# -- -blockdev / blockdev-add ---------------------------------------------------------------------------------
def _open_cor(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    from pyemu.block.backing_link import in_chain
    from pyemu.block.registry import NodeRegistryError

    file = ctx.child("file")
    bottom: BlockDriver | None = None
    if "bottom" in options:
        try:
            bottom = ctx.registry.lookup(options["bottom"])
        except NodeRegistryError:
            raise BlockdevError(f"Bottom node '{options['bottom']}' not found") from None
        if not in_chain(file, bottom) or unwrap(bottom) is unwrap(file):
            raise BlockdevError(f"Bottom node '{options['bottom']}' is not a node in the backing chain of "
                                f"'{file.filename}'")
    return CopyOnRead(file, bottom=bottom, user=f"node '{ctx.name}'")


register_driver(DriverSpec("copy-on-read", (Opt("file", "ref", required=True), Opt("bottom", "str")),
                           _open_cor, "writes data read from the backing chain into the top image"))
