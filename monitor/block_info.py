"""``query-block``: each drive and its image chain as QEMU's BlockInfo describes them.

Built from the backend a device holds and the format nodes under it (walked with
:func:`pyemu.block.graph.children`), so what QMP reports is what the guest really reads through, including
a ``snapshot=on`` overlay in front of the image, and the drive's I/O limits (``block_set_io_throttle``).
"""

from __future__ import annotations

from typing import Any

from pyemu.block.backend import BlockBackend
from pyemu.block.driver import BlockDriver
from pyemu.monitor.bitmap_commands import dirty_bitmap_info
from pyemu.monitor.throttle_commands import throttle_info


def _backing(node: BlockDriver) -> BlockDriver | None:
    return getattr(node, "backing", None)


def image_info(node: BlockDriver) -> dict[str, Any]:
    info: dict[str, Any] = {"filename": node.filename, "format": node.name, "virtual-size": node.size()}
    header = getattr(node, "header", None)
    if header is not None:  # qcow2
        info["cluster-size"] = header.cluster_size
        info["dirty-flag"] = header.dirty
        if header.backing_file:
            info["backing-filename"] = header.backing_file
            if header.backing_format:
                info["backing-filename-format"] = header.backing_format
    backing = _backing(node)
    if backing is not None:
        info["backing-image"] = image_info(backing)
    return info


def block_info(device_id: str, drive_id: str, backend: BlockBackend) -> dict[str, Any]:
    root = backend.root
    depth = 0
    node = _backing(root)
    while node is not None:
        depth += 1
        node = _backing(node)
    inserted: dict[str, Any] = {
        "file": root.filename, "ro": backend.read_only, "drv": root.name, "backing_file_depth": depth,
        "encrypted": False, "detect_zeroes": "off", **throttle_info(backend), "image": image_info(root),
        "write_threshold": 0,
        "cache": {"writeback": backend.cache.writeback, "direct": backend.cache.direct,
                  "no-flush": backend.cache.no_flush},
    }
    backing = _backing(root)
    if backing is not None:
        inserted["backing_file"] = backing.filename
    info: dict[str, Any] = {"device": drive_id, "qdev": device_id, "type": "unknown", "removable": False,
                            "locked": False, "inserted": inserted}
    bitmaps = dirty_bitmap_info(root)
    if bitmaps:  # in both places, as QEMU 7.2 (the BlockInfo member is its deprecated spelling)
        inserted["dirty-bitmaps"] = bitmaps
        info["dirty-bitmaps"] = bitmaps
    return info
