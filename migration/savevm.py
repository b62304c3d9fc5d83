"""``savevm`` / ``loadvm`` / ``delvm``: whole-VM snapshots kept inside the qcow2 images (QEMU's internal
snapshots with VM state).

Saving stops the VM, drains and flushes its I/O, writes pyemu's migration stream (:func:`save_vm`) into
the VM-state area of one image (:mod:`pyemu.block.qcow2.vmstate`), then gives every writable drive an internal
snapshot of the same name -- the chosen image's records the state's size and the virtual clock -- and runs
the VM on if it was running. Loading checks everything it can first (every drive has the snapshot, the
VM-state image's one carries a state, the stream's framing, checksums and identity match this VM), so a
refusal leaves the VM as it was; only then are the disks reverted and the state loaded.

QEMU's rules and messages (migration/savevm.c, block/snapshot.c of QEMU 7.2): all writable drives must
support snapshots, read-only ones are left out, the state goes to the first of them unless one is named;
``savevm`` of an existing name replaces it (QMP ``snapshot-save`` refuses it). The state is pyemu's own
stream: QEMU cannot load pyemu's snapshots' VM state (nor pyemu QEMU's) -- the disk parts interoperate.
"""

from __future__ import annotations

import contextlib
import errno
import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pyemu.block.backing_link import unwrap
from pyemu.block.qcow2.driver import Qcow2Format
from pyemu.block.qcow2.snapshot import SnapshotInfo
from pyemu.block.qcow2.vmstate import VmStateReader, VmStateWriter
from pyemu.migration.errors import MigrationError, StreamCorrupt
from pyemu.migration.stream import StreamReader
from pyemu.migration.vmstate import check_header, drain_io, identity, load_vm, migration_blockers, save_vm
from pyemu.system.runstate import RunState

if TYPE_CHECKING:
    from pyemu.machines.base import Machine

EventSink = Callable[[str, dict[str, Any]], None]
MAX_NAME_BYTES = 255
"""QEMU keeps a snapshot's name in 256 bytes with the NUL: savevm cuts longer names to 255."""


class SnapshotVmError(MigrationError):
    """A savevm/loadvm/delvm request was refused or failed; the message is QEMU's."""


class SnapshotLoadFailed(SnapshotVmError):
    """loadvm failed after the disks were reverted: the VM holds no runnable state and stays stopped."""


@dataclass(frozen=True)
class SnapshotDisk:
    """One block node taking part: ``name`` is what messages call it (drive id or node name)."""

    name: str
    node: Any
    read_only: bool

    @property
    def image(self) -> Qcow2Format | None:
        return self.node if isinstance(self.node, Qcow2Format) else None

    def find(self, name: str) -> SnapshotInfo | None:
        image = self.image
        if image is None:
            return None
        for snap in image.snapshots():  # by id first, then by name (QEMU's bdrv_snapshot_find)
            if snap.id == name:
                return snap
        for snap in image.snapshots():
            if snap.name == name:
                return snap
        return None


def machine_disks(machine: "Machine") -> list[SnapshotDisk]:
    """Every drive the board uses, each node once, in creation order (QEMU's bdrv_next order)."""
    out: list[SnapshotDisk] = []
    seen: set[int] = set()
    for use in machine.drives():
        node = unwrap(use.backend.root)
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append(SnapshotDisk(use.drive_id, node, use.backend.read_only or bool(node.read_only)))
    return out


def _can_snapshot(disks: list[SnapshotDisk]) -> list[SnapshotDisk]:
    """The writable disks, all of which must support snapshots (QEMU's bdrv_all_can_snapshot)."""
    writable = [d for d in disks if not d.read_only]
    for disk in writable:
        if disk.image is None:
            raise SnapshotVmError(f"Device '{disk.name}' is writable but does not support snapshots")
    return writable


def _vmstate_disk(writable: list[SnapshotDisk], vmstate: str | None,
                  disks: list[SnapshotDisk] | None = None) -> SnapshotDisk:
    """QEMU's bdrv_all_find_vmstate_bs: the named node, or the first disk that can take snapshots."""
    if vmstate is not None:
        for disk in writable:
            if disk.name == vmstate:
                return disk
        if any(disk.name == vmstate for disk in disks or []):
            raise SnapshotVmError(f"vmstate block device '{vmstate}' does not support snapshots")
        raise SnapshotVmError(f"vmstate block device '{vmstate}' does not exist")
    if not writable:
        raise SnapshotVmError("No block device can accept snapshots")
    return writable[0]


@contextlib.contextmanager
def _stopped(machine: "Machine", emit: EventSink) -> Iterator[bool]:
    """The VM stopped with its I/O drained for the block; running again afterwards if it was running
    (whatever happened inside, as QEMU's savevm does; loadvm decides itself through the flag)."""
    was_running = machine.runstate.state is RunState.RUNNING
    if was_running:
        machine.pause()
        emit("STOP", {})
    try:
        drain_io(machine)
        yield was_running
    finally:
        if was_running and machine.runstate.state is RunState.PAUSED:
            machine.resume()
            emit("RESUME", {})


def save_snapshot(machine: "Machine", disks: list[SnapshotDisk], emit: EventSink, name: str | None, *,
                  overwrite: bool, vmstate: str | None = None) -> str:
    """Snapshot the whole VM under ``name`` (``vm-YYYYmmddHHMMSS`` when None); returns the name used."""
    blockers = migration_blockers(machine)
    if blockers:
        raise SnapshotVmError(str(blockers[0]))
    state = machine.runstate.state
    if state not in (RunState.RUNNING, RunState.PAUSED, RunState.PRELAUNCH, RunState.POSTMIGRATE):
        raise SnapshotVmError(f"the VM cannot be saved in state {state.value}")
    writable = _can_snapshot(disks)
    if name is not None:
        name = name.encode()[:MAX_NAME_BYTES].decode(errors="ignore")
        holders = [d for d in writable if d.find(name) is not None]
        if holders and not overwrite:
            raise SnapshotVmError(f"Snapshot '{name}' already exists in one or more devices")
    target = _vmstate_disk(writable, vmstate, disks)
    image = target.image
    assert image is not None
    if name is None:
        name = time.strftime("vm-%Y%m%d%H%M%S", time.localtime())
    name = name.encode()[:MAX_NAME_BYTES].decode(errors="ignore")  # QEMU's char name[256]: silently cut
    with _stopped(machine, emit) as was_running:
        if overwrite:
            for disk in writable:
                while disk.find(name) is not None:
                    _delete_on(disk, name)
        run_state = "running" if was_running else "paused"
        vm_clock = machine.clock.now()
        writer = VmStateWriter(image)
        try:
            save_vm(machine, writer, run_state)
            size = writer.finish()
        except Exception as exc:
            with contextlib.suppress(Exception):
                image.drop_active_vmstate()
            raise SnapshotVmError(f"Error while writing VM state: {exc}") from exc
        done: list[SnapshotDisk] = []
        try:
            for disk in writable:
                disk_image = disk.image
                assert disk_image is not None
                try:
                    disk_image.create_snapshot(name, vm_state_size=size if disk is target else 0,
                                               vm_clock_nsec=vm_clock, icount=None)
                except Exception as exc:
                    raise SnapshotVmError(f"Could not create snapshot '{name}' on '{disk.name}': {exc}") from exc
                done.append(disk)
        except SnapshotVmError:
            for disk in done:  # as QEMU: the snapshots already made are removed again
                with contextlib.suppress(Exception):
                    _delete_on(disk, name)
            raise
        finally:
            with contextlib.suppress(Exception):
                image.drop_active_vmstate()
    return name


def _delete_on(disk: SnapshotDisk, name: str) -> None:
    image = disk.image
    assert image is not None
    image.delete_snapshot(name)


def check_vmstate(machine: "Machine", image: Qcow2Format, snap: SnapshotInfo) -> None:
    """Read the whole stream once: framing, checksums, the end marker and the header's identity against
    this VM, before anything is reverted (a corrupt or foreign state leaves the VM untouched)."""
    reader = StreamReader(io.BufferedReader(VmStateReader(image, snap), 1 << 20))
    first = True
    for section in reader:
        if first:
            check_header(section, identity(machine))
            first = False
    if first:
        raise StreamCorrupt("the stream has no header")


def load_snapshot(machine: "Machine", disks: list[SnapshotDisk], name: str, *,
                  vmstate: str | None = None) -> None:
    """Revert every writable disk to ``name`` and load the VM state saved with it. The VM must be stopped
    (the caller stops it and runs it again, as QEMU's loadvm). Refusals leave everything unchanged; a
    failure after the disks were reverted leaves the VM stopped with its RAM cleared (not runnable)."""
    writable = _can_snapshot(disks)
    if any(d.find(name) is None for d in writable):
        raise SnapshotVmError(f"Snapshot '{name}' does not exist in one or more devices")
    target = _vmstate_disk(writable, vmstate, disks)
    image = target.image
    snap = target.find(name)
    assert image is not None and snap is not None
    if snap.vm_state_size == 0:
        raise SnapshotVmError("This is a disk-only snapshot. Revert to it offline using qemu-img")
    try:
        check_vmstate(machine, image, snap)
    except MigrationError as exc:
        raise SnapshotVmError(f"Error {-errno.EINVAL} while loading VM state: {exc}") from exc
    drain_io(machine)
    for disk in writable:
        disk_image = disk.image
        assert disk_image is not None
        try:
            disk_image.apply_snapshot(name)
        except Exception as exc:
            raise SnapshotLoadFailed(f"Could not load snapshot '{name}' on '{disk.name}': {exc}") from exc
    try:
        snap = target.find(name)
        assert snap is not None
        load_vm(machine, io.BufferedReader(VmStateReader(image, snap), 1 << 20))
    except Exception as exc:
        raise SnapshotLoadFailed(f"Error {-errno.EINVAL} while loading VM state: {exc}") from exc
    with contextlib.suppress(Exception):
        image.drop_active_vmstate()  # the active image need not keep a copy: the snapshot has it


def delete_snapshot(disks: list[SnapshotDisk], name: str) -> None:
    """Delete ``name`` wherever it exists (QEMU's bdrv_all_delete_snapshot: a name found nowhere is no
    error); the first failure stops with QEMU's message."""
    for disk in _can_snapshot(disks):
        while disk.find(name) is not None:
            try:
                _delete_on(disk, name)
            except Exception as exc:
                raise SnapshotVmError(f"Could not delete snapshot '{name}' on '{disk.name}': {exc}") from exc


def list_snapshots(disks: list[SnapshotDisk]) -> tuple[list[SnapshotInfo], list[SnapshotInfo]]:
    """(snapshots of the VM-state disk present on every writable disk, the others on it), QEMU's split
    for ``info snapshots``."""
    writable = [d for d in disks if not d.read_only and d.image is not None]
    if not writable:
        return [], []
    first = writable[0].image
    assert first is not None
    complete: list[SnapshotInfo] = []
    partial: list[SnapshotInfo] = []
    for snap in first.snapshots():
        if all(any(s.name == snap.name for s in (d.image.snapshots() if d.image else [])) for d in writable[1:]):
            complete.append(snap)
        else:
            partial.append(snap)
    return complete, partial


__all__ = ["SnapshotDisk", "SnapshotLoadFailed", "SnapshotVmError", "check_vmstate", "delete_snapshot", "list_snapshots",
           "load_snapshot", "machine_disks", "save_snapshot"]
