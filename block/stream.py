"""The block-stream job (QMP ``block-stream``): copy the backing chain's data into the top image, then drop
the backing link (to ``base``, or to nothing).

As QEMU 7.2's stream job, the copying goes through a copy-on-read filter (:mod:`pyemu.block.copy_on_read`)
put above the top image in the drive that uses it: the job asks the filter to *populate* each step of the
disk, and the filter copies only clusters the top still does not allocate, under its per-cluster range
lock. A guest write to a cluster is therefore never overwritten by stale backing data: either it lands
first (the cluster is allocated, nothing is copied) or it waits for the one step being copied. At the end
(QEMU's stream_prepare) the top's header names ``base`` (``backing-file`` when given) and its in-memory
backing child becomes ``base`` (:func:`pyemu.block.backing_link.change_backing`).
"""

from __future__ import annotations

import errno
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from pyemu.block import graph
from pyemu.block.backing_link import backing_chain, backing_of, change_backing, unwrap
from pyemu.block.copy_on_read import CopyOnRead, insert_into_drive
from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError, BlockIOError
from pyemu.block.locking import BlockPerm
from pyemu.block.registry import NodeRegistry
from pyemu.block.reopen import ReadWriteHold, ReopenError
from pyemu.jobs.block_job import BlockJobEvents
from pyemu.jobs.job import EventSink, check_job_id

STREAM_STEP = 1 << 20
"""Bytes populated per step (a guest write waits for at most one such step of its own clusters)."""
ERROR_POLICIES = ("report", "ignore", "enospc", "stop", "auto")

_busy_lock = threading.Lock()
_busy: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()
"""Top images a stream job works on, with the job type (QEMU's op blocker for a second job on them)."""


class StreamError(BlockError):
    """block-stream refused; the message is QEMU's."""


@dataclass(frozen=True)
class StreamOptions:
    job_id: str
    device: str
    base: BlockDriver | None
    backing_file: str | None
    speed: int
    on_error: str
    auto_finalize: bool
    auto_dismiss: bool
    filter_node_name: str | None


class StreamJob(BlockJobEvents):
    """One block-stream. Build with :func:`create_stream`; :meth:`start` runs it."""

    job_type = "stream"

    def __init__(self, opts: StreamOptions, *, top: BlockDriver, backends: list[Any], emit: EventSink,
                 registry: NodeRegistry | None) -> None:
        super().__init__(opts.job_id, emit=emit, auto_finalize=opts.auto_finalize,
                         auto_dismiss=opts.auto_dismiss, speed=opts.speed)
        self.opts = opts
        self.top = top
        self._backends = backends
        self._registry = registry
        self.filter: CopyOnRead | None = None
        self._filter_backend: Any = None
        self.on_release: list[Callable[[], None]] = []
        self._unshare: Callable[[], None] | None = None
        self.total_progress = unwrap(top).size()
        self.copied_bytes = 0
        """Bytes the job wrote into the top (clusters the guest wrote first are not copied)."""

    def setup(self) -> None:
        """Put the copy-on-read filter (bottom = base, no population on guest reads) above the top and mark
        the top busy; undone by :meth:`clean`."""
        user = f"stream job '{self.id}'"
        with _busy_lock:
            if unwrap(self.top) in _busy:
                raise StreamError(f"Node '{self.opts.device}' is busy: block device is in use by block job: "
                                  f"{_busy[unwrap(self.top)]}")
            _busy[unwrap(self.top)] = self.job_type
        try:
            self._insert_filter(user)
        except BaseException:
            self.clean()
            raise

    def _insert_filter(self, user: str) -> None:
        if len(self._backends) > 1:
            raise StreamError(f"Node '{self.opts.device}' is used by several drives")
        if self._backends:
            self._filter_backend = self._backends[0]
            self.filter = insert_into_drive(self._filter_backend, bottom=self.opts.base, populate_reads=False,
                                            user=user)
        else:
            # An intermediate node: its overlay's backing edge refuses writers, but what the job writes is
            # what that overlay already reads through it (QEMU's filter sits on that edge and writes
            # "unchanged" data); the edge shares writes for the job's time.
            self._unshare = _share_writes_while_streaming(self.top)
            self.filter = CopyOnRead(self.top, bottom=self.opts.base, populate_reads=False, owns_child=False,
                                     user=user)

    def run(self) -> None:
        cor = self.filter
        assert cor is not None
        size = self.total_progress
        pos = 0
        failed: BlockIOError | None = None
        while pos < size:
            self.pause_point()
            step = min(STREAM_STEP, size - pos)
            try:
                copied = cor.populate(pos, step)
            except BlockIOError as exc:
                # QEMU's stream_run: stop pauses and retries the step on resume; ignore goes on but the job
                # still fails at the end (the link must not drop data it did not copy); report fails now.
                action = self.apply_error_policy(self.opts.on_error, read=True, err=exc.errno or errno.EIO)
                if action == "stop":
                    continue
                failed = failed or exc
                if action == "report":
                    raise
                copied = 0
            pos += step
            with self._cond:
                self.current_progress = pos
                self.copied_bytes += copied
            if copied:
                self.rate_limit(copied)
        if failed is not None:
            raise failed

    def prepare(self) -> None:
        """QEMU's stream_prepare: the top's backing link becomes ``base`` (or none)."""
        base = self.opts.base
        backing_file = self.opts.backing_file or (unwrap(base).filename if base is not None else None)
        backing_format = unwrap(base).name if base is not None else None
        change_backing(self.top, base, backing_file=backing_file, backing_format=backing_format,
                       registry=self._registry)

    def clean(self) -> None:
        cor, backend = self.filter, self._filter_backend
        self.filter = self._filter_backend = None
        try:
            if cor is not None:
                if backend is not None:
                    backend.remove_filter(cor)
                else:
                    cor.close()
        finally:
            unshare, self._unshare = self._unshare, None
            if unshare is not None:
                unshare()
            with _busy_lock:
                _busy.pop(unwrap(self.top), None)
            for release in self.on_release:
                release()


def _share_writes_while_streaming(node: BlockDriver) -> Callable[[], None]:
    """Let the backing edges on ``node`` share writes; returns the undo (only the edges widened here)."""
    widened = [a for a in graph.users(unwrap(node)) if a.role == "backing" and not a.shared & BlockPerm.WRITE]
    for attachment in widened:
        attachment.shared |= BlockPerm.WRITE

    def undo() -> None:
        for attachment in widened:
            attachment.shared &= ~BlockPerm.WRITE
    return undo


def _find_base_by_filename(top: Any, filename: str) -> Any:
    for node in list(backing_chain(top))[1:]:
        if node.filename == filename:
            return node
    return None


def create_stream(args: dict[str, Any], *, resolve: Callable[[str], BlockDriver],
                  backends_of: Callable[[object], list[Any]], emit: EventSink,
                  check_id: Callable[[str], None], registry: NodeRegistry | None) -> StreamJob:
    """Check ``args`` as QEMU 7.2's qmp_block_stream does, in its order and words, and build the job (filter
    inserted, not started)."""
    device = args["device"]
    top = resolve(device)
    if "base" in args and "base-node" in args:
        raise StreamError("'base' and 'base-node' cannot be specified at the same time")
    if "base" in args and "bottom" in args:
        raise StreamError("'base' and 'bottom' cannot be specified at the same time")
    if "bottom" in args and "base-node" in args:
        raise StreamError("'bottom' and 'base-node' cannot be specified at the same time")
    chain_below = list(backing_chain(top))[1:]
    base: Any = None
    bottom: Any = None
    if "base" in args:
        base = _find_base_by_filename(top, args["base"])
        if base is None:
            raise StreamError(f"Can't find '{args['base']}' in the backing chain")
    elif "base-node" in args:
        base = unwrap(resolve(args["base-node"]))
        if not any(node is base for node in chain_below):
            raise StreamError(f"Node '{args['base-node']}' is not a backing image of '{device}'")
    elif "bottom" in args:
        bottom = unwrap(resolve(args["bottom"]))
        if not any(node is bottom for node in chain_below):
            raise StreamError(f"Node '{args['bottom']}' is not in a chain starting from '{device}'")
        base = backing_of(bottom)  # everything down to bottom included is copied
    if "backing-file" in args and base is None:
        raise StreamError("backing file specified, but streaming the entire chain")
    on_error = args.get("on-error", "report")
    if on_error not in ERROR_POLICIES:
        raise StreamError(f"Parameter 'on-error' does not accept value '{on_error}'")
    # QEMU names a job after its device only when that is a drive (a BlockBackend name).
    is_drive = registry is not None and registry.backend(device) is not None
    job_id = args.get("job-id", device if is_drive else "")
    check_job_id(job_id)
    check_id(job_id)
    real_top = unwrap(top)
    with _busy_lock:
        if real_top in _busy:
            raise StreamError(f"Node '{device}' is busy: block device is in use by block job: {_busy[real_top]}")
    # QEMU's stream_start: a read-only top (an intermediate node of a -drive chain) is reopened read-write
    # for the job and read-only again when it ends (stream_clean).
    hold = ReadWriteHold()
    try:
        hold.acquire(real_top)
    except ReopenError as exc:
        raise StreamError(str(exc)) from None
    opts = StreamOptions(job_id=job_id, device=device, base=base, backing_file=args.get("backing-file"),
                         speed=args.get("speed", 0), on_error=on_error,
                         auto_finalize=args.get("auto-finalize", True), auto_dismiss=args.get("auto-dismiss", True),
                         filter_node_name=args.get("filter-node-name"))
    try:
        job = StreamJob(opts, top=top, backends=backends_of(top), emit=emit, registry=registry)
        job.on_release.append(hold.release)
        job.setup()
    except BaseException:
        hold.release()  # idempotent: a failed setup's clean may have done it already
        raise
    return job
