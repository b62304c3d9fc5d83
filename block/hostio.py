"""Host I/O loops: full preadv/pwritev over short transfers, fallocate, and O_DIRECT without alignment worries.

``os.preadv`` may transfer less than asked (end of file, the kernel's ~2 GiB cap per call, more buffers than
IOV_MAX): the loops here continue until every byte moved, and a read that meets the end of the file fills
the rest with zeros (what QEMU's file-posix does for a file shorter than the disk).

O_DIRECT (cache=none) needs file offsets, lengths and memory aligned to the device's DIO alignment. A guest
mostly sends aligned requests, and those go zero-copy straight to guest RAM. The others are bounced through
a page-aligned ``mmap`` buffer (one per thread, so I/O threads never share it): read the covering aligned
blocks, copy, and for writes read-modify-write the partial head and tail blocks. Read-modify-write needs
requests on the same blocks serialised -- a concurrent write could otherwise be overwritten with stale data
-- so every mutating direct request holds its aligned range in a :class:`RangeLock` (what QEMU calls
serialising requests). The image's last partial page, which an aligned O_DIRECT write could only cover by
growing the file, goes through a second, buffered descriptor; pages are never shared between the two, so
the page cache stays coherent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import threading
from typing import Iterator, Sequence

from pyemu.block.iovec import IOV_MAX, ByteViews, advance, copy_in, copy_out, take, total_length, zero_fill

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

PAGE_SIZE = mmap.PAGESIZE
BOUNCE_SIZE = 1 << 20
FALLBACK_DIO_ALIGNMENT = 4096  # a multiple of every logical block size Linux disks use

ZEROS = memoryview(mmap.mmap(-1, BOUNCE_SIZE, prot=mmap.PROT_READ))
"""1 MiB of zeros, page aligned (O_DIRECT can write it) and read-only, shared by every zero-writing loop."""


def zero_chunks(offset: int, length: int) -> Iterator[tuple[int, memoryview]]:
    """(position, zeros) pairs covering ``[offset, offset + length)`` in :data:`ZEROS`-sized steps."""
    pos, end = offset, offset + length
    while pos < end:
        step = min(end - pos, ZEROS.nbytes)
        yield pos, ZEROS[:step]
        pos += step


_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc; find_library would spawn ldconfig
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` has none); raises OSError. The GIL is released."""
    while True:
        if _fallocate(fd, mode, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


EXT4_SUPER_MAGIC = 0xEF53
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_fstatfs.restype = ctypes.c_int


def filesystem_type(fd: int) -> int | None:
    """The ``f_type`` magic number of the filesystem holding ``fd`` (fstatfs(2)), or None if unknown."""
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on x86_64; f_type comes first
    if _fstatfs(fd, buf) != 0:
        return None
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little", signed=True)


def _nonempty(views: Sequence[memoryview]) -> Sequence[memoryview]:
    """``views`` without empty views (a :class:`ByteViews` has none)."""
    return views if type(views) is ByteViews else [v for v in views if v.nbytes]


def read_full(fd: int, offset: int, views: Sequence[memoryview], *, align: int = 1) -> None:
    """Fill ``views`` from ``offset``; zeros past the end of the file. With O_DIRECT (``align`` > 1) a short
    read that stops at an unaligned position can only be the end of the file, so the rest is zeroed
    instead of issuing a read the kernel would refuse."""
    rest = _nonempty(views)
    remaining = total_length(rest)
    pos = offset
    while remaining > 0:
        try:
            count = os.preadv(fd, rest if len(rest) <= IOV_MAX else rest[:IOV_MAX], pos)
        except InterruptedError:
            continue
        if count == 0:
            zero_fill(rest)
            return
        remaining -= count
        if remaining <= 0:
            return  # filled by one call: the usual request needs no bookkeeping
        pos += count
        rest = advance(rest, count)
        if pos % align:
            zero_fill(rest)
            return


def write_full(fd: int, offset: int, views: Sequence[memoryview]) -> None:
    """Write every byte of ``views`` at ``offset``; a write that makes no progress is ENOSPC."""
    rest = _nonempty(views)
    remaining = total_length(rest)
    pos = offset
    while remaining > 0:
        try:
            count = os.pwritev(fd, rest if len(rest) <= IOV_MAX else rest[:IOV_MAX], pos)
        except InterruptedError:
            continue
        if count == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        remaining -= count
        if remaining <= 0:
            return  # written by one call: the usual request needs no bookkeeping
        pos += count
        rest = advance(rest, count)


_STATX = struct.Struct("256s")
_AT_EMPTY_PATH = 0x1000
_STATX_DIOALIGN = 0x2000


def dio_alignment(fd: int) -> int:
    """The alignment O_DIRECT needs on ``fd`` (offsets, lengths and memory), from statx(STATX_DIOALIGN)
    (Linux 6.1+); 4096 when the kernel or filesystem does not say."""
    statx = getattr(_libc, "statx", None)
    if statx is None:
        return FALLBACK_DIO_ALIGNMENT
    buf = ctypes.create_string_buffer(_STATX.size)
    if statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return FALLBACK_DIO_ALIGNMENT
    mask, = struct.unpack_from("I", buf.raw, 0)
    mem_align, offset_align = struct.unpack_from("II", buf.raw, 0x98)
    if not mask & _STATX_DIOALIGN or not mem_align or not offset_align:
        return FALLBACK_DIO_ALIGNMENT
    align = int(max(mem_align, offset_align))
    if align & (align - 1) or align > PAGE_SIZE:
        return FALLBACK_DIO_ALIGNMENT
    return align


class RangeLock:
    """Mutual exclusion for overlapping byte ranges; disjoint ranges proceed in parallel."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def hold(self, start: int, end: int) -> Iterator[None]:
        if start >= end:
            yield
            return
        entry = (start, end)
        with self._cond:
            while any(s < end and start < e for s, e in self._held):
                self._cond.wait()
            self._held.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(entry)
                self._cond.notify_all()


class DirectIO:
    """preadv/pwritev on an O_DIRECT descriptor for any offset, length and buffer address.

    ``size`` is the image size; bytes from the last page boundary below it go through ``buffered_fd``.
    """

    def __init__(self, fd: int, buffered_fd: int, size: int, align: int) -> None:
        self.fd = fd
        self.buffered_fd = buffered_fd
        self.align = align
        self.tail_start = 0
        self.follow_size(size)
        self.range_lock = RangeLock()
        self._local = threading.local()

    def follow_size(self, size: int) -> None:
        """The file is ``size`` bytes now (grown by writes or ``ftruncate``, or trimmed): only its last
        partial page stays with the buffered descriptor. Before, a file that grew kept every byte past its
        size at open on the page cache -- under ``cache=none`` a qcow2 image's new clusters were never read
        or written with O_DIRECT, and never through virtio-blk's C data plane."""
        page = max(self.align, PAGE_SIZE)
        self.tail_start = size // page * page

    def _bounce(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = memoryview(mmap.mmap(-1, BOUNCE_SIZE))  # page-aligned, private to this thread
            self._local.buf = buf
        return buf

    def aligned_range(self, offset: int, length: int) -> tuple[int, int]:
        a = self.align
        return offset // a * a, -(-(offset + length) // a) * a

    def preadv(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        split = min(offset + length, max(offset, self.tail_start))
        if split > offset:
            self._read_direct(offset, views if split - offset == length else take(views, split - offset),
                              split - offset)
        if offset + length > split:
            read_full(self.buffered_fd, split, advance(views, split - offset))

    def pwritev(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        split = min(offset + length, max(offset, self.tail_start))
        if split > offset:
            self._write_direct(offset, views if split - offset == length else take(views, split - offset),
                               split - offset)
        if offset + length > split:
            write_full(self.buffered_fd, split, advance(views, split - offset))

    def _is_aligned(self, offset: int, length: int) -> bool:
        return not (offset | length) % self.align

    def _read_direct(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        if self._is_aligned(offset, length):
            try:
                read_full(self.fd, offset, views, align=self.align)
                return
            except OSError as exc:  # EINVAL: some buffer is not aligned in memory; bounce it
                if exc.errno != errno.EINVAL:
                    raise
        end = offset + length
        a0, a1 = self.aligned_range(offset, length)
        bounce = self._bounce()
        for c0 in range(a0, a1, BOUNCE_SIZE):
            c1 = min(c0 + BOUNCE_SIZE, a1)
            read_full(self.fd, c0, [bounce[:c1 - c0]], align=self.align)
            lo, hi = max(c0, offset), min(c1, end)
            copy_in(views, lo - offset, bounce[lo - c0:hi - c0])

    def _write_direct(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        a0, a1 = self.aligned_range(offset, length)
        with self.range_lock.hold(a0, a1):
            if self._is_aligned(offset, length):
                try:
                    write_full(self.fd, offset, views)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
            self._write_bounced(offset, views, length, a0, a1)

    def _write_bounced(self, offset: int, views: Sequence[memoryview], length: int, a0: int, a1: int) -> None:
        end = offset + length
        a = self.align
        bounce = self._bounce()
        for c0 in range(a0, a1, BOUNCE_SIZE):
            c1 = min(c0 + BOUNCE_SIZE, a1)
            lo, hi = max(c0, offset), min(c1, end)
            if lo > c0:  # partial head block: keep the bytes around the request
                read_full(self.fd, c0, [bounce[:a]], align=a)
            if hi < c1 and not (lo > c0 and c1 - c0 == a):  # partial tail block (unless it was the head)
                read_full(self.fd, c1 - a, [bounce[c1 - a - c0:c1 - c0]], align=a)
            copy_out(views, lo - offset, bounce[lo - c0:hi - c0])
            write_full(self.fd, c0, [bounce[:c1 - c0]])

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zero buffers over the range (fallback when fallocate cannot)."""
        for pos, chunk in zero_chunks(offset, length):
            self.pwritev(pos, [chunk], chunk.nbytes)

    def close(self) -> None:
        buf = getattr(self._local, "buf", None)
        if buf is not None:  # other threads' buffers are freed with their thread-local storage
            self._local.buf = None
