"""block-commit: merge the data of a chain's upper layers down into a lower one (QEMU 7.2's commit).

Chain ``base <- ... <- top <- ... <- active`` (the drive runs on ``active``):

* intermediate commit (``top`` is not the active layer): a :class:`CommitJob` copies every cluster the
  layers from ``top`` down to (not including) ``base`` allocate into ``base`` -- reading through ``top``, so
  the newest layer's data wins -- and, once done, ``top``'s overlay gets ``base`` as its backing (header
  rewritten durably, :func:`pyemu.block.backing_link.drop_intermediate`); ``top`` and the layers between
  leave the chain. No ready state: the guest writes to ``active`` only, which the job does not read.
* active commit (``top`` is the active layer): the mirror machinery (:mod:`pyemu.block.mirror`) copies
  ``active``'s allocated clusters (and the layers above ``base``) into ``base`` while the guest writes,
  becomes ready, and ``job-complete`` pivots the drive onto ``base``.

``base`` is written, and an intermediate commit rewrites the backing link in ``top``'s overlay: a chain
opened read-only (the backing files of a ``-drive``, ``-blockdev read-only=on`` nodes) has those nodes
reopened read-write for the job (:class:`pyemu.block.reopen.ReadWriteHold`; another process holding the image
makes block-commit fail with QEMU's ``Failed to get "write" lock``) and read-only again when it ends --
completed, cancelled or failed -- except a base an active commit pivoted the drive onto. (QEMU 7.2 leaves an
active commit's base read-write after a cancel too; pyemu restores what the user opened.) The backing edges from ``top`` down to ``base`` share writes for the job's time
(QEMU's commit takes the same permissions on the intermediate nodes).
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.block import graph
from pyemu.block.backing_link import backing_chain, drop_intermediate, find_overlay, in_chain, unwrap
from pyemu.block.driver import BlockDriver
from pyemu.block.locking import BlockPerm
from pyemu.block.mirror import MirrorError, MirrorJob, MirrorOptions, build_job, parse_options
from pyemu.block.registry import NodeRegistry
from pyemu.block.reopen import ReadWriteHold, ReopenError
from pyemu.jobs.job import EventSink, JobError, check_job_id


class CommitJob(MirrorJob):
    """Intermediate commit: the mirror's copy loop over a node nobody writes, then a chain relink."""

    def __init__(self, opts: MirrorOptions, *, source: BlockDriver, target: BlockDriver, backends: list[Any],
                 emit: EventSink, base: BlockDriver | None = None, active: BlockDriver | None = None,
                 backing_file: str | None = None, registry: NodeRegistry | None = None) -> None:
        super().__init__(opts, source=source, target=target, backends=[], emit=emit, base=base)
        self.active = active
        self.backing_file = backing_file
        self.registry = registry
        self._scanned = False

    def _update_progress(self) -> None:
        """QEMU's commit counts the whole top range (skipped clusters too): len is the size, offset what
        the scan and the copy have covered."""
        with self._cond:
            self.total_progress = self._bitmap.size
            self.current_progress = self._bitmap.size - self._bitmap.count() if self._scanned else 0

    def run(self) -> None:
        self._initial_dirty()
        self._scanned = True
        while True:
            self.pause_point()
            found = self._next_dirty()
            if found is None:
                break
            self._copy_step(*found)
        self.target.flush()

    def prepare(self) -> None:
        """Re-point ``top``'s overlay at ``base`` (the header names ``backing-file`` or base's file name)."""
        assert self.active is not None and self.base is not None
        base = unwrap(self.base)
        name = self.backing_file if self.backing_file is not None else base.filename
        drop_intermediate(self.active, self.source, self.base, backing_file=name,
                          backing_format=_format_name(base), registry=self.registry)


class ActiveCommitJob(MirrorJob):
    """Active commit: a mirror of the active layer into ``base``; the pivot puts the drive on ``base``."""

    reopened: ReadWriteHold | None = None
    """The nodes reopened read-write for the job; a pivot keeps ``base`` writable (the drive's now)."""

    def after_pivot(self) -> None:
        if self.reopened is not None:
            self.reopened.forget(self.target)
        super().after_pivot()

    def before_pivot(self) -> None:
        """The drive becomes ``base``'s writer: the overlays that keep ``base`` as backing (``top``, and
        nodes dropped from the chain but still open) stop refusing writes on it -- their data above it is
        what was just committed."""
        share_writes_on_node(self.target)


def share_writes_on_node(node: BlockDriver) -> None:
    """Widen every backing edge on ``node`` to share writes (widening a share never conflicts)."""
    for attachment in graph.users(unwrap(node)):
        if attachment.role == "backing":
            attachment.shared |= BlockPerm.WRITE


def _format_name(node: object) -> str:
    from pyemu.block.qcow2.driver import Qcow2Format

    return "qcow2" if isinstance(node, Qcow2Format) else "raw"


def share_writes_on_chain(top: BlockDriver, base: BlockDriver) -> None:
    """Let the backing edges from ``top`` down to ``base`` share writes (the job writes ``base``; after an
    active commit the drive does)."""
    target = unwrap(base)
    for node in backing_chain(top):
        if node is target:
            return
        attachments = getattr(node, "_attachments", None)
        if not isinstance(attachments, list):
            continue
        for index, attachment in enumerate(list(attachments)):
            if attachment.role != "backing" or attachment.shared & BlockPerm.WRITE:
                continue
            attachment.detach()
            attachments[index] = graph.attach(attachment.node, user=attachment.user, role=attachment.role,
                                              perm=attachment.perm, shared=attachment.shared | BlockPerm.WRITE)


def create_commit(args: dict[str, Any], *, resolve: Callable[[str], BlockDriver],
                  find_device: Callable[[str], BlockDriver], backends_of: Callable[[object], list[Any]],
                  emit: EventSink, check_id: Callable[[str], None], registry: NodeRegistry | None) -> MirrorJob:
    """Check block-commit's arguments (QEMU's order and messages) and build the job, not started."""
    if args.get("base") is not None and args.get("base-node") is not None:
        raise MirrorError("'base-node' and 'base' are mutually exclusive")
    if args.get("top") is not None and args.get("top-node") is not None:
        raise MirrorError("'top-node' and 'top' are mutually exclusive")
    active = find_device(str(args.get("device", "")))
    opts = parse_options({k: v for k, v in args.items() if k in ("speed", "auto-finalize", "auto-dismiss")},
                         job_type="commit")
    opts.device = str(args.get("device", ""))
    on_error = str(args.get("on-error", "report"))
    checked = parse_options({"on-source-error": on_error, "on-target-error": on_error})
    opts.on_source_error = opts.on_target_error = checked.on_source_error
    opts.filter_node_name = args.get("filter-node-name")
    chain = list(backing_chain(active))
    if args.get("top-node") is not None:
        top = unwrap(resolve(str(args["top-node"])))
    elif args.get("top") is not None:
        top = next((n for n in chain if n.filename == args["top"]), None)
        if top is None:
            raise MirrorError(f"Top image file {args['top']} not found")
    else:
        top = chain[0]
    if args.get("base-node") is not None:
        base = unwrap(resolve(str(args["base-node"])))
    elif args.get("base") is not None:
        base = next((n for n in chain if n.filename == args["base"]), None)
        if base is None:
            raise MirrorError(f"Can't find '{args['base']}' in the backing chain")
    else:
        below = [n for n in backing_chain(top)]
        base = below[-1]
    if base is top:
        raise MirrorError("cannot commit an image into itself")
    if not in_chain(active, top):
        raise MirrorError(f"'{getattr(top, 'node_name', None) or top.filename}' is not in this backing file "
                          "chain")
    if not in_chain(top, base):
        raise MirrorError(f"'{getattr(base, 'node_name', None) or base.filename}' is not in this backing file "
                          "chain")
    job_id = str(args.get("job-id") or "")
    backends = backends_of(active)
    if not job_id:
        job_id = next((str(b.id) for b in backends if getattr(b, "id", "")), "")
    try:
        check_job_id(job_id)
        check_id(job_id)
    except JobError as exc:
        raise MirrorError(str(exc)) from None
    opts.job_id = job_id
    overlay = None
    if top is not unwrap(active):
        overlay = find_overlay(active, top)
        if overlay is None:
            raise MirrorError(f"'{top.filename}' has no overlay in this chain")
    # The base (and the overlay whose backing link the end rewrites) reopen read-write for the job's time
    # when the chain opened them read-only: QEMU's commit_active_start does it before the job exists,
    # commit_start once it does (a failure then shows the job created -> null).
    hold = ReadWriteHold()
    if overlay is None:
        _acquire(hold, base)
        try:
            share_writes_on_chain(top, base)
            opts.sync = "top"
            job = build_job(opts, source=top, target=base, backends=backends, emit=emit, base=base,
                            cls=ActiveCommitJob)
        except BaseException:
            hold.release()
            raise
        assert isinstance(job, ActiveCommitJob)
        job.reopened = hold
    else:
        share_writes_on_chain(top, base)
        job = build_job(opts, source=top, target=base, backends=[], emit=emit, base=base, cls=CommitJob,
                        active=active, backing_file=args.get("backing-file"), registry=registry)
        try:
            _acquire(hold, base, overlay)
        except BaseException:
            job.clean()
            job.drop()
            raise
    job.on_release.append(hold.release)
    return job


def _acquire(hold: ReadWriteHold, *nodes: BlockDriver) -> None:
    try:
        hold.acquire(*nodes)
    except ReopenError as exc:
        raise MirrorError(str(exc)) from None
