"""QMP's job commands: ``query-jobs``, ``job-*``, ``query-block-jobs`` and the ``block-job-*`` spellings.

The generic commands find any job by ``id`` ("Job not found"); the ``block-job-*`` ones look the id up as
``device`` (or ``id`` for finalize/dismiss) and find only block jobs, with QEMU's DeviceNotActive
"Block job 'x' not found". The work is in :mod:`pyemu.jobs.job`; here arguments become calls and
:class:`~pyemu.jobs.job.JobError` becomes the QMP error QEMU sends.
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.jobs.job import Job, JobError
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError
from pyemu.monitor.transaction import Action, register_action


def _guard(action: Callable[[], object]) -> dict[str, Any]:
    try:
        action()
    except JobError as exc:
        raise QmpError(str(exc), exc.error_class) from None
    return {}


def _job(api: ControlApi, job_id: str) -> Job:
    try:
        return api.jobs.get(job_id)
    except JobError as exc:
        raise QmpError(str(exc), exc.error_class) from None


def _block_job(api: ControlApi, job_id: str) -> Job:
    try:
        return api.jobs.get_block_job(job_id)
    except JobError as exc:
        raise QmpError(str(exc), exc.error_class) from None


def block_job_info(job: Job) -> dict[str, Any]:
    """QEMU's BlockJobInfo; a job that is not a block job has none."""
    info = getattr(job, "block_info", None)
    if info is None:
        raise QmpError(f"Block job '{job.id}' not found", "DeviceNotActive")
    return dict(info())


def _query_jobs(api: ControlApi, args: dict[str, Any]) -> Any:
    return [job.info() for job in api.jobs]


def _query_block_jobs(api: ControlApi, args: dict[str, Any]) -> Any:
    return [block_job_info(job) for job in api.jobs if job.is_block_job]


def _set_speed(api: ControlApi, args: dict[str, Any]) -> Any:
    job = _block_job(api, args["device"])
    return _guard(lambda: job.set_speed(args["speed"]))


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "query-jobs": _query_jobs,
    "job-pause": lambda api, args: _guard(_job(api, args["id"]).user_pause),
    "job-resume": lambda api, args: _guard(_job(api, args["id"]).user_resume),
    "job-cancel": lambda api, args: _guard(lambda: _job(api, args["id"]).cancel(force=True)),  # QEMU: always forced
    "job-complete": lambda api, args: _guard(_job(api, args["id"]).user_complete),
    "job-finalize": lambda api, args: _guard(_job(api, args["id"]).finalize),
    "job-dismiss": lambda api, args: _guard(_job(api, args["id"]).dismiss),
    "query-block-jobs": _query_block_jobs,
    "block-job-set-speed": _set_speed,
    "block-job-cancel": lambda api, args: _guard(
        lambda: _block_job(api, args["device"]).cancel(force=bool(args.get("force", False)))),
    "block-job-pause": lambda api, args: _guard(_block_job(api, args["device"]).user_pause),
    "block-job-resume": lambda api, args: _guard(_block_job(api, args["device"]).user_resume),
    "block-job-complete": lambda api, args: _guard(_block_job(api, args["device"]).user_complete),
    "block-job-finalize": lambda api, args: _guard(_block_job(api, args["id"]).finalize),
    "block-job-dismiss": lambda api, args: _guard(_block_job(api, args["id"]).dismiss),
}


# -- blockdev-backup ------------------------------------------------------------------------------------------
def _backends_of(api: ControlApi, node: object) -> list[Any]:
    """The drives whose root is ``node`` (where the backup filter goes)."""
    return [use.backend for use in api.machine.drives() if use.backend.root is node]


def create_backup_job(api: ControlApi, args: dict[str, Any]) -> Any:
    """Build a backup job for ``args`` (point in time taken, not started); QmpError with QEMU's words."""
    from pyemu.block.backup import create_backup
    from pyemu.errors import PyemuError
    from pyemu.monitor.blockdev import node_registry, resolve_node

    def name_taken(name: str) -> bool:
        try:
            return node_registry(api).get(name) is not None
        except QmpError:
            return False

    try:
        job = create_backup(dict(args), resolve=lambda name: resolve_node(api, name),
                            backends_of=lambda node: _backends_of(api, node), emit=api.jobs.emit,
                            check_id=api.jobs.check_new_id, node_name_taken=name_taken)
        api.jobs.add(job)
        _block_target(api, job)
        try:
            register_filter_node(api, job)
        except BaseException:
            job.cancel(force=True)  # a created job: aborted at once, filter and blockers released
            raise
    except QmpError:
        raise
    except PyemuError as exc:
        raise QmpError(str(exc)) from None
    return job


def _block_target(api: ControlApi, job: Any) -> None:
    """blockdev-del of the target refuses while the job runs, with QEMU's words."""
    from pyemu.monitor.blockdev import node_registry

    try:
        registry = node_registry(api)
    except QmpError:
        return
    name = registry.name_of(job.target)
    entry = registry.get(name) if name else None
    if entry is None:
        return
    blocker = "block device is in use by block job: backup"
    entry.blockers.append(blocker)

    def release() -> None:
        if blocker in entry.blockers:
            entry.blockers.remove(blocker)

    job.on_release.append(release)


def register_filter_node(api: ControlApi, job: Any, *, driver: str = "copy-before-write",
                         with_target: bool = True) -> None:
    """``filter-node-name``: the job's filter (backup's copy-before-write, a mirror's mirror_top) is a named
    node while the job runs (listed by query-named-block-nodes, not deletable by blockdev-del), gone with the
    job, as in QEMU."""
    from pyemu.block.registry import NodeEntry, NodeRegistryError
    from pyemu.monitor.blockdev import node_registry

    name, node = job.opts.filter_node_name, job.filter_node
    if not name or node is None:
        return
    registry = node_registry(api)
    roles = (("file", job.source), ("target", job.target)) if with_target else (("file", job.source),)
    children = {role: child for role, child in ((role, registry.name_of(n)) for role, n in roles) if child}
    registry.add(NodeEntry(name, node, driver, owner=f"job:{job.id}", children=children))

    def release() -> None:
        try:
            registry.remove(name, by_monitor=False)
        except NodeRegistryError:
            pass  # already gone

    job.on_release.append(release)


def _blockdev_backup(api: ControlApi, args: dict[str, Any]) -> Any:
    create_backup_job(api, args).start()
    return {}


class _BackupAction(Action):
    """``transaction`` action ``blockdev-backup``: prepare takes the point in time (the job exists, in
    state created), commit starts it, abort cancels it (filter removed, bitmap restored)."""

    def __init__(self, api: ControlApi, data: dict[str, Any]) -> None:
        self.api = api
        self.data = data
        self.job: Job | None = None

    def prepare(self) -> None:
        self.job = create_backup_job(self.api, self.data)

    def commit(self) -> None:
        if self.job is not None:
            self.job.start()

    def abort(self) -> None:
        if self.job is not None:
            self.job.cancel(force=True)


register_action("blockdev-backup", _BackupAction, command="blockdev-backup", groupable=True)
HANDLERS["blockdev-backup"] = _blockdev_backup
