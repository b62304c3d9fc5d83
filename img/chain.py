"""Allocation status of a guest range through a whole backing chain (qemu-img's "block status above").

A node's own ``block_status`` answers for that layer only: a qcow2 node says "not mine, ask the backing
file" with ``allocated=False``. ``map``, ``convert``, ``compare``, ``measure``, ``rebase`` and ``commit`` all
need the combined answer -- which layer defines these bytes (``depth``), whether they read as zeros, whether
data is stored and where -- so :func:`status` walks down the chain once, here.

A raw node is the bottom of any chain and defines every byte: a hole in the file is "present, zero" there,
as qemu-img reports it, and its data lies at the same offset (plus raw's window offset) in its file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pyemu.block.driver import BlockDriver
from pyemu.img.images import backing_of


@dataclass(frozen=True)
class Extent:
    """``[start, start + length)`` as seen through the chain. ``present``: some layer defines it (else it
    reads as zeros because nobody does); ``data``: stored data rather than a zero marker or hole;
    ``offset``: host file offset of the data in ``node``'s file when it is stored plainly."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    compressed: bool
    node: BlockDriver

    @property
    def end(self) -> int:
        return self.start + self.length


def layer_status(node: BlockDriver, offset: int, length: int) -> tuple[int, bool, bool, bool, int | None, bool]:
    """Status of one layer: ``(length, defined_here, zero, data, host_offset, compressed)``."""
    st = node.block_status(offset, length)
    run = max(1, min(st.length, length))
    if backing_of(node) is None and not hasattr(node, "header"):
        # raw (or another format without backing files): this layer defines everything.
        base = getattr(node, "offset", 0) or 0
        return run, True, bool(st.zero), bool(st.allocated) and not st.zero, base + offset, False
    host = getattr(st, "host_offset", None)
    compressed = bool(getattr(st, "compressed", False))
    if st.allocated:
        return run, True, bool(st.zero), not st.zero, host, compressed
    return run, False, bool(st.zero), False, None, False


def status(top: BlockDriver, offset: int, length: int, *, depth_limit: int | None = None,
           stop_at: BlockDriver | None = None) -> Extent:
    """The first extent at ``offset`` (at most ``length`` bytes) through ``top``'s chain.

    ``stop_at``: do not look into this node or below (as if the chain ended above it: used by commit and
    rebase, which ask "is this defined above the base?"); ``depth_limit`` likewise counts layers.
    """
    node = top
    depth = 0
    while True:
        run, here, zero, data, host, compressed = layer_status(node, offset, length)
        if here:
            return Extent(offset, run, depth, True, zero, data, host if data or zero else None, compressed, node)
        below = backing_of(node)
        if below is None or below is stop_at or (depth_limit is not None and depth + 1 > depth_limit):
            return Extent(offset, run, depth, False, True if below is None else zero, False, None, False, node)
        if offset >= below.size():
            # Past the end of a shorter backing file: reads as zeros, defined by nobody (qemu-img reports
            # the overlay's depth for it).
            return Extent(offset, run, depth, False, True, False, None, False, node)
        length = min(run, below.size() - offset)
        node = below
        depth += 1


def extents(top: BlockDriver, start: int, end: int, *, stop_at: BlockDriver | None = None,
            chunk: int = 1 << 30) -> Iterator[Extent]:
    """Consecutive extents covering ``[start, end)`` (not merged)."""
    pos = start
    while pos < end:
        ext = status(top, pos, min(end - pos, chunk), stop_at=stop_at)
        yield ext
        pos += ext.length


def top_allocated(node: BlockDriver, offset: int, length: int) -> tuple[int, bool]:
    """``(run, allocated)``: whether ``node`` itself (not its backing chain) defines the run."""
    run, here, *_ = layer_status(node, offset, length)
    return run, here


def reads_as_zero(ext: Extent) -> bool:
    """True when the extent is known to read as zeros without reading it."""
    return ext.zero and not ext.data
