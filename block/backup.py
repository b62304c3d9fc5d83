"""The backup job (QMP ``blockdev-backup``): copy a node to a target as it was when the job started.

Point in time, as QEMU's backup: the job puts a copy-before-write filter above the source in the drive
that writes it (:meth:`~pyemu.block.backend.BlockBackend.insert_filter`), sharing one
:class:`~pyemu.block.block_copy.BlockCopy` with it. A guest write to a cluster the job has not copied yet
makes the filter copy the old data first; the job walks the rest. Each cluster is copied once, by whoever
comes first; a guest write waits only for an in-flight copy of the clusters it touches -- at most one job
step, :data:`JOB_STEP` bytes by default (QEMU's block-copy task limit, BLOCK_COPY_MAX_BUFFER, is the same 1
MiB), or one cluster with ``x-perf.max-chunk`` set to the cluster size. Steps of one 64 KiB cluster were
measured at half the throughput (about 550 against 950 MB/s, raw to qcow2 in the page cache): the Python
cost per request, not the disk, sets the pace. A source no drive writes still gets the filter: it holds the writer's permission, so nothing else
can change the source under the job.

Sync modes: ``full`` copies everything, ``top`` skips what the source's top layer does not allocate,
``bitmap`` (``incremental`` = bitmap + on-success) only the clusters of a dirty bitmap, ``none`` copies
only what the filter copies (old data of written clusters) and runs until cancelled.

The bitmap is busy while the job runs. At the start its bits are taken (the BlockCopy's to-copy set for
sync=bitmap) and the bitmap is cleared, so from then on it records exactly the guest writes made during the
job; at the end: ``on-success`` keeps only those if the job succeeded, else ORs the original bits back;
``never`` always ORs them back; ``always`` ORs back what was not copied.

Messages are QEMU 7.2's (checked with qemu-storage-daemon).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from pyemu.block import borrowed
from pyemu.block.block_copy import BlockCopy, BlockCopyError
from pyemu.block.copy_before_write import CopyBeforeWrite
from pyemu.block.dirty_bitmap import DirtyBitmap, bitmaps_of, check_modifiable, BitmapError
from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.jobs.block_job import BlockJobEvents
from pyemu.jobs.job import EventSink, JobError, JobFailed, check_job_id, check_speed, error_text

SYNC_MODES = ("top", "full", "none", "incremental", "bitmap")
BITMAP_MODES = ("on-success", "never", "always")
ERROR_POLICIES = ("report", "ignore", "enospc", "stop", "auto")
MAX_WORKERS = (1 << 31) - 1
IGNORED_ERROR_RETRY_DELAY = 0.1
"""Seconds before a job with on-*-error=ignore goes back for the clusters that failed."""
JOB_STEP = 1 << 20
"""Bytes the job copies per step (and so at most the copy a guest write may have to wait for)."""

_busy_lock = threading.Lock()
_busy: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()
"""Nodes a running backup job uses (source and target): QEMU's op blockers for a second job on them."""


class BackupError(BlockError):
    """blockdev-backup refused; the message is QEMU's."""


def _unwrap(node: object) -> object:
    while isinstance(node, borrowed.BorrowedNode):
        node = node.node
    return node


def _label(node: object, fallback: str) -> str:
    return str(getattr(node, "node_name", None) or fallback)


@dataclass
class BackupOptions:
    """blockdev-backup's arguments, checked (see :func:`parse_options`)."""

    job_id: str
    device: str
    target_name: str
    sync: str
    speed: int = 0
    bitmap_mode: str | None = None
    compress: bool = False
    on_source_error: str = "report"
    on_target_error: str = "report"
    auto_finalize: bool = True
    auto_dismiss: bool = True
    filter_node_name: str | None = None
    max_chunk: int = 0
    max_workers: int = 64


def parse_options(args: dict[str, Any]) -> BackupOptions:
    """The checks QEMU makes before it looks at any node."""
    sync = args["sync"]
    if sync not in SYNC_MODES:
        raise BackupError(f"Parameter 'sync' does not accept value '{sync}'")
    speed = int(args.get("speed", 0))
    try:
        check_speed(speed)
    except JobError as exc:
        raise BackupError(str(exc)) from None
    perf = args.get("x-perf") or {}
    max_chunk = int(perf.get("max-chunk", 0))
    max_workers = int(perf.get("max-workers", 64))
    if max_chunk < 0:
        raise BackupError("max-chunk must be zero (which means no limit) or positive")
    if not 1 <= max_workers <= MAX_WORKERS:
        raise BackupError(f"max-workers must be between 1 and {MAX_WORKERS}")
    return BackupOptions(job_id=args.get("job-id", ""), device=args["device"], target_name=args["target"],
                         sync=sync, speed=speed, bitmap_mode=args.get("bitmap-mode"),
                         compress=bool(args.get("compress", False)),
                         on_source_error=args.get("on-source-error", "report"),
                         on_target_error=args.get("on-target-error", "report"),
                         auto_finalize=bool(args.get("auto-finalize", True)),
                         auto_dismiss=bool(args.get("auto-dismiss", True)),
                         filter_node_name=args.get("filter-node-name"), max_chunk=max_chunk,
                         max_workers=max_workers)


def check_bitmap(opts: BackupOptions, source: object, bitmap_name: str | None) -> DirtyBitmap | None:
    """QEMU's bitmap argument rules, in QEMU's order; returns the bitmap (sync incremental -> bitmap)."""
    if opts.sync in ("bitmap", "incremental") and not bitmap_name:
        raise BackupError(f"must provide a valid bitmap name for '{opts.sync}' sync mode")
    bitmap: DirtyBitmap | None = None
    if bitmap_name:
        bitmap = _find_bitmap(source, bitmap_name)
        if bitmap is None:
            raise BackupError(f"Bitmap '{bitmap_name}' could not be found")
        if opts.sync == "incremental":
            if opts.bitmap_mode is None:
                opts.bitmap_mode = "on-success"
            if opts.bitmap_mode != "on-success":
                raise BackupError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
            opts.sync = "bitmap"
        if opts.bitmap_mode is None:
            raise BackupError("Bitmap sync mode must be given when providing a bitmap")
        if opts.sync == "none":
            raise BackupError("sync mode 'none' does not produce meaningful bitmap outputs")
        try:
            check_modifiable(bitmap)
        except BitmapError as exc:
            raise BackupError(str(exc)) from None
    elif opts.bitmap_mode is not None:
        raise BackupError("Cannot specify bitmap sync mode without a bitmap")
    return bitmap


def _find_bitmap(node: object, name: str) -> DirtyBitmap | None:
    """The bitmap on ``node`` or, through filters and borrowed edges, the node below it."""
    seen = 0
    current: object | None = node
    while current is not None and seen < 64:
        found = bitmaps_of(current).get(name) if current is not None else None
        if found is not None:
            return found
        if isinstance(current, borrowed.BorrowedNode):
            current = current.node
        else:
            current = getattr(current, "filtered_child", None)
        seen += 1
    return None


class BackupJob(BlockJobEvents):
    """One ``blockdev-backup``. Build with :func:`create_backup`; :meth:`start` runs it."""

    job_type = "backup"

    def __init__(self, opts: BackupOptions, *, source: BlockDriver, target: BlockDriver,
                 bitmap: DirtyBitmap | None, backends: list[Any], emit: EventSink) -> None:
        super().__init__(opts.job_id, emit=emit, auto_finalize=opts.auto_finalize,
                         auto_dismiss=opts.auto_dismiss, speed=opts.speed)
        self.opts = opts
        self.source = source
        self.target = target
        self.bitmap = bitmap
        self.io_status = "ok"
        self._backends = backends
        self._filter: CopyBeforeWrite | None = None
        self._filter_backend: Any = None
        self._original_bits: bytes | None = None
        self._skipped = 0
        self._cleaned = False
        self._target_active = False
        self.block_copy: BlockCopy | None = None
        self.on_release: list[Callable[[], None]] = []
        """Run when the job lets go of its nodes (the monitor lifts its blockdev-del blockers there)."""

    # -- setup (in the QMP thread, before start) -------------------------------------------------------
    def setup(self) -> None:
        """Take the point in time: the BlockCopy, the filter above the source, the bitmap. Undone by
        :meth:`clean` (a failure here leaves nothing behind)."""
        try:
            self._setup()
        except BaseException:
            self._release()
            raise

    def _setup(self) -> None:
        """Take the point in time: with the source's drives drained, so no guest write lands between
        reading the bitmap, inserting the filter and restarting the bitmap (QEMU does all of it in one
        drained section too)."""
        with contextlib.ExitStack() as drained:
            for backend in self._backends:
                drained.enter_context(backend.drained())
            self._setup_drained()

    def _setup_drained(self) -> None:
        copy_bitmap = self.bitmap if self.opts.sync == "bitmap" else None
        self.block_copy = BlockCopy(self.source, self.target, bitmap=copy_bitmap, compress=self.opts.compress)
        if self.opts.max_chunk and self.opts.max_chunk < self.block_copy.cluster_size:
            raise BackupError(f"Required max-chunk ({self.opts.max_chunk}) is less than backup cluster size "
                              f"({self.block_copy.cluster_size})")
        with _busy_lock:
            for node, name in ((self.target, self.opts.target_name), (self.source, self.opts.device)):
                if _unwrap(node) in _busy:
                    raise BackupError(f"Node '{_label(node, name)}' is busy: block device is in use by block "
                                      "job: backup")
            _busy[_unwrap(self.source)] = self.id
            _busy[_unwrap(self.target)] = self.id
        borrowed.activate(self.target)
        self._target_active = True
        user = f"backup job '{self.id}'"
        block_copy = self.block_copy

        def make(below: BlockDriver) -> BlockDriver:
            return CopyBeforeWrite(below, self.target, block_copy=block_copy, owns_children=False, user=user)

        if len(self._backends) > 1:
            raise BackupError(f"Node '{self.opts.device}' is used by several drives; cannot insert the backup "
                              "filter")
        if self._backends:
            backend = self._backends[0]
            self._filter = backend.insert_filter(make)  # type: ignore[assignment]
            self._filter_backend = backend
        else:
            self._filter = make(self.source)  # type: ignore[assignment]
        if self.bitmap is not None:
            self.bitmap.busy = True
            self._original_bits = self.bitmap.take_bits()  # from now on it records the job-time writes
        self.total_progress = block_copy.remaining()

    @property
    def filter_node(self) -> BlockDriver | None:
        """The copy-before-write filter the job put above its source (None once removed)."""
        return self._filter

    # -- the work --------------------------------------------------------------------------------------
    def run(self) -> None:
        copy = self.block_copy
        assert copy is not None
        if self.opts.sync == "none":
            self.wait_until_cancelled()
            return
        chunk = max(copy.cluster_size, self.opts.max_chunk or JOB_STEP)
        offset = 0
        while True:
            self.pause_point()
            found = copy.next_dirty(offset)
            if found is None:
                if copy.remaining() == 0:
                    break
                # Clusters left behind by an ignored error: retry them, as QEMU does -- after a pause, so a
                # failing disk does not turn the retries into a busy loop (QEMU retries at once).
                offset = 0
                self.sleep(IGNORED_ERROR_RETRY_DELAY)
                continue
            pos, length = found
            length = min(length, chunk)
            try:
                if self.opts.sync == "top":
                    skipped = copy.skip_unallocated(pos, length)
                    self._skipped += skipped
                    if skipped:
                        self._update_progress()
                        offset = pos
                        continue
                done = copy.copy(pos, length)
            except BlockCopyError as exc:
                read = exc.side == "read"
                action = self.report_error(read=read, err=exc.errno)
                if action == "report":
                    raise JobFailed(error_text(exc)) from exc
                offset = pos + length if action == "ignore" else pos
                continue
            self._update_progress()
            offset = pos + length
            self.rate_limit(done)
        self._update_progress()

    def _update_progress(self) -> None:
        copy = self.block_copy
        if copy is not None:
            with self._cond:
                self.current_progress = min(self.total_progress, copy.copied_bytes + self._skipped)

    def report_error(self, *, read: bool, err: int) -> str:
        """Apply on-source-error/on-target-error (:meth:`BlockJobEvents.apply_error_policy`)."""
        return self.apply_error_policy(self.opts.on_source_error if read else self.opts.on_target_error,
                                       read=read, err=err)

    # -- the end ------------------------------------------------------------------------------------------
    def commit(self) -> None:
        self._finish_bitmap(success=True)

    def abort(self) -> None:
        self._finish_bitmap(success=False)

    def clean(self) -> None:
        self._release()

    def _finish_bitmap(self, *, success: bool) -> None:
        bitmap, original = self.bitmap, self._original_bits
        if bitmap is None or original is None:
            return
        self._original_bits = None
        mode = self.opts.bitmap_mode
        if mode == "never" or (mode == "on-success" and not success):
            bitmap.merge_bits(original)
        elif mode == "always" and not success and self.block_copy is not None:
            for start, length in self.block_copy.to_copy_extents():
                bitmap.set_range(start, length)

    def _release(self) -> None:
        """Remove the filter, let go of the bitmap and the nodes (idempotent)."""
        if self._cleaned:
            return
        self._cleaned = True
        filt, backend = self._filter, self._filter_backend
        self._filter = self._filter_backend = None
        try:
            if filt is not None:
                if backend is not None:
                    backend.remove_filter(filt)
                else:
                    filt.close()
            if self.block_copy is not None:
                self.block_copy.drain()
            # No flush of the target here: as QEMU's backup, the data is durable once the target node is
            # flushed or closed (blockdev-del syncs it); a job's end is not a durability point.
        finally:
            if self.bitmap is not None:
                if self._original_bits is not None:  # setup failed half-way: put the bits back
                    self.bitmap.merge_bits(self._original_bits)
                    self._original_bits = None
                self.bitmap.busy = False
            if self._target_active:
                borrowed.deactivate(self.target)
                self._target_active = False
            with _busy_lock:
                for node in (self.source, self.target):
                    if _busy.get(_unwrap(node)) == self.id:
                        del _busy[_unwrap(node)]
            for release in self.on_release:
                release()


def create_backup(args: dict[str, Any], *, resolve: Callable[[str], BlockDriver], backends_of: Callable[[object], list[Any]],
                  emit: EventSink, check_id: Callable[[str], None], node_name_taken: Callable[[str], bool]) -> BackupJob:
    """Check blockdev-backup's arguments and build the job with its point in time taken (filter in place,
    bitmap busy), not started. ``resolve`` turns a node argument into a node (raising the lookup error),
    ``backends_of`` lists the drives whose root is a node, ``check_id`` refuses a taken job id."""
    opts = parse_options(args)
    source = resolve(opts.device)
    target = resolve(opts.target_name)
    if _unwrap(source) is _unwrap(target):
        raise BackupError("Source and target cannot be the same")
    bitmap = check_bitmap(opts, source, args.get("bitmap"))
    if opts.compress and not hasattr(_unwrap(target), "write_compressed"):
        raise BackupError("Compression is not supported for this drive ")
    backends = backends_of(source)
    if not opts.job_id:  # QEMU: the source's BlockBackend name; a node without one has none ('')
        opts.job_id = next((str(b.id) for b in backends if getattr(b, "id", "")), "")
    try:
        check_job_id(opts.job_id)
        check_id(opts.job_id)
    except JobError as exc:
        raise BackupError(str(exc)) from None
    if source.size() != target.size():
        raise BackupError("Source and target image have different sizes")
    if target.read_only:
        raise BackupError("Could not create node: Block node is read-only")
    if opts.filter_node_name is not None and node_name_taken(opts.filter_node_name):
        raise BackupError(f"Could not create node: Duplicate nodes with node-name='{opts.filter_node_name}'")
    job = BackupJob(opts, source=source, target=target, bitmap=bitmap, backends=backends, emit=emit)
    try:
        job.setup()
    except BaseException as exc:
        job.drop()
        if isinstance(exc, BackupError):
            raise
        if isinstance(exc, BlockError):
            raise BackupError(str(exc)) from None
        raise
    return job
