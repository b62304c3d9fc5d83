"""The ``snapshot-access`` driver: the point-in-time view a copy-before-write filter keeps, as a node.

An NBD export (or any reader) cannot use the filter node itself -- reading it gives the *current* disk. This
node turns the filter's snapshot interface (:meth:`CopyBeforeWrite.snapshot_preadv`,
``snapshot_block_status``, ``snapshot_discard``) into the ordinary driver calls, so the view can be
exported, read by ``qemu-img convert`` or ``nbdcopy``, and trimmed by the reader when it is done with a region.

As in QEMU, the node opens over any node but only a copy-before-write node serves reads (others fail with
ENOTSUP); writes and write-zeroes are not supported (ENOTSUP). It is a filter for bitmap lookups
(``filtered_child`` is the copy-before-write node), so an export's ``bitmaps`` are found on the disk below.
"""

from __future__ import annotations

import errno
from typing import Any, Sequence

from pyemu.block import graph
from pyemu.block.blockdev import DriverSpec, OpenContext, Opt, register_driver
from pyemu.block.borrowed import BorrowedNode
from pyemu.block.driver import BlockCapabilities, BlockDriver, BlockStatus, check_request
from pyemu.block.errors import BlockIOError
from pyemu.block.filter_node import FilterOverFile
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.locking import PERM_ALL, BlockPerm


def _snapshot_api(node: object) -> Any:
    """The copy-before-write node behind ``node`` (a borrowed handle unwrapped), or None."""
    real = node.node if isinstance(node, BorrowedNode) else node
    return real if hasattr(real, "snapshot_preadv") else None


class SnapshotAccess(FilterOverFile):
    """Reads the point-in-time view of the copy-before-write node ``file``. Owns ``file`` (an inline
    definition); a node given by name arrives as a borrowed handle whose close only lets go."""

    name = "snapshot-access"
    passes_writes_down = False
    """A discard of the view changes neither the filter nor the disk: BlockBackend marks no bitmap below."""

    def __init__(self, file: BlockDriver, *, user: str = "") -> None:
        self.file = file
        self._size = file.size()
        # QEMU takes no permission on the filter: it reads through the filter's own children.
        self._attachment = graph.attach(file, user=user or "a snapshot-access node", role="file",
                                        perm=BlockPerm(0), shared=PERM_ALL)
        self._closed = False

    @property
    def read_only(self) -> bool:
        return False  # as QEMU reports it ("ro": false); writes are refused by the driver, not the node

    @property
    def capabilities(self) -> BlockCapabilities:
        return BlockCapabilities(discard=True, write_zeroes=False, block_status=True, direct_io=False)

    def size(self) -> int:
        return self._size

    def _api(self, op: str, offset: int, length: int) -> Any:
        api = _snapshot_api(self.file)
        if api is None:
            raise BlockIOError(f"{op} on snapshot-access over '{self.file.filename}': the node below is not a "
                               "copy-before-write filter: Operation not supported", errno=errno.ENOTSUP,
                               offset=offset, length=length)
        return api

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers, writable=True)
        length = total_length(views)
        check_request(offset, length, self._size, what="read")
        self._api("read", offset, length).snapshot_preadv(offset, views)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        check_request(offset, length, self._size, what="block-status", nonempty=True)
        status: BlockStatus = self._api("block-status", offset, length).snapshot_block_status(offset, length)
        return status

    def discard(self, offset: int, length: int) -> None:
        check_request(offset, length, self._size, what="discard")
        self._api("discard", offset, length).snapshot_discard(offset, length)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        length = total_length(byte_views(buffers, writable=False))
        raise BlockIOError(f"write to snapshot-access node at offset {offset}: Operation not supported",
                           errno=errno.ENOTSUP, offset=offset, length=length)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        raise BlockIOError(f"write-zeroes on snapshot-access node at offset {offset}: Operation not supported",
                           errno=errno.ENOTSUP, offset=offset, length=length)

    def flush(self) -> None:
        """Nothing to make durable: the view is never written."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._attachment.detach()
        self.file.close()


def _open_snapshot_access(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    return SnapshotAccess(ctx.child("file"), user=f"node '{ctx.name}'")


register_driver(DriverSpec("snapshot-access", (Opt("file", "ref", required=True),), _open_snapshot_access,
                           "the point-in-time view of a copy-before-write node"))
