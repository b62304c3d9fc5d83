"""Block-copy: copy the clusters of a source node to a target node, each exactly once (QEMU's block-copy).

A backup job walks the disk copying clusters in order while a copy-before-write filter copies the clusters a
guest write is about to overwrite; both must share one record of what is still to copy, and neither may copy
a cluster the other is copying right now (the second copy would read data the guest has already changed).
:class:`BlockCopy` is that record: a cluster-granular *to-copy* set, the ranges being copied right now
(in-flight), and a condition variable on which a copier waits only when its range overlaps an in-flight one
-- a guest write to one region is never held up by a copy of another.

A cluster stays to-copy until its copy succeeded; a failed copy leaves it to-copy (someone may retry) and
raises :class:`BlockCopyError` saying which side failed, so the caller can apply its error policy
(``on-source-error``/``on-target-error``, ``on-cbw-error``). Zero extents of the source (by block_status)
are written with ``write_zeroes`` so a sparse disk stays sparse in the target.

A copy with a timeout runs in a helper thread and the caller stops waiting at the deadline (QEMU's
cbw-timeout): a hung target cannot be interrupted, so the copy carries on in the background, and
:meth:`BlockCopy.drain` waits for such copies before the nodes are closed.
"""

from __future__ import annotations

import errno as _errno
import threading
from typing import Iterator

from pyemu.block.dirty_bitmap import DirtyBitmap
from pyemu.block.driver import BlockDriver, check_request
from pyemu.block.errors import BlockConfigError, BlockError, BlockIOError
from pyemu.block.hostio import zero_chunks
from pyemu.system.buffers import io_buffer

DEFAULT_CLUSTER_SIZE = 64 * 1024
MAX_CHUNK = 1 << 20
"""At most this many bytes are read into memory per step of a copy (and claimed as in-flight at once)."""


class BlockCopyError(BlockIOError):
    """A copy failed. ``side`` is "read" when reading the source failed, "write" when writing the target
    failed; ``errno`` is the failing request's."""

    def __init__(self, message: str, *, errno: int, side: str, offset: int = -1, length: int = -1) -> None:
        super().__init__(message, errno=errno, offset=offset, length=length)
        self.side = side


class BlockCopyTimeout(BlockCopyError):
    """A copy did not finish within its timeout (errno ETIMEDOUT); it may still complete in the background."""


def _align_down(value: int, unit: int) -> int:
    return value - value % unit


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


class BlockCopy:
    """The copy state shared by everything that copies ``source`` into ``target`` (see the module doc)."""

    def __init__(self, source: BlockDriver, target: BlockDriver, *, cluster_size: int | None = None,
                 bitmap: DirtyBitmap | None = None, compress: bool = False) -> None:
        size = source.size()
        if target.size() != size:
            raise BlockConfigError("Source and target image have different sizes", option=None)
        if cluster_size is None:
            target_cluster = getattr(target, "cluster_size", None)
            cluster_size = max(DEFAULT_CLUSTER_SIZE, target_cluster if isinstance(target_cluster, int) else 0)
        if type(cluster_size) is not int or cluster_size < 512 or cluster_size & (cluster_size - 1):  # noqa: E721
            raise BlockConfigError(f"block-copy: cluster size {cluster_size!r} is not a power of two >= 512",
                                   option=None)
        if bitmap is not None and bitmap.size != size:
            raise BlockConfigError(f"Failed to merge bitmap '{bitmap.name}' to internal copy-bitmap: Bitmaps are of "
                                   f"different sizes (destination size is {size}, source size is {bitmap.size}) "
                                   "and can't be merged", option=None)
        self.source = source
        self.target = target
        self._compressed_cluster = 0
        if compress:
            # blockdev-backup compress=true: every data cluster goes through the target's compressed write
            # (qcow2's write_compressed, one target cluster at a time, as qemu-img convert -c).
            target_cluster = getattr(target, "cluster_size", None)
            if not hasattr(target, "write_compressed") or not isinstance(target_cluster, int):
                raise BlockConfigError("Compression is not supported for this drive "
                                       f"{getattr(target, 'node_name', '') or target.filename}", option=None)
            self._compressed_cluster = target_cluster
        self._cluster_size = cluster_size
        self._size = size
        # One bit per cluster: still to copy. A copy of the caller's bitmap, taken once.
        self._to_copy = DirtyBitmap("block-copy", size, cluster_size, enabled=False)
        if bitmap is None:
            self._to_copy.fill()
        else:
            for start, length in bitmap.dirty_extents(0, size):
                self._to_copy.set_range(start, length)
        self._cond = threading.Condition()
        self._inflight: list[tuple[int, int]] = []
        self._background = 0
        self.copied_bytes = 0

    # -- properties -------------------------------------------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return self._cluster_size

    @property
    def size(self) -> int:
        return self._size

    # -- queries --------------------------------------------------------------------------------------------
    def next_dirty(self, offset: int) -> tuple[int, int] | None:
        """The next cluster-aligned run (offset, length) of to-copy clusters at or after ``offset``."""
        start = _align_down(max(0, offset), self._cluster_size)
        for run in self._to_copy.dirty_extents(start, self._size - start):
            return run
        return None

    def remaining(self) -> int:
        """Bytes still to copy."""
        return self._to_copy.count()

    def to_copy_extents(self) -> Iterator[tuple[int, int]]:
        """(offset, length) runs still to copy."""
        return iter(list(self._to_copy.dirty_extents(0, self._size)))

    def is_to_copy(self, offset: int, length: int) -> bool:
        """Does any cluster overlapping the range still need copying?"""
        return any(True for _ in self._to_copy.dirty_extents(offset, length))

    # -- changing the set without copying -------------------------------------------------------------
    def _span(self, offset: int, length: int) -> tuple[int, int]:
        check_request(offset, length, self._size, what="block-copy")
        start = _align_down(offset, self._cluster_size)
        end = min(self._size, -(-(offset + length) // self._cluster_size) * self._cluster_size)
        return start, end

    def _wait_idle(self, start: int, end: int) -> None:
        """With the lock held: wait until no copy of [start, end) is in flight."""
        while any(_overlaps(start, end, a, b) for a, b in self._inflight):
            self._cond.wait()

    def reset(self, offset: int, length: int) -> None:
        """Mark the clusters overlapping the range done without copying (after waiting for in-flight copies
        of them): a discard by the snapshot reader, or a job told those clusters need no copy."""
        start, end = self._span(offset, length)
        if start >= end:
            return
        with self._cond:
            self._wait_idle(start, end)
            self._to_copy.reset_range(start, end - start)
            self._cond.notify_all()

    def skip_unallocated(self, offset: int, length: int) -> int:
        """For sync=top: mark done (without copying) the to-copy clusters of the range that the source's top
        layer does not allocate; return the bytes skipped. Only whole unallocated clusters are skipped."""
        start, end = self._span(offset, length)
        skipped = 0
        pos = start
        while pos < end:
            try:
                status = self.source.block_status(pos, end - pos)
            except BlockError as exc:
                raise _copy_error(exc, "read", pos, end - pos) from exc
            stop = pos + max(1, status.length)
            if not status.allocated:
                first = -(-pos // self._cluster_size) * self._cluster_size
                last = stop if stop >= self._size else _align_down(stop, self._cluster_size)
                if first < last:
                    with self._cond:
                        self._wait_idle(first, last)
                        before = self._count(first, last)
                        self._to_copy.reset_range(first, last - first)
                        skipped += before
            pos = stop
        return skipped

    def _count(self, start: int, end: int) -> int:
        return sum(n for _, n in self._to_copy.dirty_extents(start, end - start))

    # -- copying ------------------------------------------------------------------------------------------
    def copy(self, offset: int, length: int, *, timeout: float | None = None) -> int:
        """Copy every still-to-copy cluster overlapping [offset, offset+length); return the bytes this call
        copied. Waits for clusters another thread is copying now. On failure those clusters stay to-copy and
        BlockCopyError (side read/write) or BlockCopyTimeout is raised. Thread-safe."""
        start, end = self._span(offset, length)
        if start >= end:
            return 0
        if timeout is None:
            return self._copy_range(start, end)
        with self._cond:
            if not self.is_to_copy(start, end - start) and \
                    not any(_overlaps(start, end, a, b) for a, b in self._inflight):
                return 0
            self._background += 1
        outcome: list[object] = []
        finished = threading.Event()

        def worker() -> None:
            try:
                outcome.append(self._copy_range(start, end))
            except BaseException as exc:  # noqa: BLE001 -- handed to the waiting caller
                outcome.append(exc)
            finally:
                with self._cond:
                    self._background -= 1
                    self._cond.notify_all()
                finished.set()

        threading.Thread(target=worker, name="block-copy", daemon=True).start()
        if not finished.wait(timeout):
            raise BlockCopyTimeout(f"copy of offset {start} length {end - start} to '{self.target.filename}' "
                                   f"timed out after {timeout} s", errno=_errno.ETIMEDOUT, side="write",
                                   offset=start, length=end - start)
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, int)
        return result

    def drain(self) -> None:
        """Wait for copies still running after their caller timed out (before closing the nodes)."""
        with self._cond:
            while self._background:
                self._cond.wait()

    def _claim(self, start: int, end: int) -> tuple[int, int] | None:
        """With the lock held: claim the first to-copy piece of [start, end) nobody is copying, waiting while
        only in-flight clusters remain. None: nothing left to copy in the range."""
        while True:
            busy = sorted((a, b) for a, b in self._inflight if _overlaps(start, end, a, b))
            for run_start, run_len in self._to_copy.dirty_extents(start, end - start):
                pos, run_end = run_start, run_start + run_len
                for a, b in busy:  # skip over the parts of this run that are in flight
                    if a <= pos < b:
                        pos = b
                    elif pos < a < run_end:
                        run_end = a
                if pos < run_end:
                    piece = (pos, min(run_end, pos + MAX_CHUNK))
                    self._inflight.append(piece)
                    return piece
            if not busy:
                return None
            self._cond.wait()

    def _copy_range(self, start: int, end: int) -> int:
        copied = 0
        while True:
            with self._cond:
                piece = self._claim(start, end)
            if piece is None:
                return copied
            pos, stop = piece
            try:
                self._copy_piece(pos, stop)
            except BaseException:
                with self._cond:
                    self._inflight.remove(piece)
                    self._cond.notify_all()
                raise
            with self._cond:
                self._inflight.remove(piece)
                self._to_copy.reset_range(pos, stop - pos)
                self.copied_bytes += stop - pos
                self._cond.notify_all()
            copied += stop - pos

    def _copy_piece(self, start: int, end: int) -> None:
        """Copy [start, end): zero extents as write_zeroes, the rest as data, neighbouring extents of one
        kind merged into one request."""
        for pos, stop, zero in self._extents(start, end):
            if zero:
                self._write_zeroes(pos, stop - pos)
                continue
            buffer = io_buffer(stop - pos)
            try:
                self.source.preadv(pos, [buffer])
            except (BlockError, OSError) as exc:
                raise _copy_error(exc, "read", pos, stop - pos) from exc
            try:
                if self._compressed_cluster:
                    self._write_compressed(pos, buffer)
                else:
                    self.target.pwritev(pos, [buffer])
            except (BlockError, OSError) as exc:
                raise _copy_error(exc, "write", pos, stop - pos) from exc

    def _extents(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """(start, end, zero) runs of the source over [start, end), by block_status when it is real."""
        if not self.source.capabilities.block_status:
            yield start, end, False
            return
        run_start, run_zero, pos = start, False, start
        while pos < end:
            try:
                status = self.source.block_status(pos, end - pos)
            except (BlockError, OSError) as exc:
                raise _copy_error(exc, "read", pos, end - pos) from exc
            stop = min(end, pos + max(1, status.length))
            if pos > run_start and status.zero != run_zero:
                yield run_start, pos, run_zero
                run_start = pos
            run_zero, pos = status.zero, stop
        yield run_start, end, run_zero

    def _write_compressed(self, offset: int, data: memoryview) -> None:
        """One compressed write per target cluster (pieces start on a copy cluster, a multiple of it)."""
        step = self._compressed_cluster
        write = getattr(self.target, "write_compressed")
        for start in range(0, len(data), step):
            write(offset + start, data[start:start + step])

    def _write_zeroes(self, offset: int, length: int) -> None:
        try:
            if self.target.capabilities.write_zeroes:
                self.target.write_zeroes(offset, length, may_unmap=False)
            else:
                for pos, zeros in zero_chunks(offset, length):
                    self.target.pwritev(pos, [zeros])
        except (BlockError, OSError) as exc:
            raise _copy_error(exc, "write", offset, length) from exc


def _copy_error(exc: BaseException, side: str, offset: int, length: int) -> BlockCopyError:
    code = getattr(exc, "errno", None)
    code = code if isinstance(code, int) and code > 0 else _errno.EIO
    what = "reading the source" if side == "read" else "writing the target"
    return BlockCopyError(f"block-copy: {what} at offset {offset} length {length} failed: {exc}", errno=code,
                          side=side, offset=offset, length=length)
