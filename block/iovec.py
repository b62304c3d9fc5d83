"""Scatter-gather lists of memoryviews: the zero-copy currency between guest RAM and the image.

A virtio request arrives as several guest-RAM regions; the block layer hands them to ``os.preadv`` /
``os.pwritev`` as they are. These helpers normalise buffers to flat byte views, step past the bytes a short
read or write already moved, and copy between a list and a single (bounce) buffer when O_DIRECT alignment
forces a copy.
"""

from __future__ import annotations

import os
from typing import Sequence

try:
    IOV_MAX = max(16, int(os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024


class ByteViews(list[memoryview]):
    """A list of flat, non-empty unsigned-byte views whose total length is known (:attr:`nbytes`).

    Why: a guest request is often 256 views (one per guest page), and every layer of the graph (format,
    protocol, host I/O) normalises its buffers and sums their length; doing that per view at each layer
    cost as much Python as the request's own work. A list built once as ``ByteViews`` passes through
    :func:`byte_views` and :func:`total_length` untouched. Only build one from views known to be flat
    bytes (:func:`byte_views` does, and so does guest RAM: every view of it is a slice of one byte view).
    """

    __slots__ = ("nbytes", "writable")

    def __init__(self, views: Sequence[memoryview], nbytes: int, *, writable: bool) -> None:
        super().__init__(views)
        self.nbytes = nbytes
        self.writable = writable


def byte_views(buffers: Sequence[bytes | bytearray | memoryview], *, writable: bool) -> list[memoryview]:
    """Flat unsigned-byte views of ``buffers`` (a multi-dimensional or typed view becomes bytes), without
    the empty ones.

    Raises TypeError for a read-only buffer where the caller has to receive data: that is a programming
    error of the caller, not an I/O error.
    """
    if type(buffers) is ByteViews and (buffers.writable or not writable):
        return buffers
    views: list[memoryview] = []
    total = 0
    readonly = False
    for buf in buffers:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.readonly:
            if writable:
                raise TypeError("preadv needs writable buffers")
            readonly = True
        if view.nbytes:
            views.append(view)
            total += view.nbytes
    return ByteViews(views, total, writable=not readonly)


def total_length(views: Sequence[memoryview]) -> int:
    if type(views) is ByteViews:
        return views.nbytes
    if len(views) == 1:  # the common case, on every request's path: no generator
        return views[0].nbytes
    return sum(v.nbytes for v in views)


def advance(views: Sequence[memoryview], count: int) -> list[memoryview]:
    """The part of ``views`` left after the first ``count`` bytes (empty views are dropped)."""
    rest: list[memoryview] = []
    for view in views:
        if count >= view.nbytes:
            count -= view.nbytes
            continue
        rest.append(view[count:] if count else view)
        count = 0
    return rest


def zero_fill(views: Sequence[memoryview]) -> None:
    for view in views:
        view[:] = bytes(view.nbytes)


def copy_out(views: Sequence[memoryview], pos: int, dst: memoryview) -> None:
    """``dst[:] = concatenation(views)[pos:pos + len(dst)]``."""
    _copy(views, pos, dst, into_views=False)


def copy_in(views: Sequence[memoryview], pos: int, src: memoryview) -> None:
    """``concatenation(views)[pos:pos + len(src)] = src``."""
    _copy(views, pos, src, into_views=True)


def _copy(views: Sequence[memoryview], pos: int, flat: memoryview, *, into_views: bool) -> None:
    """Copy between ``flat`` and the byte range at ``pos`` of the concatenated ``views``."""
    done = 0
    want = flat.nbytes
    for view in views:
        if done >= want:
            return
        if pos >= view.nbytes:
            pos -= view.nbytes
            continue
        take = min(view.nbytes - pos, want - done)
        if into_views:
            view[pos:pos + take] = flat[done:done + take]
        else:
            flat[done:done + take] = view[pos:pos + take]
        done += take
        pos = 0


def take(views: Sequence[memoryview], count: int) -> list[memoryview]:
    """The first ``count`` bytes of ``views`` as views (the complement of :func:`advance`)."""
    head: list[memoryview] = []
    for view in views:
        if count <= 0:
            break
        if view.nbytes <= count:
            head.append(view)
            count -= view.nbytes
        else:
            head.append(view[:count])
            count = 0
    return head
