"""A parent's handle on a named node it does not own, with permissions taken only while they are needed.

Inline children belong to their parent (closing a raw node closes its file node), but a child given by
node-name (``-blockdev driver=raw,file=f0``, ``backing=base``) is the user's: deleting the parent must leave
it open. Every format driver closes its children and attaches its permissions to the object it was handed,
so the parent gets a :class:`BorrowedNode` instead of the node: it forwards all I/O, turns ``close`` into
"let go", and moves the permissions the parent attached onto the real node.

QEMU takes a node's permissions on its children from what the node's *own* parents need: an overlay added
with ``backing=<the disk a device is writing>`` holds nothing on that disk until a writer appears above
the overlay (which is what makes ``qom-set ... drive <overlay>`` and the fleecing filters possible). The
same rule here: a borrowed edge holds only a harmless read on the real node (*passive*) until
:func:`activate` is called for a subtree that a drive starts using, and goes back to passive when
:func:`deactivate` says the last drive above it let go. Activation is counted, so a subtree used by two
users stays active until both are gone.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Sequence

from pyemu.block import graph
from pyemu.block.driver import BlockCapabilities, BlockDriver, BlockStatus
from pyemu.block.locking import PERM_ALL, BlockPerm

_PASSIVE_PERM = BlockPerm.CONSISTENT_READ


class BorrowedNode:
    """``node`` as seen by one parent. Create it, hand it to the parent's constructor, then call
    :meth:`settle` once the parent exists."""

    def __init__(self, node: BlockDriver, *, node_name: str) -> None:
        self._node = node
        self.borrowed_name = node_name
        self._lock = threading.Lock()
        self._wanted: list[graph.Attachment] = []
        self._held: list[graph.Attachment] = []
        self._active = 0
        self._released = False

    @property
    def node(self) -> BlockDriver:
        return self._node

    # -- forwarding (explicit for the protocol, __getattr__ for driver-specific attributes) -------------
    @property
    def name(self) -> str:
        return self._node.name

    @property
    def capabilities(self) -> BlockCapabilities:
        return self._node.capabilities

    @property
    def read_only(self) -> bool:
        return self._node.read_only

    @property
    def filename(self) -> str:
        return self._node.filename

    def size(self) -> int:
        return self._node.size()

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._node.preadv(offset, buffers)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        self._node.pwritev(offset, buffers)

    def flush(self) -> None:
        self._node.flush()

    def discard(self, offset: int, length: int) -> None:
        self._node.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        self._node.write_zeroes(offset, length, may_unmap=may_unmap)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return self._node.block_status(offset, length)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") or attr == "node_name":
            # A handle is not the node: graph walkers looking for a node by name must not stop here.
            raise AttributeError(attr)
        return getattr(self._node, attr)

    # -- permissions ------------------------------------------------------------------------------------
    def settle(self) -> None:
        """Take over what the parent attached to this handle: remember it, and hold the passive form on
        the real node (which cannot conflict: nobody refuses reads)."""
        with self._lock:
            for attachment in graph.users(self):
                attachment.detach()
                self._wanted.append(attachment)
            self._held = [graph.attach(self._node, user=a.user, role=a.role, perm=a.perm & _PASSIVE_PERM,
                                       shared=PERM_ALL) for a in self._wanted]

    def activate(self) -> None:
        """Hold the parent's full permissions on the real node. Raises PermissionConflict (and keeps the
        passive ones) when another user refuses them."""
        with self._lock:
            if self._released:
                return
            if self._active == 0:
                self._swap(full=True)
            self._active += 1

    def deactivate(self) -> None:
        with self._lock:
            if self._active == 0 or self._released:
                return
            self._active -= 1
            if self._active == 0:
                self._swap(full=False)

    def _swap(self, *, full: bool) -> None:
        old = self._held
        for attachment in old:
            attachment.detach()
        new: list[graph.Attachment] = []
        try:
            for a in self._wanted:
                new.append(graph.attach(self._node, user=a.user, role=a.role,
                                        perm=a.perm if full else a.perm & _PASSIVE_PERM,
                                        shared=a.shared if full else PERM_ALL))
        except BaseException:
            for attachment in new:
                attachment.detach()
            self._held = [graph.attach(self._node, user=a.user, role=a.role, perm=a.perm, shared=a.shared)
                          for a in old]
            raise
        self._held = new

    def close(self) -> None:
        """The parent lets go: drop its permissions; the node stays open (its owner closes it)."""
        with self._lock:
            self._released = True
            for attachment in self._held:
                attachment.detach()
            self._held = []
            for attachment in graph.users(self):
                attachment.detach()


def borrowed_edges(root: object) -> Iterator[BorrowedNode]:
    """Every borrowed edge in the subtree under ``root`` (through ``file``/``backing`` children), parents
    before children, each once."""
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        node = stack.pop()
        for _role, child in graph.children(node):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, BorrowedNode):
                yield child
                stack.append(child.node)
            else:
                stack.append(child)


def activate(root: object) -> None:
    """A user that writes (or needs consistent reads) now sits on ``root``: activate every borrowed edge
    below it, all or nothing."""
    done: list[BorrowedNode] = []
    try:
        for edge in borrowed_edges(root):
            edge.activate()
            done.append(edge)
    except BaseException:
        for edge in reversed(done):
            edge.deactivate()
        raise


def deactivate(root: object) -> None:
    """The user of ``root`` went away: the edges below go back to passive (when nobody else needs them)."""
    for edge in reversed(list(borrowed_edges(root))):
        edge.deactivate()
