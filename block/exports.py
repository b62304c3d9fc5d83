"""A VM's block exports: its one NBD server and the nodes it serves (QEMU's ``block/export`` layer).

QMP's ``nbd-server-start``/``block-export-add``/``block-export-del``/``nbd-server-stop`` (and the older
``nbd-server-add``/``nbd-server-remove``) are thin spellings over this manager; the monitor only parses
arguments (:mod:`pyemu.monitor.nbd_commands`). Keeping the life cycle here, away from QMP, lets the VM
close every export before it closes the block graph, and lets tests drive exports without a monitor.

An export is what QEMU makes of it:

* its own anonymous :class:`~pyemu.block.backend.BlockBackend` on the node -- reads (and writes, when
  writable) pass through it, so writes from NBD clients mark the node's dirty bitmaps like a guest's, and
  the graph permissions it holds (consistent read, + write when writable; sharing everything, as QEMU's
  exports do) make a writable export of a disk a running device writes fail with a permission conflict;
  the registry counts that backend, so ``blockdev-del`` of an exported node says "Node x is in use";
* the dirty bitmaps it offers as ``qemu:dirty-bitmap:NAME`` are *busy* while exported (nobody may
  clear, enable, disable, merge into or remove them) and released after;
* removal is QEMU's refcount: ``mode=safe`` is refused while a client is connected, ``mode=hard``
  disconnects the clients, and the export is gone -- backend closed, bitmaps released,
  ``BLOCK_EXPORT_DELETED`` sent -- only once its last client has left. Until then it is listed with
  ``shutting-down: true``. ``nbd-server-stop`` removes every export that way and waits for them.

Errors are :class:`ExportError` with QEMU 7.2's messages (checked against qemu-storage-daemon 7.2).
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, cast

from pyemu.block.backend import BlockBackend, CacheMode
from pyemu.block.borrowed import BorrowedNode, activate, deactivate
from pyemu.block.dirty_bitmap import DirtyBitmap, existing_bitmaps
from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.block.locking import PERM_ALL
from pyemu.block.nbd.export import NbdExport
from pyemu.block.nbd.protocol import MAX_STRING
from pyemu.block.nbd.server import NbdServer, bind_unix
from pyemu.block.registry import NodeRegistry, NodeRegistryError

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]
RELEASE_TIMEOUT = 30.0
"""Seconds ``nbd-server-stop`` waits for the clients of an export to finish their requests; after that the
export is released anyway (its backend still waits for requests in flight before it closes)."""
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU's id_wellformed



SAFE_REMOVAL_GRACE = 0.5
"""Seconds a safe ``block-export-del`` waits for clients that are disconnecting before it refuses."""

class ExportError(BlockError):
    """A block export or NBD server request was refused; the message is QEMU's."""


@dataclass(frozen=True)
class UnixAddress:
    """``{"type": "unix", "data": {"path": ..., "abstract": ..., "tight": ...}}``."""

    path: str
    abstract: bool = False
    tight: bool = True


@dataclass(frozen=True)
class InetAddress:
    """``{"type": "inet", "data": {"host": ..., "port": ...}}``; the port is a string, as in QEMU (a
    service name works too). ``ipv4``/``ipv6`` restrict the address family."""

    host: str
    port: str
    ipv4: bool | None = None
    ipv6: bool | None = None


ListenAddress = UnixAddress | InetAddress


@dataclass(eq=False)
class BlockExport:
    """One export: ``id`` (QMP's), the node and its registry name, the NBD view, and its state."""

    id: str
    node_name: str
    node: BlockDriver
    backend: BlockBackend
    nbd: NbdExport
    registry: NodeRegistry
    bitmaps: tuple[DirtyBitmap, ...]
    activated: bool = False
    shutting_down: bool = False
    released: threading.Event = field(default_factory=threading.Event)

    def info(self) -> dict[str, Any]:
        """QEMU's BlockExportInfo."""
        return {"id": self.id, "type": "nbd", "node-name": self.node_name, "shutting-down": self.shutting_down}


def _below(node: object) -> object | None:
    """The next node of QEMU's ``bdrv_filter_or_cow_bs`` chain: a filter's child, else the backing file."""
    nxt = getattr(node, "filtered_child", None)
    if nxt is None:
        nxt = getattr(node, "backing", None)
    return nxt.node if isinstance(nxt, BorrowedNode) else nxt


def find_bitmap_in_chain(node: object, name: str) -> tuple[object, DirtyBitmap] | None:
    """The first bitmap called ``name`` on ``node`` or down its filter / backing chain, with its node (how
    ``block-export-add``'s ``bitmaps: ["name"]`` finds a bitmap under a fleecing filter or an overlay)."""
    seen: set[int] = set()
    current: object | None = node.node if isinstance(node, BorrowedNode) else node
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        bitmaps = existing_bitmaps(current)
        if bitmaps is not None:
            found = bitmaps.get(name)
            if found is not None:
                return current, found
        current = _below(current)
    return None


def _check_usable(bitmap: DirtyBitmap) -> None:
    """QEMU's ``bdrv_dirty_bitmap_check(BDRV_BITMAP_ALLOW_RO)``: a read-only bitmap may be exported."""
    if bitmap.busy:
        raise ExportError(f"Bitmap '{bitmap.name}' is currently in use by another operation and cannot be used")
    if bitmap.inconsistent:
        raise ExportError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


class ExportManager:
    """The block exports of one VM and its NBD server. Thread safe: QMP calls in on the monitor's thread,
    releases happen on the thread of an export's last client."""

    def __init__(self, emit: EventSink) -> None:
        self._emit = emit
        self._lock = threading.Lock()
        self._server: NbdServer | None = None
        self._listener: socket.socket | None = None
        self._exports: dict[str, BlockExport] = {}

    # -- the NBD server -------------------------------------------------------------------------------------

    @property
    def server_running(self) -> bool:
        return self._server is not None

    @property
    def server_address(self) -> Any:
        """Where the server listens (``getsockname()``: a path, or ``(host, port)`` -- the port chosen for
        ``port: "0"``), None when it is not running."""
        listener = self._listener
        return listener.getsockname() if listener is not None else None

    def start_nbd_server(self, address: ListenAddress, *, max_connections: int = 0) -> None:
        """QMP ``nbd-server-start``: listen on ``address``. ``max_connections`` 0 is unlimited; at the limit
        further clients wait in the listen backlog, as QEMU stops accepting."""
        with self._lock:
            if self._server is not None:
                raise ExportError("NBD server already running")
            listener = _bind(address)
            server = NbdServer(max_clients=max_connections)
            server.add_listener(listener)
            self._server, self._listener = server, listener

    def stop_nbd_server(self) -> None:
        """QMP ``nbd-server-stop``: remove every export (disconnecting its clients), wait until they are
        gone (each sends BLOCK_EXPORT_DELETED), then stop listening."""
        with self._lock:
            server = self._server
            if server is None:
                raise ExportError("NBD server not running")
            exports = list(self._exports.values())
            newly = [e for e in exports if not e.shutting_down]
            for export in newly:
                export.shutting_down = True
        for export in newly:
            self._remove_from_server(server, export)
        for export in exports:
            if not export.released.wait(RELEASE_TIMEOUT):
                log.warning("NBD export '%s': clients did not finish in %s s; releasing it", export.id,
                            RELEASE_TIMEOUT)
                self._release(export)
        with self._lock:
            self._server, self._listener = None, None
        server.close()

    def close(self) -> None:
        """VM shutdown: stop the server and release every export before the block graph closes."""
        if self._server is not None:
            try:
                self.stop_nbd_server()
            except ExportError:  # stopped meanwhile by another thread
                pass

    # -- exports --------------------------------------------------------------------------------------------

    def get(self, export_id: str) -> BlockExport | None:
        with self._lock:
            return self._exports.get(export_id)

    def query(self) -> list[dict[str, Any]]:
        """QMP ``query-block-exports``: newest first, as QEMU lists them."""
        with self._lock:
            return [export.info() for export in reversed(list(self._exports.values()))]

    def check_new_id(self, export_id: str) -> None:
        """QEMU's first checks of a new export: a well-formed id that no export uses."""
        if not _ID_RE.match(export_id):
            raise ExportError("Invalid block export id")
        with self._lock:
            if export_id in self._exports:
                raise ExportError(f"Block export id '{export_id}' is already in use")

    def add_nbd_export(self, registry: NodeRegistry, *, export_id: str, node: BlockDriver, node_name: str,
                       name: str | None = None, description: str | None = None, writable: bool = False,
                       writethrough: bool = False, bitmaps: Sequence[str | tuple[str, str]] = ()) -> BlockExport:
        """QMP ``block-export-add`` with ``type: nbd`` for an already resolved ``node``. ``bitmaps`` are names
        looked up on the node and down its filter/backing chain, or ``(node, name)`` pairs. QEMU's checks in
        QEMU's order; nothing is left behind when one fails."""
        self.check_new_id(export_id)
        if writable and node.read_only:
            raise ExportError("Cannot export read-only node as writable")
        backend = self._open_backend(registry, node, node_name, export_id, writable, writethrough)
        try:
            return self._create(registry, backend, export_id=export_id, node=node, node_name=node_name,
                                name=node_name if name is None else name, description=description or "",
                                writable=writable, bitmaps=bitmaps)
        except BaseException:
            backend.close()
            if writable:
                deactivate(node)
            registry.remove_anonymous_backend(backend)
            raise

    @staticmethod
    def _open_backend(registry: NodeRegistry, node: BlockDriver, node_name: str, export_id: str, writable: bool,
                      writethrough: bool) -> BlockBackend:
        entry = registry.get(node_name)
        options = entry.options if entry is not None and isinstance(entry.options, dict) else {}
        # As in QEMU, a client's TRIM reaches the node only when the node was opened with discard=unmap.
        discard = "unmap" if options.get("discard") == "unmap" else "ignore"
        if writable:
            activate(node)  # a writer sits on the node now: borrowed children take their full permissions
        try:
            backend = BlockBackend(node, read_only=not writable, cache=CacheMode(writeback=not writethrough),
                                   discard=discard, owns_root=False, user=f"block export '{export_id}'",
                                   shared=PERM_ALL)
        except BaseException:
            if writable:
                deactivate(node)
            raise
        registry.add_anonymous_backend(backend)
        return backend

    def _create(self, registry: NodeRegistry, backend: BlockBackend, *, export_id: str, node: BlockDriver,
                node_name: str, name: str, description: str, writable: bool,
                bitmaps: Sequence[str | tuple[str, str]]) -> BlockExport:
        """QEMU's ``nbd_export_create``: the server must run, the name be free, the bitmaps usable."""
        with self._lock:
            server = self._server
        if server is None:
            raise ExportError("NBD server not running")
        if len(name.encode("utf-8")) > MAX_STRING:
            raise ExportError(f"export name '{name}' too long")
        if len(description.encode("utf-8")) > MAX_STRING:
            raise ExportError(f"description '{description}' too long")
        if server.export(name) is not None:
            raise ExportError(f"NBD server already has export named '{name}'")
        chosen: list[DirtyBitmap] = []
        for spec in bitmaps:
            owner, bitmap = self._resolve_bitmap(registry, node, spec)
            _check_usable(bitmap)
            if not writable and not getattr(owner, "read_only", True) and bitmap.enabled:
                raise ExportError(f"Enabled bitmap '{bitmap.name}' incompatible with readonly export")
            # QEMU accepts a bitmap named twice; one context per name is what a client can tell apart.
            if all(b.name != bitmap.name for b in chosen):
                chosen.append(bitmap)
        nbd = NbdExport(name, cast(BlockDriver, backend), description=description, writable=writable,
                        bitmaps=tuple(chosen), multi_conn=not writable)  # QEMU: multi-conn on read-only exports
        export = BlockExport(export_id, node_name, node, backend, nbd, registry, tuple(chosen), activated=writable)
        with self._lock:
            if self._server is not server:
                raise ExportError("NBD server not running")
            if export_id in self._exports:
                raise ExportError(f"Block export id '{export_id}' is already in use")
            for bitmap in chosen:  # after every check: a refusal above leaves no bitmap busy
                if bitmap.busy:
                    raise ExportError(f"Bitmap '{bitmap.name}' is currently in use by another operation and "
                                      "cannot be used")
            try:
                server.add_export(nbd)
            except BlockError:
                raise ExportError(f"NBD server already has export named '{name}'") from None
            for bitmap in chosen:
                bitmap.busy = True
            self._exports[export_id] = export
        return export

    @staticmethod
    def _resolve_bitmap(registry: NodeRegistry, node: BlockDriver,
                        spec: str | tuple[str, str]) -> tuple[object, DirtyBitmap]:
        if isinstance(spec, str):
            found = find_bitmap_in_chain(node, spec)
            if found is None:
                raise ExportError(f"Bitmap '{spec}' is not found")
            return found
        node_arg, bitmap_name = spec
        try:
            owner: object = registry.lookup(node_arg)
        except NodeRegistryError:
            raise ExportError(f"Node '{node_arg}' not found") from None
        if isinstance(owner, BorrowedNode):
            owner = owner.node
        set_ = existing_bitmaps(owner)
        bitmap = set_.get(bitmap_name) if set_ is not None else None
        if bitmap is None:
            raise ExportError(f"Dirty bitmap '{bitmap_name}' not found")
        return owner, bitmap

    def _settle_clients(self, export_id: str, grace: float = SAFE_REMOVAL_GRACE) -> None:
        """Give clients that already closed their connection a moment to be noticed: a tool that has just
        exited (qemu-io, nbdcopy) is otherwise still counted for a few milliseconds, and a safe removal right
        after it would be refused at random. A client that stays connected is still refused after ``grace``."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                export = self._exports.get(export_id)
                server = self._server
                if export is None or server is None or not server.clients_of(export.nbd.name):
                    return
            time.sleep(0.01)

    def delete(self, export_id: str, *, hard: bool = False) -> None:
        """QMP ``block-export-del``. ``hard`` disconnects the clients; safe mode refuses while any is
        connected. BLOCK_EXPORT_DELETED follows once the export is really gone (before this returns when
        no client was connected)."""
        if not hard:
            self._settle_clients(export_id)
        with self._lock:
            export = self._exports.get(export_id)
            if export is None:
                raise ExportError(f"Export '{export_id}' is not found")
            if export.shutting_down:
                raise ExportError(f"Export '{export_id}' is already shutting down")
            server = self._server
            assert server is not None  # exports only exist while the server runs
            if not hard and server.clients_of(export.nbd.name):
                raise ExportError(f"export '{export_id}' still in use")
            export.shutting_down = True
        self._remove_from_server(server, export)

    def _remove_from_server(self, server: NbdServer, export: BlockExport) -> None:
        try:
            server.remove_export(export.nbd.name, on_released=lambda: self._release(export))
        except BlockError:  # not served any more (cannot happen while the table is consistent)
            self._release(export)

    def _release(self, export: BlockExport) -> None:
        """The export's last client is gone: let go of the node and the bitmaps, forget it, tell QMP."""
        with self._lock:
            if export.released.is_set():
                return
            export.released.set()
            self._exports.pop(export.id, None)
            for bitmap in export.bitmaps:
                bitmap.busy = False
        export.backend.close()
        export.registry.remove_anonymous_backend(export.backend)
        if export.activated:
            deactivate(export.node)
        self._emit("BLOCK_EXPORT_DELETED", {"id": export.id})


def _bind(address: ListenAddress) -> socket.socket:
    """A listening socket for ``address``, or ExportError with QEMU's words."""
    if isinstance(address, UnixAddress):
        if not address.abstract:
            try:
                return bind_unix(address.path)
            except OSError as exc:
                raise ExportError(f"Failed to bind socket to {address.path}: "
                                  f"{os.strerror(exc.errno or _errno.EINVAL)}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw = b"\0" + address.path.encode()
        if not address.tight:
            raw = raw.ljust(108, b"\0")  # the whole sun_path, as QEMU's tight=off
        try:
            sock.bind(raw)
            sock.listen(16)
        except (OSError, ValueError) as exc:
            sock.close()
            reason = os.strerror(exc.errno or _errno.EINVAL) if isinstance(exc, OSError) else str(exc)
            raise ExportError(f"Failed to bind socket to {address.path}: {reason}") from None
        return sock
    family = socket.AF_UNSPEC
    if address.ipv4 and not address.ipv6:
        family = socket.AF_INET
    elif address.ipv6 and not address.ipv4:
        family = socket.AF_INET6
    try:
        infos = socket.getaddrinfo(address.host or None, address.port, family, socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = (exc.strerror or str(exc)) if isinstance(exc, socket.gaierror) else str(exc)
        raise ExportError(f"address resolution failed for {address.host}:{address.port}: {reason}") from None
    last = _errno.EADDRNOTAVAIL
    for fam, type_, proto, _, addr in infos:
        sock = socket.socket(fam, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(16)
            return sock
        except OSError as exc:
            sock.close()
            last = exc.errno or _errno.EINVAL
    raise ExportError(f"Failed to find an available port: {os.strerror(last)}")
