"""The ``raw`` format driver: the guest's disk is the child node's bytes, optionally a window of them.

A format node that adds nothing still earns its place: the graph keeps QEMU's shape (format over
protocol), so a qcow2 driver later slots in at the same spot, and raw's ``offset``/``size`` properties let
a disk be one partition of a bigger image. Every request is checked against the window before it is
shifted into the child, so a guest can never reach bytes outside its window even though the child could
serve them.
"""

from __future__ import annotations

import errno
from typing import Sequence

from pyemu.block import graph
from pyemu.block.driver import BlockCapabilities, BlockDriver, BlockStatus, PassThrough, check_request
from pyemu.block.errors import BlockConfigError, BlockIOError
from pyemu.block.file import FileProtocol
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.locking import BlockPerm

SECTOR_SIZE = 512


class RawFormat:
    """``raw`` over ``child``. Owns the child: :meth:`close` closes it."""

    name = "raw"

    def __init__(self, child: BlockDriver, *, offset: int = 0, size: int | None = None,
                 guard_block0: bool = False) -> None:
        real_size = child.size()
        # QEMU's raw_apply_options messages.
        if type(offset) is not int or offset < 0:  # noqa: E721
            raise BlockConfigError(f"raw: 'offset' must be a non-negative integer, not {offset!r}")
        if offset > real_size:
            raise BlockConfigError(f"Offset ({offset}) cannot be greater than size of image ({real_size})")
        if size is not None:
            if type(size) is not int or size < 0:  # noqa: E721
                raise BlockConfigError(f"raw: 'size' must be a non-negative integer, not {size!r}")
            if real_size - offset < size:
                raise BlockConfigError(f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal "
                                       f"to the actual size of the containing file ({real_size})")
            if size % SECTOR_SIZE:
                raise BlockConfigError(f"Specified size is not multiple of {SECTOR_SIZE}")
        self.child = child
        self.offset = offset
        # Without a 'size' the disk is the child from 'offset' on and follows the child when it is resized
        # (QEMU's raw asks its child's length every time); with one it is fixed.
        self._fixed_size = size
        self.has_window = offset != 0 or size is not None
        # A probed raw image must not become something else: refuse writes that would make block 0 look
        # like another format (QEMU's restriction, so a guest cannot turn its disk into a qcow2 header
        # pointing at host files on the next probe).
        self.guard_block0 = guard_block0
        perm, shared = graph.format_node_permissions(writable=not child.read_only)
        if not self.has_window:
            shared |= BlockPerm.RESIZE  # the whole child is the disk: it may grow under us (block_resize)
        self._attachment = graph.attach(child, user="a raw node", role="file", perm=perm, shared=shared)

    @property
    def filename(self) -> str:
        return self.child.filename

    @property
    def read_only(self) -> bool:
        return self.child.read_only

    @property
    def capabilities(self) -> BlockCapabilities:
        return self.child.capabilities

    def size(self) -> int:
        if self._fixed_size is not None:
            return self._fixed_size
        return max(0, self.child.size() - self.offset)

    def resize(self, size: int) -> None:
        """``block_resize`` (QEMU's raw truncate): the child is resized to ``offset + size``; a disk with a
        fixed ``size`` cannot change."""
        if self._fixed_size is not None:
            raise BlockIOError("Cannot resize fixed-size raw disks", errno=errno.ENOTSUP)
        if size > (1 << 63) - 1 - self.offset:
            raise BlockIOError("Disk size too large for the chosen offset", errno=errno.EINVAL)
        from pyemu.block.resize import resize_node
        resize_node(self.child, self.offset + size)

    def pass_through(self) -> PassThrough | None:
        """The file's descriptor, shifted by this node's window (see :class:`PassThrough`), when the child
        is a plain file node (a filter or another format in between has its own say in every request).
        A probed image keeps its first sector to :meth:`pwritev`, which guards it."""
        if type(self.child) is not FileProtocol:  # noqa: E721  (a subclass may change what a request does)
            return None
        below = self.child.pass_through()
        if below is None:
            return None
        floor = below.write_floor
        if floor >= 0 and self.guard_block0:
            floor = max(floor, SECTOR_SIZE)
        return PassThrough(below.fd, below.file_offset + self.offset, self.size(), below.direct_align,
                           below.direct_end, floor)  # not _replace(): asked once a request, and 3x slower

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers, writable=True)
        check_request(offset, total_length(views), self.size(), what="read")
        self.child.preadv(self.offset + offset, views)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        views = byte_views(buffers, writable=False)
        check_request(offset, total_length(views), self.size(), what="write")
        if self.guard_block0 and offset < SECTOR_SIZE:
            self._check_block0(offset, views)
        self.child.pwritev(self.offset + offset, views)

    def _check_block0(self, offset: int, views: list[memoryview]) -> None:
        head = bytearray(min(SECTOR_SIZE, self.size()))
        if head:
            self.child.preadv(self.offset, [memoryview(head)])
        pos = offset
        for view in views:
            if pos >= len(head):
                break
            take_n = min(len(head) - pos, view.nbytes)
            head[pos:pos + take_n] = view[:take_n]
            pos += take_n
        from pyemu.block.qcow2.layout import MAGIC
        if bytes(head[:4]) == MAGIC:
            raise BlockIOError(f"write to block 0 of '{self.filename}' refused: it would make the probed raw "
                               "image look like a qcow2 image (specify format=raw to allow it)",
                               errno=errno.EPERM, offset=offset, length=total_length(views))

    def flush(self) -> None:
        self.child.flush()

    def discard(self, offset: int, length: int) -> None:
        check_request(offset, length, self.size(), what="discard")
        self.child.discard(self.offset + offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        check_request(offset, length, self.size(), what="write-zeroes")
        self.child.write_zeroes(self.offset + offset, length, may_unmap=may_unmap)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        check_request(offset, length, self.size(), what="block-status", nonempty=True)
        status = self.child.block_status(self.offset + offset, length)
        return BlockStatus(offset, min(status.length, length), allocated=status.allocated, zero=status.zero)

    def close(self) -> None:
        self._attachment.detach()
        self.child.close()
