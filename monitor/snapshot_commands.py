"""QMP live external snapshots (``blockdev-snapshot-sync``, ``blockdev-snapshot``, also as ``transaction``
actions) and ``block-stream``.

A snapshot puts a qcow2 overlay on top of a running node: with every drive on the node drained, each drive's
root becomes the overlay (:meth:`~pyemu.block.backend.BlockBackend.change_root`) and the old top becomes the
overlay's backing (:func:`pyemu.block.backing_link.change_backing`, in memory only: the overlay's header
already names it). The guest sees one short stall. A ``-drive``'s own image is handed over to the overlay,
which the drive then owns (it closes the whole chain); a named node is borrowed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, NamedTuple

from pyemu.block.backing_link import change_backing, unwrap
from pyemu.errors import PyemuError
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError
from pyemu.monitor.transaction import Action, register_action


def _backends_of(api: ControlApi, node: object) -> list[Any]:
    return [use.backend for use in api.machine.drives() if use.backend.root is node]


def _registry(api: ControlApi) -> Any:
    from pyemu.monitor.blockdev import node_registry

    return node_registry(api)


def _lookup(api: ControlApi, device: str | None, node_name: str | None) -> Any:
    """The node to snapshot, QEMU's bdrv_lookup_bs words; refused when it is some node's backing already
    (QEMU's op blocker: "Node 'x' is busy: node is used as backing hd of 'y'")."""
    from pyemu.block.registry import NodeRegistryError

    registry = _registry(api)
    node = None
    with contextlib.suppress(NodeRegistryError):
        if device is not None and registry.backend(device) is not None:
            node = registry.lookup(device)
        elif node_name is not None:
            node = registry.node(node_name).node
    if node is None:
        raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
    name = registry.name_of(node)
    for parent, role in (registry.parents(name) if name else []):
        if role == "backing":
            raise QmpError(f"Node '{node_name or device}' is busy: node is used as backing hd of '{parent}'")
    return node


def attach_overlay(api: ControlApi, top: Any, overlay: Any) -> Callable[[], None]:
    """Make ``overlay`` the root of every drive on ``top`` and ``top`` its backing; returns the undo."""
    registry = _registry(api)
    backends = _backends_of(api, top)
    top_entry = registry.entry_of(top)
    top_owner = top_entry.owner if top_entry is not None else None
    if unwrap(overlay).size() != unwrap(top).size() and backends:
        raise QmpError("The overlay's size differs from the size of the node it is put on")
    with contextlib.ExitStack() as drained:
        for backend in backends:
            drained.enter_context(backend.drained())
        swapped: list[Any] = []
        try:
            for backend in backends:
                backend.change_root(overlay)
                swapped.append(backend)
            handed_over = any(getattr(backend, "_owned_root", None) is top for backend in backends)
            change_backing(overlay, top, backing_file=None, backing_format=None, registry=registry,
                           write_header=False, take_ownership=handed_over)
        except BaseException:
            for backend in swapped:
                backend.change_root(top)
            raise
        for backend in backends:
            if getattr(backend, "_owned_root", None) is top:
                backend._owned_root = overlay  # the drive's image now hangs below the overlay it owns
                entry = registry.entry_of(overlay)
                if entry is not None:
                    entry.owner = f"drive:{backend.id}"

    def undo() -> None:
        with contextlib.ExitStack() as again:
            for backend in backends:
                again.enter_context(backend.drained())
            change_backing(overlay, None, backing_file=None, backing_format=None, registry=registry,
                           write_header=False, keep_old=True)
            for backend in backends:
                backend.change_root(top)
                if getattr(backend, "_owned_root", None) is overlay:
                    backend._owned_root = top
            if top_entry is not None and top_owner is not None:
                top_entry.owner = top_owner

    return undo


def _check_overlay(api: ControlApi, name: str, overlay: Any) -> None:
    from pyemu.block.graph import users
    from pyemu.block.qcow2.driver import Qcow2Format

    node = unwrap(overlay)
    if not isinstance(node, Qcow2Format):
        raise QmpError("The overlay does not support backing images")
    if node.backing is not None:
        raise QmpError("The overlay already has a backing image")
    if users(node) or _registry(api).parents(name):
        raise QmpError("The overlay is already in use")


def _snapshot_sync(api: ControlApi, args: dict[str, Any]) -> "_Prepared":
    """blockdev-snapshot-sync: QEMU 7.2's checks in its order and words (checked with qemu-storage-daemon),
    then the overlay is created (absolute-paths) or opened (existing) and put on top."""
    from pyemu.block.blockdev import DRIVERS, delete_blockdev, open_blockdev
    from pyemu.block.implicit import IMPLICIT_OWNER
    from pyemu.block.qcow2.create import create_qcow2
    from pyemu.block.registry import NodeRegistryError, check_node_name

    registry = _registry(api)
    device, node_name = args.get("device"), args.get("node-name")
    top = _lookup(api, device, node_name)
    name = args.get("snapshot-node-name")
    if node_name is not None and name is None:
        raise QmpError("New overlay node-name missing")
    if name is not None:
        if name in registry or registry.backend(name) is not None:
            raise QmpError("New overlay node-name already in use")
        try:
            check_node_name(name)
        except NodeRegistryError as exc:
            raise QmpError(str(exc)) from None
    fmt = args.get("format", "qcow2")
    mode = args.get("mode", "absolute-paths")
    path = args["snapshot-file"]
    real = unwrap(top)
    if mode == "absolute-paths":
        if fmt not in DRIVERS:
            raise QmpError(f"Unknown file format '{fmt}'")
        if fmt != "qcow2":
            raise QmpError(f"Backing file not supported for file format '{fmt}'")
        try:
            create_qcow2(path, real.size(), backing_file=os.path.abspath(real.filename), backing_format=real.name)
        except (OSError, PyemuError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise QmpError(text if text.startswith("Could not create") else f"Could not create '{path}': {text}") \
                from None
    elif not os.path.exists(path):
        raise QmpError(f"Could not open '{path}': No such file or directory")
    elif fmt != "qcow2":
        raise QmpError("The overlay does not support backing images")
    options: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": None}
    if name is not None:
        options["node-name"] = name
    try:
        # Without snapshot-node-name (a drive given by device) the overlay gets an automatic name, as QEMU.
        # A named overlay is the graph's, not the user's: it goes when its last user does (QEMU's refcount).
        entry = open_blockdev(options, registry, owner=IMPLICIT_OWNER if name is not None else f"drive:{device}")
    except PyemuError as exc:
        text = str(exc)
        prefix = f"Could not open '{path}': "
        raise QmpError(text[len(prefix):] if text.startswith(prefix) and "qcow2 format" in text else text) from None
    try:
        undo = attach_overlay(api, top, entry.node)
    except BaseException:
        delete_blockdev(registry, entry.name)
        raise

    def full_undo() -> None:
        undo()
        with contextlib.suppress(PyemuError):
            entry.owner = "monitor"
            delete_blockdev(registry, entry.name)

    return _Prepared(full_undo, top)


def _snapshot(api: ControlApi, args: dict[str, Any]) -> "_Prepared":
    from pyemu.block.registry import NodeRegistryError

    registry = _registry(api)
    top = _lookup(api, args["node"], args["node"])
    if registry.get(args["overlay"]) is None and registry.backend(args["overlay"]) is None:
        raise QmpError(f"Cannot find device='{args['overlay']}' nor node-name='{args['overlay']}'")
    try:
        overlay_entry = registry.lookup_entry(args["overlay"])
    except NodeRegistryError as exc:
        raise QmpError(str(exc)) from None
    _check_overlay(api, overlay_entry.name, overlay_entry.node)
    return _Prepared(attach_overlay(api, top, overlay_entry.node), top)


def _guard(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except QmpError:
        raise
    except PyemuError as exc:
        raise QmpError(str(exc)) from None


class _Prepared(NamedTuple):
    """A snapshot put in place: how to take it back, and the old top it went on."""

    undo: Callable[[], None]
    old_top: Any


def _old_top_read_only(old_top: Any) -> None:
    """Once the snapshot is committed, the node below the overlay is reopened read-only (QEMU 7.2 does, seen
    with qemu-storage-daemon: ``ro`` turns true, its write lock goes), unless a copy-on-read filter works on
    it (here: any user still holding write permission on it, which a copy-on-read filter does). A failure is
    ignored, as QEMU ignores it: the snapshot itself stands."""
    from pyemu.block.graph import users
    from pyemu.block.locking import BlockPerm
    from pyemu.block.reopen import set_read_only

    real = unwrap(old_top)
    if any(attachment.perm & BlockPerm.WRITE for attachment in users(real)):
        return
    with contextlib.suppress(PyemuError):
        set_read_only(real, True)


class _SnapshotAction(Action):
    """``transaction`` snapshot actions: prepare does the snapshot, abort undoes it, commit makes the old top
    read-only."""

    def __init__(self, api: ControlApi, data: dict[str, Any],
                 do: Callable[[ControlApi, dict[str, Any]], "_Prepared"]):
        self.api, self.data, self._do = api, data, do
        self._prepared: _Prepared | None = None

    def prepare(self) -> None:
        self._prepared = _guard(lambda: self._do(self.api, self.data))

    def commit(self) -> None:
        if self._prepared is not None:
            _old_top_read_only(self._prepared.old_top)

    def abort(self) -> None:
        if self._prepared is not None:
            self._prepared.undo()


def _snapshot_command(do: Callable[[ControlApi, dict[str, Any]], _Prepared]) -> Callable[
        [ControlApi, dict[str, Any]], Any]:
    def handler(api: ControlApi, args: dict[str, Any]) -> Any:
        _old_top_read_only(_guard(lambda: do(api, args)).old_top)
        return {}

    return handler


# -- block-stream -------------------------------------------------------------------------------------------
def _register_filter(registry: Any, job: Any) -> None:
    """``filter-node-name``: the job's copy-on-read filter is a named node while the job runs."""
    from pyemu.block.registry import NodeEntry, NodeRegistryError

    name, node = job.opts.filter_node_name, job.filter
    if not name or node is None:
        return
    try:
        registry.add(NodeEntry(name, node, "copy-on-read", owner=f"job:{job.id}"))
    except NodeRegistryError as exc:
        job.cancel(force=True)
        raise QmpError(f"Could not create node: {exc}") from None

    def release() -> None:
        with contextlib.suppress(NodeRegistryError):
            registry.remove(name, by_monitor=False)

    job.on_release.append(release)


def _block_stream(api: ControlApi, args: dict[str, Any]) -> Any:
    from pyemu.block.stream import create_stream
    from pyemu.monitor.blockdev import resolve_node

    registry = _registry(api)

    def create() -> Any:
        job = create_stream(dict(args), resolve=lambda name: resolve_node(api, name),
                            backends_of=lambda node: _backends_of(api, node), emit=api.jobs.emit,
                            check_id=api.jobs.check_new_id, registry=registry)
        api.jobs.add(job)
        _register_filter(registry, job)
        return job

    job = _guard(create)
    job.start()
    return {}


register_action("blockdev-snapshot-sync",
                lambda api, data: _SnapshotAction(api, data, _snapshot_sync), command="blockdev-snapshot-sync")
register_action("blockdev-snapshot",
                lambda api, data: _SnapshotAction(api, data, _snapshot), command="blockdev-snapshot")

HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "blockdev-snapshot-sync": _snapshot_command(_snapshot_sync),
    "blockdev-snapshot": _snapshot_command(_snapshot),
    "block-stream": _block_stream,
}
