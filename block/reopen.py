"""Reopening a block node read-only <-> read-write while it runs (QEMU's ``bdrv_reopen_set_read_only``).

Why: a ``-drive file=top.qcow2`` opens the backing chain read-only (from the header), yet ``block-commit``
writes into a backing node (the base) and rewrites the backing link of another (the overlay of an
intermediate ``top``), and ``block-stream`` into an intermediate node writes that node. QEMU reopens such
nodes read-write for the job and read-only again when it ends; so does pyemu, through this module.

What a reopen does, per driver (each all or nothing: a failure leaves the node exactly as it was):

* ``file`` (:meth:`pyemu.block.file.FileProtocol.reopen`): a new descriptor with the new access mode, the
  QEMU-compatible image locks moved to it with the new permissions (another process holding a conflicting
  lock makes it fail with QEMU's ``Failed to get "write" lock``), then swapped in under the old number.
* ``qcow2`` (:meth:`pyemu.block.qcow2.driver.Qcow2Format.reopen`): going read-write does what a read-only
  open skipped (the file child reopened, the format's graph permissions on it widened, autoclear bits
  cleared, a lazy-refcounts image left dirty repaired, persistent bitmaps flagged in use); going read-only
  writes everything out first (bitmaps stored, metadata and queued frees flushed, the dirty bit cleared).
* ``raw``: its file child is reopened and its graph permissions follow.

Public API:

* :func:`set_read_only` -- reopen one node (borrowed handles seen through).
* :class:`ReadWriteHold` -- nodes made writable for a job's time: :meth:`~ReadWriteHold.acquire` reopens the
  read-only ones read-write (all or nothing over the set), :meth:`~ReadWriteHold.release` puts exactly those
  back to read-only (idempotent, never raises: a job's end must not fail on it).
"""

from __future__ import annotations

import threading
from typing import Any

from pyemu.block import graph
from pyemu.block.errors import BlockError, ImageLockedError
from pyemu.block.locking import BlockPerm


class ReopenError(BlockError):
    """A node cannot be reopened as asked; the message is QEMU's."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def _unwrap(node: Any) -> Any:
    from pyemu.block.backing_link import unwrap

    return unwrap(node)


def node_label(node: Any) -> str:
    """How QEMU names a node in its messages (node-name, else the file name)."""
    return str(getattr(node, "node_name", None) or getattr(node, "filename", "?"))


def set_read_only(node: Any, read_only: bool) -> None:
    """Reopen ``node`` read-only (True) or read-write (False); nothing happens when it already is.

    Raises ReopenError with QEMU's words: a conflicting lock held by another process (``Failed to get
    "write" lock``), a file that cannot be opened for writing (``Could not reopen file: Permission
    denied``), a corrupt qcow2 image, or a driver that cannot reopen. The node is unchanged then."""
    real = _unwrap(node)
    if bool(real.read_only) == read_only:
        return
    try:
        reopen = getattr(real, "reopen", None)
        if reopen is not None:
            reopen(read_only=read_only)
        elif getattr(real, "child", None) is not None and hasattr(real, "_attachment"):
            _reopen_raw(real, read_only)
        else:
            raise ReopenError(f"Block format '{getattr(real, 'name', '?')}' used by node '{node_label(real)}' "
                              "does not support reopening files")
    except ImageLockedError as exc:
        # QMP shows the first line only (the hint line is QEMU's error_append_hint).
        raise ReopenError(str(exc).split("\n", 1)[0], errno=exc.errno) from exc


def swap_attachment(old: graph.Attachment, perm: BlockPerm, shared: BlockPerm) -> graph.Attachment:
    """Replace ``old`` with an attachment of the same user and role holding ``perm``/``shared``; on a
    conflict ``old``'s permissions are attached again and PermissionConflict propagates. Returns the
    attachment now in force (the caller stores it where it kept ``old``)."""
    old.detach()
    try:
        return graph.attach(old.node, user=old.user, role=old.role, perm=perm, shared=shared)
    except BaseException:
        graph.attach(old.node, user=old.user, role=old.role, perm=old.perm, shared=old.shared)
        raise


def _reopen_raw(node: Any, read_only: bool) -> None:
    """A raw node: its file child reopens; its own permissions on the child follow."""
    old = node._attachment
    perm, shared = graph.format_node_permissions(writable=not read_only)
    shared |= old.shared & BlockPerm.RESIZE  # a raw node without a window keeps letting its child grow
    if read_only:
        set_read_only(node.child, True)
        node._attachment = swap_attachment(old, perm, shared)
        return
    node._attachment = swap_attachment(old, perm, shared)
    try:
        set_read_only(node.child, False)
    except BaseException:
        node._attachment = swap_attachment(node._attachment, old.perm, old.shared)
        raise


class ReadWriteHold:
    """Nodes reopened read-write for one job; :meth:`release` makes them read-only again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: list[Any] = []

    @property
    def nodes(self) -> list[Any]:
        """The nodes this hold reopened (real nodes, in acquisition order)."""
        with self._lock:
            return list(self._nodes)

    def acquire(self, *nodes: Any) -> None:
        """Reopen every read-only node of ``nodes`` read-write. All or nothing: on a failure the ones this
        call reopened go back to read-only and the ReopenError propagates."""
        done: list[Any] = []
        try:
            for node in nodes:
                real = _unwrap(node)
                if not real.read_only or any(real is d for d in done):
                    continue
                set_read_only(real, False)
                done.append(real)
        except BaseException:
            for real in reversed(done):
                _restore(real)
            raise
        with self._lock:
            self._nodes.extend(done)

    def forget(self, node: Any) -> None:
        """Keep ``node`` read-write for good (an active commit's base the drive now runs on)."""
        real = _unwrap(node)
        with self._lock:
            self._nodes = [n for n in self._nodes if n is not real]

    def release(self) -> None:
        """Reopen the held nodes read-only again, newest first; a node already closed is skipped and a
        failure is logged (the node stays writable, as QEMU leaves it when its reopen fails)."""
        with self._lock:
            nodes, self._nodes = self._nodes, []
        for real in reversed(nodes):
            _restore(real)


def _restore(real: Any) -> None:
    if getattr(real, "closed", False):
        return
    try:
        set_read_only(real, True)
    except BlockError as exc:
        import logging  # here, not at the top: every pyemu-img command imports this module, few get here

        logging.getLogger(__name__).warning("could not reopen '%s' read-only: %s", node_label(real), exc)


__all__ = ["ReadWriteHold", "ReopenError", "node_label", "set_read_only", "swap_attachment"]
