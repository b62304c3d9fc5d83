"""The ``throttle`` filter driver: ``-blockdev driver=throttle,throttle-group=G,file=NODE``.

Requests through the node share group ``G``'s limits (an ``-object throttle-group``, which must exist, as
in QEMU). Reads, writes, write-zeroes and discards all count (the last two as writes of their length, as
QEMU's filter). A device whose drive has this node at its root asks the filter's member for admission without
blocking its I/O thread (:meth:`~pyemu.block.backend.BlockBackend.admit`) and the filter lets those
requests through; any other caller (a job, an export) waits in its own thread.
"""

from __future__ import annotations

from typing import Any, Sequence

from pyemu.block import graph
from pyemu.block.blockdev import BlockdevError, DriverSpec, OpenContext, Opt, register_driver
from pyemu.block.driver import BlockDriver, BlockStatus
from pyemu.block.filter_node import FilterOverFile
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.locking import PERM_ALL, BlockPerm
from pyemu.block.throttle import THROTTLE_GROUPS, ThrottleGroupMember, was_admitted


class ThrottleFilter(FilterOverFile):
    """The filter node: passes everything to ``file``, reads and writes after their turn."""

    name = "throttle"

    def __init__(self, file: BlockDriver, member: ThrottleGroupMember, *, user: str = "") -> None:
        self.file = file
        self.throttle_member = member
        self._closed = False
        perm = BlockPerm.CONSISTENT_READ | (BlockPerm(0) if file.read_only else BlockPerm.WRITE)
        self._attachment = graph.attach(file, user=user or "throttle filter", role="file", perm=perm,
                                        shared=PERM_ALL)

    def size(self) -> int:
        return self.file.size()

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return self.file.block_status(offset, length)

    def flush(self) -> None:
        self.file.flush()

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if not was_admitted(self.throttle_member):
            self.throttle_member.wait(False, total_length(byte_views(buffers, writable=True)))
        self.file.preadv(offset, buffers)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        if not was_admitted(self.throttle_member):
            self.throttle_member.wait(True, total_length(byte_views(buffers, writable=False)))
        self.file.pwritev(offset, buffers)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        """Counted as a write of ``length`` bytes (QEMU's throttle_co_pwrite_zeroes): zeroing is no way
        around the group's limit."""
        if not was_admitted(self.throttle_member):
            self.throttle_member.wait(True, length)
        self.file.write_zeroes(offset, length, may_unmap=may_unmap)

    def discard(self, offset: int, length: int) -> None:
        """Counted as a write of ``length`` bytes too, as QEMU's throttle_co_pdiscard does (only the
        drive-level throttle leaves discards alone)."""
        if not was_admitted(self.throttle_member):
            self.throttle_member.wait(True, length)
        self.file.discard(offset, length)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        THROTTLE_GROUPS.leave(self.throttle_member)
        self._attachment.detach()
        self.file.close()  # the node's own child, as every filter of -blockdev


def _open_throttle(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    name = options["throttle-group"]
    if THROTTLE_GROUPS.get(name) is None:
        raise BlockdevError(f"Throttle group '{name}' does not exist")
    file = ctx.child("file")
    return ThrottleFilter(file, THROTTLE_GROUPS.join(name, ctx.name, None), user=f"node '{ctx.name}'")


register_driver(DriverSpec("throttle", (Opt("file", "ref", required=True),
                                        Opt("throttle-group", "str", required=True)),
                           _open_throttle, "requests share a throttle group's I/O limits"))
