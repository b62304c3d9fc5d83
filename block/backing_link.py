"""Changing a qcow2 node's backing link while it runs (QEMU's ``bdrv_change_backing_file`` plus
``bdrv_set_backing_hd``), and dropping intermediate nodes from a chain (``bdrv_drop_intermediate``).

Live snapshots, block-stream and block-commit all end by re-pointing an image at another backing node: the
header's backing file name/format must change *durably* (the next process opens the right chain) and the
in-memory ``backing`` child must change *atomically with the node's I/O* (no read may see half of each).
Both happen here, under the node's exclusive I/O gate, header first (it is synced before the swap), and the
graph permissions the old edge held move to the new one.

Who closes what: a backing node the image opened itself from its header is *owned* (the image closes it);
a named node (``-blockdev``, a registered node) is held through a :class:`~pyemu.block.borrowed.BorrowedNode`
(the image only lets go of it). When the new backing node lies further down the old chain and is owned by
a node of it, ownership moves to the re-pointed image (the node is cut from its old parent first), and the
nodes dropped between are closed and unregistered. A new backing that is not in the chain is borrowed when
the registry knows it, else it is taken over (the caller hands its ownership over; a ``-drive``'s old root
under a snapshot overlay, for instance).

Public API (used by blockdev-snapshot, block-stream and H7's block-commit/mirror):

* :func:`change_backing` -- re-point ``node`` at ``new_backing`` (or none) and rewrite its header.
* :func:`drop_intermediate` -- ``active``'s chain ``... -> overlay -> top -> ... -> base`` becomes
  ``... -> overlay -> base`` (overlay's header names ``backing_file``); the nodes from ``top`` down to
  above ``base`` leave the chain (closed when they were owned). Refused when ``top`` is ``active`` itself
  (active commit pivots the drive instead).
* :func:`unwrap`, :func:`backing_of`, :func:`backing_chain`, :func:`find_overlay`, :func:`in_chain` --
  chain walking that sees through borrowed handles.
"""

from __future__ import annotations

import errno
from typing import Any, Iterator

from pyemu.block import graph
from pyemu.block.borrowed import BorrowedNode
from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError, BlockIOError
from pyemu.block.implicit import release_if_unused
from pyemu.block.registry import NodeRegistry

MAX_BACKING_NAME = 1023
"""QEMU's qcow2 limit on a backing file name (its header cluster holds at most 1023 bytes of it)."""


class BackingLinkError(BlockError):
    """A backing link change QEMU refuses; the message is QEMU's."""


def unwrap(node: Any) -> Any:
    """The real node behind a borrowed handle (or ``node`` itself)."""
    while isinstance(node, BorrowedNode):
        node = node.node
    return node


def backing_of(node: Any) -> Any:
    """``node``'s backing child as the real node (None without one); filters are looked through."""
    node = unwrap(node)
    while getattr(node, "filtered_child", None) is not None and getattr(node, "backing", None) is None:
        node = unwrap(node.filtered_child)
    return unwrap(getattr(node, "backing", None))


def backing_chain(node: Any) -> Iterator[Any]:
    """``node`` (unwrapped) and every backing node below it, top first."""
    current = unwrap(node)
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = backing_of(current)


def in_chain(top: Any, node: Any) -> bool:
    """True when ``node`` is ``top`` or one of its backing nodes."""
    target = unwrap(node)
    return any(n is target for n in backing_chain(top))


def find_overlay(active: Any, node: Any) -> Any:
    """The node of ``active``'s chain whose backing is ``node`` (None when ``node`` is ``active`` or absent)."""
    target = unwrap(node)
    for candidate in backing_chain(active):
        if backing_of(candidate) is target:
            return candidate
    return None


def _qcow2(node: Any) -> Any:
    from pyemu.block.qcow2.driver import Qcow2Format

    node = unwrap(node)
    if not isinstance(node, Qcow2Format):
        # QEMU: a driver without bdrv_change_backing_file says -ENOTSUP.
        raise BackingLinkError(f"Could not change the backing file of '{node.filename}': Operation not "
                               f"supported")
    return node


def _backing_attachment(node: Any) -> graph.Attachment | None:
    for attachment in getattr(node, "_attachments", []):
        if attachment.role == "backing":
            return attachment
    return None


def _attach_backing(node: Any, child: Any) -> graph.Attachment:
    attachment = graph.attach(child, user=f"qcow2 image '{node.filename}'", role="backing",
                              perm=graph.BACKING_PERM, shared=graph.BACKING_SHARED)
    node._attachments.append(attachment)
    return attachment


def _drop_attachment(node: Any, attachment: graph.Attachment | None) -> None:
    if attachment is not None:
        attachment.detach()
        if attachment in node._attachments:
            node._attachments.remove(attachment)


def _locate(node: Any, target: Any) -> tuple[Any, Any] | None:
    """(parent, edge) where ``edge`` -- the object the parent holds as ``backing`` -- leads to ``target``,
    searching ``node``'s chain below it; None when ``target`` is not there."""
    parent = node
    seen: set[int] = set()
    while parent is not None and id(parent) not in seen:
        seen.add(id(parent))
        edge = getattr(parent, "backing", None)
        if edge is None:
            return None
        if unwrap(edge) is target:
            return parent, edge
        parent = unwrap(edge)
    return None


def _is_active(edge: Any) -> int:
    return int(getattr(edge, "_active", 0)) if isinstance(edge, BorrowedNode) else 0


def change_backing(node: BlockDriver, new_backing: BlockDriver | None, *, backing_file: str | None,
                   backing_format: str | None, registry: NodeRegistry | None = None,
                   write_header: bool = True, take_ownership: bool = False, keep_old: bool = False) -> None:
    """Re-point the qcow2 ``node`` at ``new_backing`` (None: no backing) and write ``backing_file`` /
    ``backing_format`` into its header, durably. ``registry``, when given, is kept in step: the node's
    entry lists the new child, nodes dropped from the chain are unregistered, a borrowed new backing is
    found by name. ``write_header=False`` changes only the in-memory link (blockdev-snapshot: the user
    created the overlay's header). ``take_ownership``: a new backing that is not in the old chain is
    handed over (``node`` closes it from now on: a ``-drive``'s image under a snapshot overlay); otherwise
    it is borrowed (its owner keeps closing it). ``keep_old``: an owned old backing is neither closed nor
    unregistered (the caller takes it back: undoing a snapshot). Raises BackingLinkError (QEMU's refusals), PermissionConflict (the new backing cannot be
    attached: nothing changed) or BlockIOError (header write failed: nothing changed)."""
    image = _qcow2(node)
    target = unwrap(new_backing) if new_backing is not None else None
    if target is image or (target is not None and in_chain(target, image)):
        raise BackingLinkError("Making '%s' a backing child of '%s' would create a cycle"
                               % (getattr(target, "filename", "?"), image.filename))
    if backing_file is not None and len(backing_file.encode()) > MAX_BACKING_NAME:
        raise BackingLinkError(f"Could not change the backing file to '{backing_file}': Invalid argument")
    if target is None:
        backing_file = None
    if backing_file is None:
        backing_format = None
    if write_header and (image.read_only or image.header.corrupt):
        raise BlockIOError(f"Could not change the backing file of '{image.filename}': the image is read-only",
                           errno=errno.EACCES)
    old_edge = image.backing
    if target is not None and old_edge is not None and unwrap(old_edge) is target:
        new_edge: Any = old_edge  # same node: only the header changes
        located = None
    else:
        located = _locate(image, target) if target is not None else None
        new_edge = _make_edge(target, located, registry, take_ownership)
    old_attachment = _backing_attachment(image)
    new_attachment: graph.Attachment | None = None
    try:
        if new_edge is not old_edge and new_edge is not None:
            # The old edge lets go first, so a node moving up the chain does not conflict with itself.
            if old_attachment is not None:
                old_attachment.detach()
            try:
                new_attachment = graph.attach(new_edge, user=f"qcow2 image '{image.filename}'", role="backing",
                                              perm=graph.BACKING_PERM, shared=graph.BACKING_SHARED)
                if isinstance(new_edge, BorrowedNode) and (located is None or located[1] is not new_edge):
                    new_edge.settle()
                    for _ in range(max(_is_active(old_edge), 1 if _drive_above(image) else 0)):
                        new_edge.activate()
            except BaseException:
                if old_attachment is not None:
                    node_attach = graph.attach(old_attachment.node, user=old_attachment.user,
                                               role=old_attachment.role, perm=old_attachment.perm,
                                               shared=old_attachment.shared)
                    _replace_attachment(image, old_attachment, node_attach)
                raise
        with image.gate.exclusive(), image._meta:
            from dataclasses import replace

            if write_header:
                image._update_header(replace(image.header, backing_file=backing_file,
                                             backing_format=backing_format if backing_file else None))
                image._sync()
            image.backing = new_edge
    except BaseException:
        if new_attachment is not None:
            new_attachment.detach()
            if isinstance(new_edge, BorrowedNode) and new_edge is not old_edge and \
                    (located is None or located[1] is not new_edge):
                new_edge.close()
            if old_attachment is not None and old_attachment not in graph.users(old_attachment.node):
                _replace_attachment(image, old_attachment, graph.attach(
                    old_attachment.node, user=old_attachment.user, role=old_attachment.role,
                    perm=old_attachment.perm, shared=old_attachment.shared))
        raise
    if new_edge is old_edge:
        return
    # Committed: record the new attachment, then cut the new child from its old parent and let go of the
    # nodes that left the chain.
    _drop_attachment(image, old_attachment)
    if new_attachment is not None:
        image._attachments.append(new_attachment)
    if located is not None and located[1] is new_edge and located[0] is not image:
        parent = located[0]
        _drop_attachment(parent, _backing_attachment(parent))
        parent.backing = None
    if registry is not None:
        _registry_relink(registry, image, target, owned=not isinstance(new_edge, BorrowedNode))
    if keep_old and not isinstance(old_edge, BorrowedNode):
        pass  # handed back to the caller, open
    else:
        _release(old_edge, registry, keep=target)


def _drive_above(image: Any) -> bool:
    """Whether a writer sits on ``image`` (a drive or a writing parent): a new borrowed edge then holds its
    full permissions at once, as :func:`pyemu.block.borrowed.activate` would have given it."""
    from pyemu.block.locking import BlockPerm

    return any(a.perm & BlockPerm.WRITE for a in graph.users(image))


def _replace_attachment(image: Any, old: graph.Attachment, new: graph.Attachment) -> None:
    attachments = image._attachments
    if old in attachments:
        attachments[attachments.index(old)] = new
    else:
        attachments.append(new)


def _make_edge(target: Any, located: tuple[Any, Any] | None, registry: NodeRegistry | None,
               take_ownership: bool) -> Any:
    """What the image will hold for ``target``: the owned node itself (moved up the chain, or handed
    over), or a borrowed handle on a named node."""
    if target is None:
        return None
    if located is not None:
        edge = located[1]
        if not isinstance(edge, BorrowedNode):
            return edge  # owned below: ownership moves up
        return BorrowedNode(target, node_name=edge.borrowed_name)
    if take_ownership:
        return target  # handed over by the caller
    name = registry.name_of(target) if registry is not None else None
    return BorrowedNode(target, node_name=name or "")


def _release(old_edge: Any, registry: NodeRegistry | None, *, keep: Any) -> None:
    """Let go of the old backing edge: a borrowed handle lets go, an owned chain is closed (the kept node
    was already cut from it) and its nodes unregistered."""
    if old_edge is None:
        return
    if isinstance(old_edge, BorrowedNode):
        old_edge.close()
        release_if_unused(registry, old_edge.node)  # a snapshot overlay left with no user goes (QEMU)
        return
    dropped = [n for n in backing_chain_owned(old_edge) if n is not keep]
    if registry is not None:
        for node in dropped:
            entry = registry.entry_of(node)
            if entry is not None and not entry.monitor_owned:
                _unregister(registry, entry.name)
    old_edge.close()


def backing_chain_owned(node: Any) -> Iterator[Any]:
    """``node`` and the backing nodes it owns (stopping at a borrowed edge), top first."""
    current = node
    while current is not None and not isinstance(current, BorrowedNode):
        yield current
        current = getattr(current, "backing", None)


def _unregister(registry: NodeRegistry, name: str) -> None:
    """Forget ``name`` (and its file child it owned), bypassing blockdev-del's checks: the node is gone from
    the graph already."""
    with registry._lock:
        entry = registry._nodes.pop(name, None)
        if entry is None:
            return
        for role, child in entry.children.items():
            child_entry = registry._nodes.get(child)
            if role == "backing" or child_entry is None or child_entry.monitor_owned:
                continue  # a backing child is dropped (or kept) on its own; the user's nodes stay
            if not registry.parents(child):
                _unregister(registry, child)


def _registry_relink(registry: NodeRegistry, image: Any, target: Any, *, owned: bool) -> None:
    entry = registry.entry_of(image)
    if entry is None:
        return
    with registry._lock:
        if target is None:
            entry.children.pop("backing", None)
            return
        child = registry.entry_of(target)
        if child is None:
            entry.children.pop("backing", None)
            return
        entry.children["backing"] = child.name
        if owned and not child.monitor_owned:
            child.owner = entry.name


def drop_intermediate(active: BlockDriver, top: BlockDriver, base: BlockDriver | None, *,
                      backing_file: str | None, backing_format: str | None,
                      registry: NodeRegistry | None = None) -> None:
    """QEMU's ``bdrv_drop_intermediate`` for a chain reached from ``active``: the overlay of ``top`` gets
    ``base`` (None: no backing) as its backing, with ``backing_file``/``backing_format`` in its header;
    ``top`` and the nodes between it and ``base`` leave the chain. ``base`` must lie below ``top``."""
    top_node = unwrap(top)
    if unwrap(active) is top_node:
        raise BackingLinkError("Cannot drop the active layer of a chain (an active commit pivots instead)")
    overlay = find_overlay(active, top_node)
    if overlay is None:
        raise BackingLinkError(f"'{top_node.filename}' is not in the backing chain of "
                               f"'{unwrap(active).filename}'")
    if base is not None and not in_chain(top_node, base):
        raise BackingLinkError(f"'{unwrap(base).filename}' is not in the backing chain of "
                               f"'{top_node.filename}'")
    change_backing(overlay, base, backing_file=backing_file, backing_format=backing_format, registry=registry)
