"""QMP ``block_resize``: grow (or shrink) a node while the guest runs, and tell the guest.

QEMU 7.2's order, each step with its words (recorded from qemu-storage-daemon): the size is checked
("Parameter 'size' expects a >0 size"), the node found by ``device`` first, then ``node-name`` ("Cannot find
device='d' nor node-name='n'"), a job on the node refuses ("Node 'x' is busy: ..."), the graph must let a
new user take the resize permission (a qcow2 node does not let its ``file`` be resized under it), then every
drive is drained, the driver resizes (:func:`pyemu.block.resize.resize_node`) and each drive whose size
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


def _conflict_message(registry: NodeRegistry, node: Any, name: str) -> str | None:
    """QEMU's words for a parent that does not share 'resize' (a format node over its file)."""
    for attachment in graph.users(node):
        if attachment.shared & BlockPerm.RESIZE:
            continue
        for parent, role in registry.parents(name):
            if role == attachment.role:
                return (f"Permission conflict on node '{name}': permissions 'resize' are both required by an "
                        f"unnamed block device (uses node '{name}' as 'root' child) and unshared by node "
                        f"'{parent}' (uses node '{name}' as '{role}' child).")
    return None


def _block_resize(api: ControlApi, args: dict[str, Any]) -> dict[str, Any]:
    from pyemu.monitor.blockdev import node_registry

    size = args["size"]
    if size > INT64_MAX:
        raise QmpError("Invalid parameter type for 'size', expected: integer")
    if size < 0:
        raise QmpError("Parameter 'size' expects a >0 size")
    registry = node_registry(api)
    node, name = _find(registry, args.get("device"), args.get("node-name"))
    entry = registry.entry_of(node)
    if entry is not None and entry.blockers:
        raise QmpError(f"Node '{name}' is busy: {entry.blockers[0]}")
    if node.read_only:
        raise QmpError("Image is read-only")
    try:
        user = graph.attach(node, user="block_resize", role="root", perm=BlockPerm.RESIZE, shared=PERM_ALL)
    except graph.PermissionConflict as exc:
        raise QmpError(_conflict_message(registry, node, name) or str(exc)) from None
    drives = [use.backend for use in api.machine.drives()]
    try:
        with ExitStack() as stack:
            for backend in drives:
                stack.enter_context(backend.drained())
            resize_node(node, size)
    except PyemuError as exc:
        raise QmpError(str(exc)) from None
    finally:
        user.detach()
        notify_backends(drives)
    return {}


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "block_resize": _block_resize,
}
