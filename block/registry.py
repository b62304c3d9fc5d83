"""The named block nodes of one VM: node-name -> node, and who may delete what.

QEMU's block graph is addressed by name from outside: ``-blockdev``/``blockdev-add`` give nodes a
``node-name`` (or get an automatic ``#blockNNN``), devices and jobs refer to nodes by that name, and many QMP
commands take a ``node`` argument that may also be a drive (BlockBackend) id. This module is that table and
nothing else -- opening nodes is :mod:`pyemu.block.blockdev`, the QMP side is :mod:`pyemu.monitor.blockdev`
-- so every command resolves names one way and gets QEMU's error messages ("Cannot find device='x' nor
node-name='x'", "Duplicate nodes with node-name='x'", "Node 'x' is busy: ...").

Ownership follows QEMU: a node created by the user (a top-level ``-blockdev``/``blockdev-add``) is *owned by
the monitor* and only the user deletes it (``blockdev-del``); children defined inline inside another
definition belong to that parent and go away with it. A node cannot be deleted while a parent node uses it
or a drive (BlockBackend) has it as its root.

Thread safety: QMP handlers, the device-creation code and later jobs call in from different threads; one
lock guards the table. The nodes themselves are never touched under it.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError

NODE_NAME_MAX = 31
"""QEMU's node names live in a 32-byte array (with the NUL)."""
_NODE_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class NodeRegistryError(BlockError):
    """A lookup, add or delete refused by the registry; the message is QEMU's."""


class NodeNotFoundError(NodeRegistryError):
    """No node (nor drive) of that name."""


class NodeInUseError(NodeRegistryError):
    """The node has users (a parent node, a drive, a job) and cannot be deleted or replaced now."""


class Backend(Protocol):
    """What the registry needs of a BlockBackend: its id and its current root node."""

    id: str

    @property
    def root(self) -> BlockDriver: ...


@dataclass(eq=False)
class NodeEntry:
    """One node of the graph as the monitor sees it.

    ``children`` maps a child role ("file", "backing", "target") to the node-name of the child; ``owner`` is
    ``"monitor"`` for user-created nodes, else the node-name of the parent that defined it inline (or
    ``"drive:<id>"`` for nodes a ``-drive`` opened). ``options`` keeps the validated options the node was
    opened with (what ``query-named-block-nodes`` and ``x-debug-query-block-graph``-style tools show).
    ``close`` releases the node; the registry calls it exactly once, on delete.
    """

    name: str
    node: BlockDriver
    driver: str
    owner: str = "monitor"
    auto_named: bool = False
    children: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    read_only: bool = False
    detect_zeroes: str = "off"
    blockers: list[str] = field(default_factory=list)
    """Reasons the node may not be deleted besides graph edges ("node is used as source of job 'j0'")."""

    @property
    def monitor_owned(self) -> bool:
        return self.owner == "monitor"


def check_node_name(name: str) -> None:
    """QEMU's node-name rules: a letter first, then letters, digits, '-', '.', '_'; at most 31 bytes."""
    if not isinstance(name, str) or not _NODE_NAME_RE.match(name):
        raise NodeRegistryError("Invalid node-name: '%s'" % name)
    if len(name.encode()) > NODE_NAME_MAX:
        raise NodeRegistryError("Node name too long")


class NodeRegistry:
    """The node table of one VM (plus the drives, so ``node`` arguments can name either)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._nodes: dict[str, NodeEntry] = {}
        self._backends: dict[str, Backend] = {}
        self._anonymous: list[Backend] = []
        self._counter = 0

    # -- names ------------------------------------------------------------------------------------------
    def auto_name(self) -> str:
        """A fresh automatic node-name, QEMU's ``#block<counter><2 random digits>`` shape (``#block123``);
        '#' cannot start a user's node-name, so the two never collide."""
        with self._lock:
            while True:
                self._counter += 1
                name = f"#block{self._counter}{random.randrange(100):02d}"
                if name not in self._nodes:
                    return name

    def check_free(self, name: str) -> None:
        """Raise unless ``name`` could name a new node: valid, and not used by a node or a drive."""
        check_node_name(name)
        with self._lock:
            if name in self._nodes:
                raise NodeRegistryError(f"Duplicate nodes with node-name='{name}'")
            if name in self._backends:
                raise NodeRegistryError(f"node-name={name} is conflicting with a device id")

    # -- nodes ------------------------------------------------------------------------------------------
    def add(self, entry: NodeEntry) -> NodeEntry:
        """Register ``entry`` (its children must be registered already). Raises on a duplicate name."""
        with self._lock:
            if not entry.auto_named:
                self.check_free(entry.name)
            elif entry.name in self._nodes:
                raise NodeRegistryError(f"Duplicate nodes with node-name='{entry.name}'")
            for role, child in entry.children.items():
                if child not in self._nodes:
                    raise NodeNotFoundError(f"Cannot find the {role} child '{child}' of '{entry.name}'")
            self._nodes[entry.name] = entry
        # Code that walks a drive's graph (the bitmap commands) recognises named nodes by this attribute.
        try:
            entry.node.node_name = entry.name  # type: ignore[attr-defined]
        except AttributeError:
            pass
        return entry

    def get(self, name: str) -> NodeEntry | None:
        with self._lock:
            return self._nodes.get(name)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._nodes

    def __iter__(self) -> Iterator[NodeEntry]:
        """The entries in creation order (children before the parents that use them)."""
        with self._lock:
            return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)

    def node(self, name: str) -> NodeEntry:
        """The entry of node-name ``name``; NodeNotFoundError with QEMU's blockdev-del wording otherwise."""
        entry = self.get(name)
        if entry is None:
            raise NodeNotFoundError(f"Failed to find node with node-name='{name}'")
        return entry

    def entry_of(self, node: object) -> NodeEntry | None:
        """The entry whose node is ``node`` (by identity), if it is registered."""
        with self._lock:
            for entry in self._nodes.values():
                if entry.node is node:
                    return entry
        return None

    def name_of(self, node: object) -> str | None:
        entry = self.entry_of(node)
        return entry.name if entry is not None else None

    def lookup(self, name: str) -> BlockDriver:
        """Resolve a QMP ``node`` argument: a drive id (its current root node) or a node-name, in QEMU's
        order (``bdrv_lookup_bs``: the device first)."""
        with self._lock:
            backend = self._backends.get(name)
            if backend is not None:
                return backend.root
            entry = self._nodes.get(name)
            if entry is not None:
                return entry.node
        raise NodeNotFoundError(f"Cannot find device='{name}' nor node-name='{name}'")

    def lookup_entry(self, name: str) -> NodeEntry:
        """Like :meth:`lookup`, but the registry entry (a drive's root that has no entry is an error)."""
        node = self.lookup(name)
        entry = self.entry_of(node)
        if entry is None:
            raise NodeNotFoundError(f"Cannot find device='{name}' nor node-name='{name}'")
        return entry

    def parents(self, name: str) -> list[tuple[str, str]]:
        """``(parent node-name, role)`` for every node that uses ``name`` as a child."""
        with self._lock:
            return [(entry.name, role) for entry in self._nodes.values()
                    for role, child in entry.children.items() if child == name]

    def users(self, name: str) -> list[str]:
        """Why ``name`` cannot go away now, each as QEMU phrases it (empty: free to delete)."""
        with self._lock:
            entry = self._nodes.get(name)
            if entry is None:
                return []
            reasons = [f"node is used as {role} of '{parent}'" for parent, role in self.parents(name)]
            reasons += [f"node is used by drive '{backend_id}'" for backend_id, backend in self._backends.items()
                        if backend.root is entry.node]
            reasons += entry.blockers
            return reasons

    def in_use_by_backend(self, name: str) -> bool:
        with self._lock:
            entry = self._nodes.get(name)
            return entry is not None and any(b.root is entry.node
                                             for b in [*self._backends.values(), *self._anonymous])

    def remove(self, name: str, *, by_monitor: bool = True) -> list[NodeEntry]:
        """Unregister ``name`` and the inline children it owns (which nobody else uses); return the entries
        removed, parent first, for the caller to close. Nothing changes when an error is raised:
        NodeNotFoundError, NodeRegistryError ("Node x is not owned by the monitor") or NodeInUseError
        ("Node x is in use" for a drive's root, "Block device x is in use" for a child of another node,
        "Node 'x' is busy: ..." for a blocker such as a job)."""
        with self._lock:
            entry = self.node(name)
            # QEMU 7.2's blockdev-del checks, in its order and words.
            if self.in_use_by_backend(name):
                raise NodeInUseError(f"Node {name} is in use")
            if entry.blockers:
                raise NodeInUseError(f"Node '{name}' is busy: {entry.blockers[0]}")
            if by_monitor and not entry.monitor_owned:
                raise NodeRegistryError(f"Node {name} is not owned by the monitor")
            if self.parents(name):
                raise NodeInUseError(f"Block device {name} is in use")
            removed = [entry]
            del self._nodes[name]
            for child in list(entry.children.values()):
                child_entry = self._nodes.get(child)
                if child_entry is not None and child_entry.owner == name and not self.users(child):
                    removed += self.remove(child, by_monitor=False)
            return removed

    # -- drives -----------------------------------------------------------------------------------------
    def add_backend(self, backend: Backend, name: str | None = None) -> None:
        """Make a drive findable by its id (``-drive id=``, or a device's backend by device id)."""
        key = name if name is not None else backend.id
        with self._lock:
            if key in self._nodes:
                raise NodeRegistryError(f"Device name '{key}' conflicts with an existing node name")
            self._backends[key] = backend

    def add_anonymous_backend(self, backend: Backend) -> None:
        """A backend without a name (a block export's, as in QEMU): its root is in use -- blockdev-del says
        "Node x is in use" -- but no ``node`` argument finds it."""
        with self._lock:
            self._anonymous.append(backend)

    def remove_anonymous_backend(self, backend: Backend) -> None:
        with self._lock:
            if backend in self._anonymous:
                self._anonymous.remove(backend)

    def remove_backend(self, name: str) -> None:
        with self._lock:
            self._backends.pop(name, None)

    def backend(self, name: str) -> Backend | None:
        with self._lock:
            return self._backends.get(name)

    def backends(self) -> dict[str, Backend]:
        with self._lock:
            return dict(self._backends)
