"""QMP's dirty bitmap commands: ``block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge``.

Each command names a node the way QEMU accepts it -- a drive id (``-drive id=``) or a node name -- and
works on that node's :class:`~pyemu.block.dirty_bitmap.BitmapSet`, the same set the write path marks and
qcow2 persists. Every refusal is a GenericError with QEMU 7.2's wording (checked against
qemu-storage-daemon) and leaves everything as it was: merge checks all sources before it changes the
target.

Node lookup goes through the VM's node registry (:func:`pyemu.monitor.blockdev.node_registry`: drive ids
first, then node-names, as QEMU's ``bdrv_lookup_bs``); a board without a block graph falls back to its
drives.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from pyemu.block import graph
from pyemu.block.errors import BlockError
from pyemu.block.dirty_bitmap import (BitmapError, DirtyBitmap, bitmaps_of, check_granularity, check_modifiable,
                                      default_granularity, existing_bitmaps)
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError

MAX_QMP_GRANULARITY = (1 << 32) - 1  # QEMU's argument is a uint32


def _nodes_below(node: object) -> Iterator[object]:
    yield node
    for _role, child in graph.children(node):
        yield from _nodes_below(child)


def find_node(api: ControlApi, name: str) -> object | None:
    """The node a drive id or node name designates (the drive's root node for a drive id)."""
    from pyemu.block.registry import NodeRegistryError
    from pyemu.monitor.blockdev import node_registry  # imported here: blockdev -> block_info -> this module

    try:
        registry = node_registry(api)
    except QmpError:
        registry = None  # a board without a block graph: its drives are all there is
    if registry is not None:
        try:
            return registry.lookup(name)
        except NodeRegistryError:
            return None
    drives = list(api.machine.drives())
    for use in drives:
        if use.drive_id == name:
            return use.backend.root
    for use in drives:
        for node in _nodes_below(use.backend.root):
            if getattr(node, "node_name", None) == name:
                return node
    return None


def resolve_node(api: ControlApi, name: str) -> object:
    node = find_node(api, name)
    if node is None:
        raise QmpError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


def _lookup(api: ControlApi, node_name: str, bitmap_name: str) -> tuple[object, DirtyBitmap]:
    """An existing bitmap; QEMU's block_dirty_bitmap_lookup words (only ``-add`` says "Cannot find device")."""
    node = find_node(api, node_name)
    if node is None:
        raise QmpError(f"Node '{node_name}' not found")
    bitmap = bitmaps_of(node).get(bitmap_name)
    if bitmap is None:
        raise QmpError(f"Dirty bitmap '{bitmap_name}' not found")
    return node, bitmap


def _guard(action: Callable[[], object]) -> None:
    """Run ``action``; a refusal (BitmapError) or an I/O failure writing the image's bitmap directory
    (BlockError) becomes a GenericError."""
    try:
        action()
    except (BitmapError, BlockError) as exc:
        raise QmpError(str(exc)) from None


def block_dirty_bitmap_add(api: ControlApi, args: dict[str, Any]) -> Any:
    node = resolve_node(api, args["node"])
    granularity = args.get("granularity")
    if granularity is not None and not 0 <= granularity <= MAX_QMP_GRANULARITY:
        raise QmpError("Parameter 'granularity' expects uint32_t")
    if granularity is None:
        granularity = default_granularity(node)
    name = args["name"]
    persistent = args.get("persistent", False)
    _guard(lambda: check_granularity(granularity))
    _guard(lambda: bitmaps_of(node).create(name, granularity=granularity, persistent=persistent,
                                            enabled=not args.get("disabled", False), node_label=args["node"]))
    return {}


def block_dirty_bitmap_remove(api: ControlApi, args: dict[str, Any]) -> Any:
    node, bitmap = _lookup(api, args["node"], args["name"])
    _guard(lambda: bitmaps_of(node).remove(bitmap.name))
    return {}


def block_dirty_bitmap_clear(api: ControlApi, args: dict[str, Any]) -> Any:
    node, bitmap = _lookup(api, args["node"], args["name"])
    _guard(lambda: bitmaps_of(node).clear(bitmap.name))
    return {}


def block_dirty_bitmap_enable(api: ControlApi, args: dict[str, Any]) -> Any:
    node, bitmap = _lookup(api, args["node"], args["name"])
    _guard(lambda: bitmaps_of(node).set_enabled(bitmap.name, True))
    return {}


def block_dirty_bitmap_disable(api: ControlApi, args: dict[str, Any]) -> Any:
    node, bitmap = _lookup(api, args["node"], args["name"])
    _guard(lambda: bitmaps_of(node).set_enabled(bitmap.name, False))
    return {}


def block_dirty_bitmap_merge(api: ControlApi, args: dict[str, Any]) -> Any:
    """OR every source into ``target``; sources are names on the same node or ``{node, name}``."""
    node, target = _lookup(api, args["node"], args["target"])
    sources: list[DirtyBitmap] = []
    for index, item in enumerate(args["bitmaps"]):
        if isinstance(item, str):
            sources.append(_lookup(api, args["node"], item)[1])
        elif isinstance(item, dict) and set(item) == {"node", "name"} and all(isinstance(v, str)
                                                                               for v in item.values()):
            source_node = find_node(api, item["node"])
            if source_node is None:
                raise QmpError(f"Node '{item['node']}' not found")
            source = bitmaps_of(source_node).get(item["name"])
            if source is None:
                raise QmpError(f"Dirty bitmap '{item['name']}' not found")
            sources.append(source)
        else:
            raise QmpError(f"Invalid parameter type for 'bitmaps[{index}]', expected: BlockDirtyBitmapOrStr")
    _guard(lambda: check_modifiable(target))
    for source in sources:
        if source.inconsistent:
            raise QmpError(f"Bitmap '{source.name}' is inconsistent and cannot be used\n"
                           "Try block-dirty-bitmap-remove to delete this bitmap from disk")
        if source.size != target.size:
            raise QmpError("Bitmaps are incompatible and can't be merged")
    for source in sources:
        if source is not target:
            target.merge_from(source)
    return {}


HANDLERS = {
    "block-dirty-bitmap-add": block_dirty_bitmap_add,
    "block-dirty-bitmap-remove": block_dirty_bitmap_remove,
    "block-dirty-bitmap-clear": block_dirty_bitmap_clear,
    "block-dirty-bitmap-enable": block_dirty_bitmap_enable,
    "block-dirty-bitmap-disable": block_dirty_bitmap_disable,
    "block-dirty-bitmap-merge": block_dirty_bitmap_merge,
}


def dirty_bitmap_info(node: object) -> list[dict[str, Any]]:
    """query-block's ``dirty-bitmaps`` list for a node (BlockDirtyInfo each)."""
    bitmaps = existing_bitmaps(node)
    return [bitmap.info() for bitmap in bitmaps] if bitmaps is not None else []
