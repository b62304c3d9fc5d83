"""The one small interface every block driver implements, and the request checks they all share.

QEMU stacks drivers: a *format* node (raw, later qcow2) over a *protocol* node (file, later nbd), with a
:class:`~pyemu.block.backend.BlockBackend` on top that a device holds. Both kinds of node speak the same
interface here, so a format driver is written against "some child node" and a node graph can be assembled
from them without special cases. Capabilities are flags instead of probing by ``hasattr`` so a device can
decide its feature bits (virtio-blk DISCARD, WRITE_ZEROES) up front.

Every byte range is checked by :func:`check_request` before any host call: a hostile guest can send
negative sectors, huge lengths or ranges that wrap, and none of those may touch a byte outside the image.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

from pyemu.block.errors import BlockIOError


@dataclass(frozen=True)
class BlockCapabilities:
    """What a node can do natively. ``write_zeroes`` True means the request is always served (possibly by
    writing zero buffers); ``discard`` True means discard requests are accepted (they are hints: a node may
    still keep the data); ``block_status`` True means allocation information is real, not "all data";
    ``direct_io`` True means the host page cache is bypassed (cache.direct=on)."""

    discard: bool
    write_zeroes: bool
    block_status: bool
    direct_io: bool


@dataclass(frozen=True)
class BlockStatus:
    """One extent starting at ``offset``: ``allocated`` means this node defines the contents (stored data, or
    for a format with backing files a zero marker: ``allocated=False`` then means "as the backing file"),
    ``zero`` means it reads as zeros (a hole in a sparse file is ``allocated=False, zero=True``).
    ``host_offset`` is where the data lies in the node's file (None when it is not stored plainly: zero,
    compressed or unallocated), ``compressed`` marks compressed qcow2 clusters. Both feed ``map`` output."""

    offset: int
    length: int
    allocated: bool
    zero: bool
    host_offset: int | None = None
    compressed: bool = False


class PassThrough(NamedTuple):
    """Where requests to a node may go straight to a host descriptor, past the node graph: the disk's bytes
    are the file's from ``file_offset`` on, ``size`` of them. With ``direct_align`` (O_DIRECT) only requests
    aligned to it in offset, length and memory, and ending at or before ``direct_end``, may go there; the
    others need the node's own path (bounce buffers, the buffered tail). Writes may go there only from disk
    byte ``write_floor`` on, and not at all when it is -1. A node offers this only when a request through it
    is exactly a request to the file (``raw`` over ``file``), or, with a read map, when the node can say for
    each of its clusters where in the file it lies (``qcow2``: ``read_map`` is the address of
    ``map_clusters`` 64-bit host offsets, one per ``1 << cluster_bits`` bytes of disk, 0 for a cluster the
    node must serve itself; ``file_offset`` is unused then).  A node whose offer needs ending (it holds
    something for the caller) has an ``end_pass_through()`` the drive calls."""

    fd: int
    file_offset: int
    size: int
    direct_align: int
    direct_end: int
    write_floor: int
    read_map: int = 0
    map_clusters: int = 0
    cluster_bits: int = 0


@runtime_checkable
class BlockDriver(Protocol):
    """A block node. Offsets and lengths are bytes; all of them are validated against :meth:`size`
    (BlockIOError with errno EINVAL otherwise). Methods may be called from several threads at once."""

    @property
    def name(self) -> str:
        """The driver name ("file", "raw")."""
        ...

    @property
    def capabilities(self) -> BlockCapabilities:
        ...

    @property
    def read_only(self) -> bool:
        ...

    @property
    def filename(self) -> str:
        """The host file behind the node, for messages."""
        ...

    def size(self) -> int:
        """Size of the node in bytes (fixed while open)."""
        ...

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill every buffer completely from ``offset`` on; bytes the host file no longer has read as zero."""
        ...

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        """Write all buffers at ``offset``. Never grows the node: past the end is EINVAL."""
        ...

    def flush(self) -> None:
        """Make completed writes durable (fdatasync for files)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Hint that the range is unused; contents afterwards are unspecified (zeros for files)."""
        ...

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        """Make the range read as zeros; ``may_unmap`` allows deallocating it."""
        ...

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """The first extent at ``offset``, at most ``length`` bytes long (``length`` must be positive)."""
        ...

    def close(self) -> None:
        """Release the node (and the image locks it holds). Idempotent."""
        ...


def check_request(offset: int, length: int, size: int, *, what: str = "request", nonempty: bool = False) -> None:
    """Raise BlockIOError(EINVAL) unless ``[offset, offset + length)`` lies inside ``[0, size)``.

    Python integers do not wrap, so ``offset + length`` cannot overflow here; a 64-bit wrap a guest might
    aim for (offset near 2**64) simply ends past ``size``. Booleans and non-integers are refused as well, so
    a caller bug cannot turn ``True`` into offset 1.
    """
    if type(offset) is not int or type(length) is not int:  # noqa: E721 -- bool must not pass as int
        raise BlockIOError(f"{what}: offset and length must be integers, not {type(offset).__name__} and "
                           f"{type(length).__name__}", errno=errno.EINVAL,
                           offset=offset if isinstance(offset, int) else -1,
                           length=length if isinstance(length, int) else -1)
    if offset < 0 or length < 0 or (nonempty and length == 0) or offset > size or length > size - offset:
        raise BlockIOError(f"{what}: offset {offset} length {length} is outside the image "
                           f"(size {size})", errno=errno.EINVAL, offset=offset, length=length)
