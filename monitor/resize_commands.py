"""QMP ``block_resize``: grow (or shrink) a node while the guest runs, and tell the guest.

QEMU 7.2's order, each step with its words (recorded from qemu-storage-daemon): the node is found by
``device`` first, then ``node-name`` ("Cannot find device='d' nor node-name='n'"), the size is checked
("Parameter 'size' expects a >0 size"), a job's node refuses ("Device '(null)' is in use": QEMU's op
blocker message with the ``device`` argument), the graph must let a new user take the resize permission (a
qcow2 node does not let its ``file`` be resized under it, a backup's filter does not let its source be), the
node must be writable ("Image is read-only"), then every drive is drained, the driver resizes (:func:`pyemu.block.resize.resize_node`) and each drive whose size
changed tells its device -- virtio-blk raises a config-change interrupt and the guest re-reads its capacity.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable

from pyemu.block import graph
from pyemu.block.locking import PERM_ALL, BlockPerm
from pyemu.block.registry import NodeRegistry
from pyemu.block.resize import notify_backends, resize_node
from pyemu.errors import PyemuError
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError

INT64_MAX = (1 << 63) - 1


def _find(registry: NodeRegistry, device: str | None, node_name: str | None) -> tuple[Any, str]:
    """QEMU's bdrv_lookup_bs: the drive named ``device`` if there is one, else the node ``node_name``."""
    if device is not None:
        backend = registry.backend(device)
        if backend is not None:
            return backend.root, registry.name_of(backend.root) or device
    if node_name is not None:
        entry = registry.get(node_name)
        if entry is not None:
            return entry.node, node_name
    raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def _resize_users(registry: NodeRegistry, node: Any, name: str) -> list[tuple[Any, str, str]]:
    """``(node, child name, role)`` for ``node`` and every parent a resize passes through (raw without a
    window, filters: their size is their child's), so a user that refuses 'resize' anywhere up that chain
    refuses it here too, as QEMU's permission propagation does (a job's filter over a raw node)."""
    chain = [(node, name, "root")]
    seen = {id(node)}
    index = 0
    while index < len(chain):
        current, current_name, _ = chain[index]
        index += 1
        for parent_name, role in registry.parents(current_name):
            entry = registry.get(parent_name)
            if entry is None or id(entry.node) in seen:
                continue
            follows = getattr(entry.node, "filtered_child", None) is not None or \
                (entry.driver == "raw" and not getattr(entry.node, "has_window", True))
            if follows:
                seen.add(id(entry.node))
                chain.append((entry.node, parent_name, role))
    return chain


def _take_resize(registry: NodeRegistry, node: Any, name: str) -> list[graph.Attachment]:
    """Attach as a resizing user to ``node`` and to the parents that follow its size; QmpError with QEMU's
    "Permission conflict" message (naming the parent that unshares 'resize') otherwise."""
    taken: list[graph.Attachment] = []
    child_of: dict[str, tuple[str, str]] = {}
    try:
        for target, target_name, _role in _resize_users(registry, node, name):
            for parent_name, role in registry.parents(target_name):
                child_of.setdefault(parent_name, (target_name, role))
            try:
                taken.append(graph.attach(target, user="block_resize", role="root", perm=BlockPerm.RESIZE,
                                          shared=PERM_ALL))
            except graph.PermissionConflict as exc:
                raise QmpError(_conflict_message(registry, target, target_name, name) or str(exc)) from None
    except BaseException:
        for attachment in taken:
            attachment.detach()
        raise
    return taken


def _conflict_message(registry: NodeRegistry, node: Any, node_name: str, name: str) -> str | None:
    """QEMU's words for a user of ``node_name`` that does not share 'resize' (a format node over its file, a
    job's filter over a raw node). QEMU names the node resized and its parent on the way to the conflict."""
    def words(parent: str, role: str) -> str:
        return (f"Permission conflict on node '{name}': permissions 'resize' are both required by an unnamed "
                f"block device (uses node '{name}' as 'root' child) and unshared by node '{parent}' (uses node "
                f"'{name}' as '{role}' child).")

    if node_name != name:
        parents = registry.parents(name)
        return words(*parents[0]) if parents else None
    for attachment in graph.users(node):
        if attachment.shared & BlockPerm.RESIZE:
            continue
        for parent, role in registry.parents(node_name):
            if role == attachment.role:
                return words(parent, role)
    return None


def _block_resize(api: ControlApi, args: dict[str, Any]) -> dict[str, Any]:
    from pyemu.monitor.blockdev import node_registry

    size = args["size"]
    if size > INT64_MAX:
        raise QmpError("Invalid parameter type for 'size', expected: integer")
    registry = node_registry(api)
    node, name = _find(registry, args.get("device"), args.get("node-name"))
    if size < 0:
        raise QmpError("Parameter 'size' expects a >0 size")
    entry = registry.entry_of(node)
    if entry is not None and entry.blockers:
        # QEMU 7.2 reports an op blocker (a job's node) as QERR_DEVICE_IN_USE with the 'device' argument,
        # "(null)" when there is none.
        raise QmpError(f"Device '{args.get('device', '(null)')}' is in use")
    users = _take_resize(registry, node, name)
    drives = [use.backend for use in api.machine.drives()]
    try:
        if node.read_only:
            raise QmpError("Image is read-only")
        with ExitStack() as stack:
            for backend in drives:
                stack.enter_context(backend.drained())
            resize_node(node, size)
    except PyemuError as exc:
        raise QmpError(str(exc)) from None
    finally:
        for user in users:
            user.detach()
        notify_backends(drives)
    return {}


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "block_resize": _block_resize,
}
