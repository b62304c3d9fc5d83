"""QMP's block graph commands: ``blockdev-add``, ``blockdev-del``, ``query-named-block-nodes``.

The commands are thin: the option schema and opening are :mod:`pyemu.block.blockdev`, names and
ownership :mod:`pyemu.block.registry`. What lives here is the monitor's view -- QEMU's BlockDeviceInfo for
every node, and turning each typed block-layer error into a GenericError with its message -- plus
:func:`node_registry`, the one way monitor code (bitmaps, jobs, exports, transactions) finds the VM's
registry and resolves a ``node`` argument.

The commands run on the monitor's thread; opening a qcow2 image reads its metadata there, which is
what QEMU does too (blockdev-add is synchronous).
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.block.blockdev import delete_blockdev, open_blockdev
from pyemu.block.registry import NodeEntry, NodeRegistry, NodeRegistryError
from pyemu.errors import PyemuError
from pyemu.monitor.bitmap_commands import dirty_bitmap_info
from pyemu.monitor.block_info import image_info
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError


def node_registry(api: ControlApi) -> NodeRegistry:
    """The VM's node registry (the board's virtio plugger keeps it, next to the drives)."""
    registry = getattr(getattr(getattr(api.machine, "virtio", None), "backends", None), "nodes", None)
    if not isinstance(registry, NodeRegistry):
        raise QmpError("this machine has no block graph")
    return registry


def resolve_node(api: ControlApi, name: str) -> Any:
    """A QMP ``node`` argument (node-name or drive id) as its node; GenericError with QEMU's words."""
    try:
        return node_registry(api).lookup(name)
    except NodeRegistryError as error:
        raise QmpError(str(error)) from None


def _backing_chain(node: Any) -> list[Any]:
    chain: list[Any] = []
    backing = getattr(node, "backing", None)
    while backing is not None and len(chain) < 1000:
        chain.append(backing)
        backing = getattr(backing, "backing", None)
    return chain


def node_info(entry: NodeEntry) -> dict[str, Any]:
    """QEMU's BlockDeviceInfo for one node (throttling does not exist: its limits are 0)."""
    node = entry.node
    chain = _backing_chain(node)
    info: dict[str, Any] = {
        "file": node.filename, "node-name": entry.name, "ro": bool(node.read_only), "drv": entry.driver,
        "backing_file_depth": len(chain), "encrypted": False, "detect_zeroes": entry.detect_zeroes,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image_info(node), "write_threshold": 0,
        "cache": {"writeback": True, "direct": bool(getattr(entry, "cache_direct", False)),
                  "no-flush": bool(getattr(entry, "no_flush", False))},
    }
    if chain:
        info["backing_file"] = chain[0].filename
    bitmaps = dirty_bitmap_info(node)
    if bitmaps:  # QEMU lists a node's dirty bitmaps in its BlockDeviceInfo
        info["dirty-bitmaps"] = bitmaps
    return info


def add_node_names(api: ControlApi, uses: list[Any], infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``query-block``: give each drive's ``inserted`` the node-name of its current root, as QEMU does."""
    try:
        registry = node_registry(api)
    except QmpError:
        return infos
    for use, info in zip(uses, infos):
        name = registry.name_of(use.backend.root)
        if name is not None and "inserted" in info:
            info["inserted"]["node-name"] = name
    return infos


def _query_named_block_nodes(api: ControlApi, args: dict[str, Any]) -> Any:
    """Newest first, as QEMU lists them; ``flat`` leaves out the nested ``backing-image`` chains."""
    infos = [node_info(entry) for entry in reversed(list(node_registry(api)))]
    if args.get("flat", False):
        for info in infos:
            info["image"].pop("backing-image", None)
    return infos


def _blockdev_add(api: ControlApi, args: dict[str, Any]) -> Any:
    try:
        open_blockdev(dict(args), node_registry(api))
    except PyemuError as error:
        raise QmpError(str(error)) from None
    return {}


def _blockdev_del(api: ControlApi, args: dict[str, Any]) -> Any:
    try:
        delete_blockdev(node_registry(api), args["node-name"])
    except PyemuError as error:
        raise QmpError(str(error)) from None
    return {}


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "blockdev-add": _blockdev_add,
    "blockdev-del": _blockdev_del,
    "query-named-block-nodes": _query_named_block_nodes,
}
