"""Who uses a node, and for what: in-process permissions on block graph nodes (QEMU's BdrvChild idea).

Image locks (:mod:`.locking`) keep *processes* from writing one image at once. Inside one process a node can
have several parents -- a device's backend, an overlay that uses it as ``backing``, later a backup job or an
NBD export -- and the same rule applies: every parent attaches with the permissions it needs (``perm``) and
those it lets others have (``shared``); an attachment that needs what another refuses, or refuses what
another already has, fails with a message naming both users. So an image opened as a backing file cannot
also be handed to a writable device by accident, and two devices cannot write one node.

:func:`children` lists a node's graph edges (``file``, ``backing``) for tools that walk the graph.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Iterator

from pyemu.block.errors import BlockError
from pyemu.block.locking import PERM_ALL, BlockPerm, perm_name


class PermissionConflict(BlockError):
    """An attachment conflicts with another user of the node."""


@dataclass(eq=False)
class Attachment:
    """One parent's use of a node."""

    node: object
    user: str
    role: str
    perm: BlockPerm
    shared: BlockPerm

    def detach(self) -> None:
        detach(self)


_lock = threading.Lock()
_users: "weakref.WeakKeyDictionary[object, list[Attachment]]" = weakref.WeakKeyDictionary()


def _node_name(node: object) -> str:
    return f"'{getattr(node, 'filename', node)}' ({getattr(node, 'name', 'node')})"


def attach(node: object, *, user: str, role: str, perm: BlockPerm,
           shared: BlockPerm = PERM_ALL) -> Attachment:
    """Record ``user``'s use of ``node`` or raise PermissionConflict (nothing recorded then)."""
    with _lock:
        current = _users.setdefault(node, [])
        for other in current:
            refused = perm & ~other.shared
            if refused:
                raise PermissionConflict(f"Conflicts with use by {other.user} as '{other.role}', which does not "
                                         f"allow '{perm_name(refused)}' on {_node_name(node)}")
            taken = other.perm & ~shared
            if taken:
                raise PermissionConflict(f"{user} as '{role}' cannot refuse '{perm_name(taken)}' on "
                                         f"{_node_name(node)}: {other.user} ('{other.role}') already uses it")
        attachment = Attachment(node, user, role, perm, shared)
        current.append(attachment)
        return attachment


def detach(attachment: Attachment) -> None:
    """Forget an attachment (idempotent)."""
    with _lock:
        current = _users.get(attachment.node)
        if current and attachment in current:
            current.remove(attachment)


def users(node: object) -> list[Attachment]:
    with _lock:
        return list(_users.get(node, ()))


def children(node: object) -> Iterator[tuple[str, object]]:
    """(role, child) edges below ``node``: a format's ``file`` and ``backing``, raw's ``file``, a
    copy-before-write filter's ``target``."""
    for role, attr in (("file", "file"), ("file", "child"), ("backing", "backing")):
        child = getattr(node, attr, None)
        if child is not None:
            yield role, child
    if getattr(node, "filtered_child", None) is not None:  # only filters: an NBD client's .target is no node
        target = getattr(node, "target", None)
        if target is not None:
            yield "target", target


def format_node_permissions(*, writable: bool) -> tuple[BlockPerm, BlockPerm]:
    """What a format node (raw, qcow2) holds on its ``file`` child: it reads, writes and (qcow2) grows the
    file when writable, and lets nobody else write or resize it under the format's feet."""
    perm = BlockPerm.CONSISTENT_READ | (BlockPerm.WRITE | BlockPerm.RESIZE if writable else BlockPerm(0))
    return perm, BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED


BACKING_PERM = BlockPerm.CONSISTENT_READ
BACKING_SHARED = BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED | BlockPerm.RESIZE
"""A backing child reads and refuses writers: changing a backing file corrupts every overlay on it."""
