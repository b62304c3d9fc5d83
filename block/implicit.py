"""Nodes the graph created for the user, which live exactly as long as something uses them (QEMU's
reference-counted, non-monitor-owned nodes).

``blockdev-add``/``-blockdev`` nodes belong to the user: they stay until ``blockdev-del``. Nodes that a
command creates on the user's behalf -- the overlay of ``blockdev-snapshot-sync``, the new image of
``drive-mirror`` -- belong to the graph: ``blockdev-del`` refuses them ("Node x is not owned by the
monitor", or "in use" first), and when their last user lets go (the drive pivots away at the end of an
active commit or a mirror, a stream drops them from a chain) they are closed and leave
``query-named-block-nodes``, as QEMU 7.2 does (checked with qemu-storage-daemon: a stream's dropped
snapshot overlay and an active commit's top vanish).

This module knows the owner tag and the one release rule; callers say when a node may have lost its last
user.
"""

from __future__ import annotations

from typing import Any

from pyemu.block import graph
from pyemu.block.borrowed import BorrowedNode
from pyemu.block.registry import NodeRegistry, NodeRegistryError

IMPLICIT_OWNER = "implicit"
"""The :attr:`~pyemu.block.registry.NodeEntry.owner` of a node the graph owns on the user's behalf."""


def _real(node: Any) -> Any:
    while isinstance(node, BorrowedNode):
        node = node.node
    return node


def release_if_unused(registry: NodeRegistry | None, node: Any) -> bool:
    """Close and unregister ``node`` if the graph owns it on the user's behalf and nothing uses it any more
    (no parent node, no drive or export, no job, no graph attachment); then the same for the node it
    borrowed as its backing, which may have just lost its last user. Returns whether ``node`` went."""
    if registry is None or node is None:
        return False
    real = _real(node)
    entry = registry.entry_of(real)
    if entry is None or entry.owner != IMPLICIT_OWNER:
        return False
    if registry.users(entry.name) or registry.in_use_by_backend(entry.name) or graph.users(real):
        return False
    backing = getattr(real, "backing", None)
    try:
        removed = registry.remove(entry.name, by_monitor=False)
    except NodeRegistryError:
        return False  # someone took it in the meantime: it stays
    for gone in removed:
        gone.node.close()
    if isinstance(backing, BorrowedNode):
        release_if_unused(registry, backing.node)
    return True
