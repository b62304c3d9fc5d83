"""Whole-VM internal snapshots on the monitors: QMP ``snapshot-save`` / ``snapshot-load`` /
``snapshot-delete`` (jobs of those types) and HMP ``savevm`` / ``loadvm`` / ``delvm`` / ``info snapshots``.

The work is :mod:`pyemu.migration.savevm`; here arguments become calls with QEMU 7.2's messages. As in QEMU
the QMP commands return at once and the job reports the outcome: JOB_STATUS_CHANGE created, running,
waiting, pending, concluded (the jobs are never dismissed automatically), the failure text in
``query-jobs``' ``error``; ``job-dismiss`` removes them. The HMP commands run synchronously and print
``Error: ...`` on failure.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from pyemu.block.backing_link import unwrap
from pyemu.img.info import snapshot_line
from pyemu.jobs.job import Job, JobError
from pyemu.migration.savevm import (SnapshotDisk, SnapshotLoadFailed, SnapshotVmError, delete_snapshot, list_snapshots,
                                    load_snapshot, machine_disks, save_snapshot)
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError
from pyemu.system.runstate import RunState

_LOCK = threading.Lock()
"""One whole-VM snapshot operation at a time (QEMU runs them in its main loop, one after another)."""


def _disks(api: ControlApi, devices: list[str] | None) -> list[SnapshotDisk]:
    """The VM's drives, or (QMP ``devices``) exactly the named nodes (QEMU: "No block device node 'x'")."""
    if devices is None:
        return machine_disks(api.machine)
    from pyemu.block.registry import NodeRegistryError
    from pyemu.monitor.blockdev import node_registry

    if not devices:
        raise SnapshotVmError("At least one device is required for snapshot")
    registry = node_registry(api)
    out: list[SnapshotDisk] = []
    for name in devices:
        try:
            node = unwrap(registry.lookup(name))  # a node name (QEMU) or a drive id
        except NodeRegistryError:
            raise SnapshotVmError(f"No block device node '{name}'") from None
        if all(d.node is not node for d in out):
            out.append(SnapshotDisk(name, node, bool(node.read_only)))
    return out


def save(api: ControlApi, name: str | None, *, overwrite: bool, vmstate: str | None = None,
         devices: list[str] | None = None) -> str:
    with _LOCK:
        if api.migrating:
            raise SnapshotVmError("There's a migration process in progress")
        return save_snapshot(api.machine, _disks(api, devices), api._emit, name, overwrite=overwrite,
                             vmstate=vmstate)


def load(api: ControlApi, name: str, *, vmstate: str | None = None, devices: list[str] | None = None) -> None:
    """QEMU's loadvm: stop, load, and run again only if the VM was running and the load succeeded."""
    with _LOCK:
        if api.migrating:
            raise SnapshotVmError("There's a migration process in progress")
        machine = api.machine
        was_running = machine.runstate.state is RunState.RUNNING
        disks = _disks(api, devices)
        if was_running:
            machine.pause()
            api._emit("STOP", {})
        try:
            load_snapshot(machine, disks, name, vmstate=vmstate)
        except SnapshotLoadFailed:
            raise  # the disks were reverted and the state did not load: the VM stays stopped (QEMU)
        except BaseException:
            if was_running:  # refused before anything changed: the VM runs on
                machine.resume()
                api._emit("RESUME", {})
            raise
        if was_running:
            machine.resume()
            api._emit("RESUME", {})
        elif machine.runstate.state is RunState.PRELAUNCH:
            machine.enter_state(RunState.PAUSED)  # a loaded VM is no longer a fresh one (QEMU: restore-vm)


def delete(api: ControlApi, name: str, devices: list[str] | None = None) -> None:
    with _LOCK:
        delete_snapshot(_disks(api, devices), name)


# -- QMP jobs ----------------------------------------------------------------------------------------------
class SnapshotJob(Job):
    """snapshot-save / -load / -delete: one step of progress; never dismissed automatically."""

    def __init__(self, job_id: str, job_type: str, work: Callable[[], object], *, emit: Any) -> None:
        self.job_type = job_type
        super().__init__(job_id, emit=emit, auto_finalize=True, auto_dismiss=False)
        self._work = work

    def run(self) -> None:
        self.total_progress = 1
        try:
            self._work()
        finally:
            self.current_progress = 1  # QEMU counts the step done, failed or not


def _start(api: ControlApi, args: dict[str, Any], job_type: str, work: Callable[[], object]) -> Any:
    try:
        api.jobs.check_new_id(args["job-id"])
        job = SnapshotJob(args["job-id"], job_type, work, emit=api.jobs.emit)
        api.jobs.add(job)
    except JobError as exc:
        raise QmpError(str(exc), exc.error_class) from None
    job.start()
    return {}


def _snapshot_save(api: ControlApi, args: dict[str, Any]) -> Any:
    return _start(api, args, "snapshot-save",
                  lambda: save(api, args["tag"], overwrite=False, vmstate=args["vmstate"], devices=args["devices"]))


def _snapshot_load(api: ControlApi, args: dict[str, Any]) -> Any:
    return _start(api, args, "snapshot-load",
                  lambda: load(api, args["tag"], vmstate=args["vmstate"], devices=args["devices"]))


def _snapshot_delete(api: ControlApi, args: dict[str, Any]) -> Any:
    return _start(api, args, "snapshot-delete", lambda: delete(api, args["tag"], args["devices"]))


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "snapshot-save": _snapshot_save,
    "snapshot-load": _snapshot_load,
    "snapshot-delete": _snapshot_delete,
}


# -- HMP ---------------------------------------------------------------------------------------------------
def hmp_savevm(api: ControlApi, args: str) -> str:
    save(api, args.strip() or None, overwrite=True)
    return ""


def hmp_loadvm(api: ControlApi, args: str) -> str:
    load(api, args.strip())
    return ""


def hmp_delvm(api: ControlApi, args: str) -> str:
    delete(api, args.strip())
    return ""


_HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def hmp_info_snapshots(api: ControlApi, args: str) -> str:
    """QEMU's layout: the snapshots on every disk (ID shown as ``--``), then the partial ones."""
    disks = machine_disks(api.machine)
    writable = [d for d in disks if not d.read_only and d.image is not None]
    if not writable:
        return "No available block device supports snapshots\n"
    complete, partial = list_snapshots(disks)
    if not complete and not partial:
        return "There is no snapshot available.\n"
    lines: list[str] = []
    if complete:
        lines += ["List of snapshots present on all disks:", _HEADER]
        lines += [snapshot_line(_with_id(snap, "--")) for snap in complete]
    else:
        lines.append("None")
    if partial:
        lines += ["", f"List of partial (non-loadable) snapshots on '{writable[0].name}':", _HEADER]
        lines += [snapshot_line(snap) for snap in partial]
    return "\n".join(lines) + "\n"


def _with_id(snap: Any, new_id: str) -> Any:
    from dataclasses import replace

    return replace(snap, id=new_id)
