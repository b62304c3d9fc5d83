"""The mirror job (QMP ``blockdev-mirror``, ``drive-mirror``, and ``block-commit`` of the active layer).

A mirror copies a source node to a target while the guest goes on writing the source, until the two
converge; then it is *ready* (BLOCK_JOB_READY) and keeps them converged until ``job-complete`` switches the
drive onto the target (the pivot), or a soft ``block-job-cancel`` ends it leaving the target a consistent
copy of the moment of the cancel. QEMU 7.2's behaviour, checked with qemu-storage-daemon 7.2:

* events: created, running, ready + BLOCK_JOB_READY, then waiting, pending, BLOCK_JOB_COMPLETED, concluded,
  null -- also for a soft cancel of a ready job (block-job-cancel without force). ``job-cancel`` and a
  forced or not-yet-ready cancel abort: BLOCK_JOB_CANCELLED.
* ``len`` is the bytes found dirty (to copy) so far, ``offset`` those copied: a sync=full mirror of a 4 MiB
  node says 4 MiB, a commit of an empty overlay 0.
* a size mismatch is found when the job runs: it fails with "Source and target image have different sizes".

Tracking writes (background copy mode): a hidden dirty bitmap on the source node (QEMU's anonymous
bitmap, :meth:`~pyemu.block.dirty_bitmap.BitmapSet.add_hidden`) records every write that reaches the node
through a drive (:meth:`~pyemu.block.backend.BlockBackend._mark_dirty` marks after the write). The job
clears a cluster's bits *before* reading it, so a write that lands during the copy marks it again and it is
copied once more: the loop runs until the bitmap is empty.

``copy-mode=write-blocking`` (QEMU's active mirror): a ``mirror_top`` filter goes above the source in the
drive; the bitmap no longer records by itself -- the filter writes a guest write to the source and, when
every cluster it touches is already copied (clean), to the target too before completing it; otherwise it
marks them dirty. Job copies and filter writes of overlapping clusters exclude each other (a range lock),
so the target never receives a stale copy after a newer guest write.

Completion: once ``job-complete`` (or a soft cancel) has come and at most :data:`FINAL_SYNC_BYTES` are
dirty, the drive is drained (requests wait), the last dirty clusters are copied, and in the job's
prepare the drive's root is switched to the target (:meth:`~pyemu.block.backend.BlockBackend.change_root`);
the drain ends there. With ``auto-finalize=false`` the guest's I/O waits until ``job-finalize``, as in
QEMU (its mirror stays drained between run and prepare too).
"""

from __future__ import annotations

import contextlib
import errno
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pyemu.block import borrowed, graph
from pyemu.block.backing_link import backing_chain, unwrap
from pyemu.block.dirty_bitmap import DirtyBitmap, bitmaps_of
from pyemu.block.driver import BlockDriver, BlockStatus, check_request
from pyemu.block.filter_node import FilterOverFile
from pyemu.block.errors import BlockError
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.locking import BlockPerm
from pyemu.jobs.block_job import BlockJobEvents
from pyemu.jobs.job import EventSink, JobError, JobFailed, check_job_id, check_speed, error_text
from pyemu.system.buffers import io_buffer

MIRROR_SYNC_MODES = ("top", "full", "none")
COPY_MODES = ("background", "write-blocking")
ERROR_POLICIES = ("report", "ignore", "enospc", "stop", "auto")
MIN_GRANULARITY = 512
MAX_GRANULARITY = 64 << 20
DEFAULT_GRANULARITY = 64 << 10
DEFAULT_BUF_SIZE = 1 << 20
"""QEMU's DEFAULT_MIRROR_BUF_SIZE: bytes copied per step at most."""
FINAL_SYNC_BYTES = 16 << 20
"""Dirty bytes at most that a requested completion copies with the drive drained. QEMU drains only when
nothing is dirty, so a guest that dirties clusters faster than the job copies them keeps ``job-complete``
from ever finishing; copying up to this much with the guest's requests held back (tens of milliseconds)
always converges."""
IDLE_POLL = 0.05
"""Seconds a ready (or converged) job waits before looking at the dirty bitmap again (QEMU polls too)."""
ERROR_RETRY_DELAY = 0.1

_busy_lock = threading.Lock()
_busy: dict[int, tuple[str, str]] = {}
"""id() of the nodes a running mirror or commit job uses: QEMU's op blockers against a second job."""


class MirrorError(BlockError):
    """blockdev-mirror / drive-mirror / block-commit refused; the message is QEMU 7.2's."""


@dataclass
class MirrorOptions:
    """The job's arguments, checked (:func:`parse_options`)."""

    job_id: str
    device: str
    target_name: str
    sync: str = "full"
    granularity: int = 0
    buf_size: int = DEFAULT_BUF_SIZE
    speed: int = 0
    on_source_error: str = "report"
    on_target_error: str = "report"
    unmap: bool = True
    copy_mode: str = "background"
    auto_finalize: bool = True
    auto_dismiss: bool = True
    filter_node_name: str | None = None
    job_type: str = "mirror"


def parse_options(args: dict[str, Any], *, job_type: str = "mirror") -> MirrorOptions:
    """Check the mirror arguments QEMU checks before looking at nodes (its messages)."""
    sync = str(args.get("sync", "full"))
    if sync not in MIRROR_SYNC_MODES:
        raise MirrorError(f"Sync mode '{sync}' not supported")
    granularity = args.get("granularity", 0)
    if not isinstance(granularity, int) or isinstance(granularity, bool):
        raise MirrorError("Invalid parameter type for 'granularity', expected: integer")
    if granularity:
        if granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY:
            raise MirrorError("Parameter 'granularity' expects a value in range [512B, 64MB]")
        if granularity & (granularity - 1):
            raise MirrorError("Parameter 'granularity' expects a power of 2")
    buf_size = args.get("buf-size", DEFAULT_BUF_SIZE)
    if not isinstance(buf_size, int) or isinstance(buf_size, bool) or buf_size < 0:
        raise MirrorError("Invalid parameter 'buf-size'")
    speed = args.get("speed", 0)
    try:
        check_speed(speed)
    except JobError as exc:
        raise MirrorError(str(exc)) from None
    policies = []
    for key in ("on-source-error", "on-target-error"):
        value = str(args.get(key, "report"))
        if value not in ERROR_POLICIES:
            raise MirrorError(f"Parameter '{key}' does not accept value '{value}'")
        policies.append(value)
    copy_mode = str(args.get("copy-mode", "background"))
    if copy_mode not in COPY_MODES:
        raise MirrorError(f"Parameter 'copy-mode' does not accept value '{copy_mode}'")
    return MirrorOptions(job_id=str(args.get("job-id", "")), device=str(args.get("device", "")),
                         target_name=str(args.get("target", "")), sync=sync, granularity=granularity,
                         buf_size=buf_size or DEFAULT_BUF_SIZE, speed=speed, on_source_error=policies[0],
                         on_target_error=policies[1], unmap=bool(args.get("unmap", True)), copy_mode=copy_mode,
                         auto_finalize=bool(args.get("auto-finalize", True)),
                         auto_dismiss=bool(args.get("auto-dismiss", True)),
                         filter_node_name=args.get("filter-node-name"), job_type=job_type)


class _CopyError(BlockError):
    def __init__(self, message: str, *, side: str, err: int) -> None:
        super().__init__(message)
        self.side = side
        self.errno = err


class RangeLocks:
    """Byte ranges held by a job copy or an active (write-blocking) guest write: overlapping holders wait."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def hold(self, start: int, end: int) -> Iterator[None]:
        with self._cond:
            while any(start < b and a < end for a, b in self._held):
                self._cond.wait()
            entry = (start, end)
            self._held.append(entry)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(entry)
                self._cond.notify_all()


class MirrorTop(FilterOverFile):
    """The ``mirror_top`` filter of a write-blocking mirror: guest writes reach the target synchronously
    once their clusters were copied (see the module doc)."""

    name = "mirror_top"

    def __init__(self, below: BlockDriver, job: "MirrorJob") -> None:
        self.file = below
        self._job = job
        self._attachment = graph.attach(below, user=f"mirror job '{job.id}'", role="file",
                                        perm=BlockPerm.CONSISTENT_READ | BlockPerm.WRITE,
                                        shared=BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED)

    def size(self) -> int:
        return self.file.size()

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.file.preadv(offset, buffers)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return self.file.block_status(offset, length)

    def flush(self) -> None:
        self.file.flush()
        self._job.target.flush()

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        views = byte_views(buffers, writable=False)
        length = total_length(views)
        check_request(offset, length, self.size(), what="write")
        self._job.active_write(offset, length, lambda node: node.pwritev(offset, views))

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        check_request(offset, length, self.size(), what="write-zeroes")
        self._job.active_write(offset, length, lambda node: node.write_zeroes(offset, length, may_unmap=may_unmap))

    def discard(self, offset: int, length: int) -> None:
        check_request(offset, length, self.size(), what="discard")
        # A discard leaves the source's contents undefined: the cluster is simply copied again.
        self.file.discard(offset, length)
        self._job.mark_dirty(offset, length)

    def close(self) -> None:
        self._attachment.detach()


class MirrorJob(BlockJobEvents):
    """One mirror (or active commit). Build with :func:`create_mirror`; :meth:`start` runs it."""

    def __init__(self, opts: MirrorOptions, *, source: BlockDriver, target: BlockDriver, backends: list[Any],
                 emit: EventSink, base: BlockDriver | None = None) -> None:
        super().__init__(opts.job_id, emit=emit, auto_finalize=opts.auto_finalize,
                         auto_dismiss=opts.auto_dismiss, speed=opts.speed)
        self.job_type = opts.job_type
        self.opts = opts
        self.source = source
        self.target = target
        self.base = base
        """Active commit: the node the copy stops at (clusters allocated above it are copied)."""
        self._backends = backends
        self._granularity = opts.granularity or max(DEFAULT_GRANULARITY, _cluster_size(target))
        self._bitmap = DirtyBitmap("", source.size(), self._granularity, enabled=opts.copy_mode == "background")
        self._locks = RangeLocks()
        self._filter: MirrorTop | None = None
        self._complete_requested = False
        self._soft_cancel = False
        self._pivot = False
        self._drain: contextlib.ExitStack | None = None
        self._target_active = False
        self._released = False
        self.target_is_zero = False
        self.pivot_hooks: list[Callable[[], None]] = []
        """Run after the pivot, drained (drive-mirror sync=none links the new image onto the source)."""
        """drive-mirror's freshly created target reads zeros: a sync=full copy skips the source's zero areas."""
        self.on_release: list[Callable[[], None]] = []
        """Run when the job lets go of its nodes (the monitor lifts its blockdev-del blockers there)."""

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Take the nodes (op blockers), attach the hidden bitmap and, for write-blocking, the filter."""
        try:
            with _busy_lock:
                if id(unwrap(self.source)) in _busy:
                    # QEMU: the running job's filter sits above the source, so it is no root node any more.
                    raise MirrorError("Need a root block node")
                if id(unwrap(self.target)) in _busy:
                    raise MirrorError(f"Node '{_label(self.target, self.opts.target_name)}' is busy: block device is "
                                      f"in use by block job: {_busy[id(unwrap(self.target))][1]}")
                _busy[id(unwrap(self.source))] = (self.id, self.job_type)
                _busy[id(unwrap(self.target))] = (self.id, self.job_type)
            borrowed.activate(self.target)
            self._target_active = True
            bitmaps_of(unwrap(self.source)).add_hidden(self._bitmap)
            if self.opts.copy_mode == "write-blocking":
                if len(self._backends) > 1:
                    raise MirrorError(f"Node '{self.opts.device}' is used by several drives; cannot insert the "
                                      "mirror filter")
                if self._backends:
                    self._filter = self._backends[0].insert_filter(lambda below: MirrorTop(below, self))
        except BaseException:
            self._release()
            raise

    @property
    def filter_node(self) -> "MirrorTop | None":
        """The write-blocking filter above the source (None in background mode or once removed)."""
        return self._filter

    # -- the guest's path in write-blocking mode ------------------------------------------------------------
    def mark_dirty(self, offset: int, length: int) -> None:
        if length > 0:
            self._bitmap.set_range(offset, length)

    def _update_progress(self) -> None:
        """QEMU's len: what was copied plus what is dirty now (it grows with the guest's writes)."""
        with self._cond:
            self.total_progress = self.current_progress + self._bitmap.count()

    def active_write(self, offset: int, length: int, write: Callable[[BlockDriver], None]) -> None:
        """Write to the source; if every touched cluster is clean, to the target too (write-blocking)."""
        g = self._granularity
        start, end = offset - offset % g, min(self._bitmap.size, -(-(offset + length) // g) * g)
        with self._locks.hold(start, end):
            write(self.source)
            if not self._released and not any(True for _ in self._bitmap.dirty_extents(start, end - start)):
                try:
                    write(self.target)
                    return
                except (BlockError, OSError):
                    pass  # the job copies the range again (and meets the error under its own policy)
            self.mark_dirty(offset, length)

    # -- the work -------------------------------------------------------------------------------------------
    def run(self) -> None:
        if self.source.size() != self.target.size():
            raise JobFailed("Source and target image have different sizes")
        self._initial_dirty()
        while True:
            self.pause_point()
            if self._finishing() and self._bitmap.count() <= FINAL_SYNC_BYTES:
                if self._final_sync():
                    return
                continue
            found = self._next_dirty()
            if found is not None:
                self._copy_step(*found)
                continue
            if self.status.value not in ("ready", "standby"):
                self.set_ready()
            if not self._finishing():
                self.sleep(IDLE_POLL)

    def _finishing(self) -> bool:
        """``job-complete`` or a soft cancel has come (both only once the job is ready)."""
        with self._cond:
            return self._complete_requested or self._soft_cancel

    def _initial_dirty(self) -> None:
        """Mark what the copy must cover: everything (full), what the top allocates (top), what the layers
        above ``base`` allocate (active commit), nothing (none)."""
        size = self._bitmap.size
        if self.opts.sync == "none":
            return
        if self.opts.sync == "full" and self.base is None:
            if self._target_zeroed():
                pos = 0
                while pos < size:  # a freshly created target reads zeros: skip the source's zero areas
                    self.pause_point()
                    status = self.source.block_status(pos, size - pos)
                    step = max(1, status.length)
                    if not status.zero:
                        self.mark_dirty(pos, step)
                    pos += step
            else:
                self.mark_dirty(0, size)
            return
        layers = [unwrap(self.source)]
        if self.base is not None:
            layers = []
            for node in backing_chain(self.source):
                if node is unwrap(self.base):
                    break
                layers.append(node)
        for layer in layers:
            pos = 0
            while pos < size:
                self.pause_point()
                status = layer.block_status(pos, size - pos)
                step = max(1, status.length)
                if status.allocated:
                    self.mark_dirty(pos, step)
                pos += step

    def _target_zeroed(self) -> bool:
        return self.target_is_zero

    def _next_dirty(self) -> tuple[int, int] | None:
        for start, length in self._bitmap.dirty_extents(0, self._bitmap.size):
            return start, min(length, max(self.opts.buf_size, self._granularity))
        return None

    def _copy_step(self, start: int, length: int) -> None:
        try:
            self._copy(start, length)
        except _CopyError as exc:
            action = self.report_error(read=exc.side == "read", err=exc.errno)
            if action == "report":
                raise JobFailed(error_text(exc)) from exc
            if action == "ignore":
                self.sleep(ERROR_RETRY_DELAY)
            return
        with self._cond:
            self.current_progress += length
        self.rate_limit(length)

    def _copy(self, start: int, length: int) -> None:
        """Copy [start, start+length) under the range lock, clearing its bits first (see the module doc);
        on failure the bits are set again."""
        end = start + length
        with self._locks.hold(start, end):
            self._bitmap.reset_range(start, length)
            try:
                pos = start
                while pos < end:
                    try:
                        status = self.source.block_status(pos, end - pos)
                    except (BlockError, OSError) as exc:
                        raise _CopyError(str(exc), side="read", err=_errno(exc)) from exc
                    stop = min(end, pos + max(1, status.length))
                    if status.zero and self.target.capabilities.write_zeroes:
                        try:
                            self.target.write_zeroes(pos, stop - pos, may_unmap=self.opts.unmap)
                        except (BlockError, OSError) as exc:
                            raise _CopyError(str(exc), side="write", err=_errno(exc)) from exc
                    else:
                        buffer = io_buffer(stop - pos)
                        try:
                            self.source.preadv(pos, [buffer])
                        except (BlockError, OSError) as exc:
                            raise _CopyError(str(exc), side="read", err=_errno(exc)) from exc
                        try:
                            self.target.pwritev(pos, [buffer])
                        except (BlockError, OSError) as exc:
                            raise _CopyError(str(exc), side="write", err=_errno(exc)) from exc
                    pos = stop
            except BaseException:
                self._bitmap.set_range(start, length)
                raise

    def _final_sync(self) -> bool:
        """Drain the drives and copy what is still dirty; True (drain kept until prepare/clean) when the
        target has converged, False (drain let go) to go round the loop again after an error."""
        stack = contextlib.ExitStack()
        for backend in self._backends:
            stack.enter_context(backend.drained())
        try:
            while True:
                found = self._next_dirty()
                if found is None:
                    break
                self._copy(*found)
                with self._cond:
                    self.current_progress += found[1]
            self.target.flush()
        except _CopyError as exc:
            stack.close()
            action = self.report_error(read=exc.side == "read", err=exc.errno)
            if action == "report":
                raise JobFailed(error_text(exc)) from exc
            return False
        except BaseException:
            stack.close()
            raise
        self._drain = stack
        return True

    def report_error(self, *, read: bool, err: int) -> str:
        """on-source-error/on-target-error (QEMU's policies; ``stop`` pauses the job)."""
        return self.apply_error_policy(self.opts.on_source_error if read else self.opts.on_target_error,
                                       read=read, err=err)

    # -- verbs ----------------------------------------------------------------------------------------------
    def complete(self) -> None:
        with self._cond:
            self._complete_requested = True
            self._pivot = True
            self._wakeups += 1
            self._cond.notify_all()

    def cancel(self, *, force: bool = False) -> None:
        """A soft cancel (block-job-cancel without force) of a ready job ends it with a consistent copy and
        no pivot (BLOCK_JOB_COMPLETED, as QEMU); anything else aborts."""
        with self._cond:
            if not force and self.status.value in ("ready", "standby"):
                self._apply_verb("cancel")
                self._soft_cancel = True
                if self.user_paused:
                    self.user_paused = False
                    self._pause_count = max(0, self._pause_count - 1)
                self._wakeups += 1
                self._cond.notify_all()
                return
        super().cancel(force=force)

    # -- the end --------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Pivot the drives onto the target (job-complete), still drained since the final sync."""
        if not self._pivot:
            return
        self._remove_filter()
        self.before_pivot()
        for backend in self._backends:
            try:
                backend.change_root(self.target)
            except BlockError as exc:
                raise MirrorError(f"Could not switch drive '{backend.id}' to the target: {exc}") from exc
        self.after_pivot()

    def before_pivot(self) -> None:
        """Hook for active commit (let the drive write the base)."""

    def after_pivot(self) -> None:
        """The drive now runs on the target (still drained): run :attr:`pivot_hooks`."""
        for hook in self.pivot_hooks:
            hook()

    def clean(self) -> None:
        self._release()

    def _remove_filter(self) -> None:
        filt, self._filter = self._filter, None
        if filt is not None and self._backends:
            self._backends[0].remove_filter(filt)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self._remove_filter()
        finally:
            if self._drain is not None:
                self._drain.close()
                self._drain = None
            bitmaps_of(unwrap(self.source)).remove_hidden(self._bitmap)
            if self._target_active:
                borrowed.deactivate(self.target)
                self._target_active = False
            with _busy_lock:
                for node in (self.source, self.target):
                    if _busy.get(id(unwrap(node)), ("", ""))[0] == self.id:
                        del _busy[id(unwrap(node))]
            for release in self.on_release:
                release()

    # -- events and info (BlockJobEvents; len is recomputed from the bitmap first) --------------------------
    def _block_event_data(self) -> dict[str, Any]:
        self._update_progress()
        return super()._block_event_data()

    def info(self) -> dict[str, Any]:
        self._update_progress()
        return super().info()

    def block_info(self) -> dict[str, Any]:
        self._update_progress()
        return super().block_info()


def _errno(exc: BaseException) -> int:
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) and code > 0 else errno.EIO


def _cluster_size(node: object) -> int:
    size = getattr(unwrap(node), "cluster_size", 0)
    return size if isinstance(size, int) else 0


def _label(node: object, fallback: str) -> str:
    return str(getattr(unwrap(node), "node_name", None) or fallback)


def create_mirror(args: dict[str, Any], *, resolve: Callable[[str], BlockDriver],
                  backends_of: Callable[[object], list[Any]], emit: EventSink, check_id: Callable[[str], None],
                  target: BlockDriver | None = None) -> MirrorJob:
    """Check blockdev-mirror's arguments and build the job (bitmap and filter in place), not started.
    ``target`` is given by drive-mirror (the image it created); else ``args['target']`` is resolved."""
    if args.get("replaces") is not None:
        raise MirrorError(f"Failed to find node with node-name='{args['replaces']}'")
    opts = parse_options(args)
    source = resolve(opts.device)
    if target is None:
        target = resolve(opts.target_name)
    if unwrap(source) is unwrap(target):
        raise MirrorError("Can't mirror node into itself")
    backends = backends_of(source)
    if not opts.job_id:
        opts.job_id = next((str(b.id) for b in backends if getattr(b, "id", "")), opts.device)
    try:
        check_job_id(opts.job_id)
        check_id(opts.job_id)
    except JobError as exc:
        raise MirrorError(str(exc)) from None
    if target.read_only:
        raise MirrorError("Could not create node: Block node is read-only")
    return build_job(opts, source=source, target=target, backends=backends, emit=emit)


def build_job(opts: MirrorOptions, *, source: BlockDriver, target: BlockDriver, backends: list[Any],
              emit: EventSink, base: BlockDriver | None = None, cls: type[MirrorJob] = MirrorJob,
              **extra: Any) -> MirrorJob:
    """The job, set up; a setup failure drops it (created -> null) and raises MirrorError."""
    job = cls(opts, source=source, target=target, backends=backends, emit=emit, base=base, **extra)
    try:
        job.setup()
    except BaseException as exc:
        job.drop()
        if isinstance(exc, MirrorError):
            raise
        if isinstance(exc, BlockError):
            raise MirrorError(str(exc)) from None
        raise
    return job


__all__ = ["MirrorError", "MirrorJob", "MirrorOptions", "MirrorTop", "RangeLocks", "build_job", "create_mirror",
           "parse_options"]
