"""QMP ``query-chardev`` / HMP ``info chardev``: the VM's character backends described as QEMU does.

QEMU's ``filename`` of a chardev is its backend type plus where it leads: ``null``, ``stdio``, ``file``,
``pty:/dev/pts/N``, and for sockets ``unix:PATH[,server=on]`` or ``tcp:HOST:PORT[,server=on] <->
PEERHOST:PEERPORT`` while a peer is connected, with a ``disconnected:`` prefix (and no peer) while none is
(QEMU's ``qemu_chr_compute_filename``). The backends themselves come from the board's
:class:`~pyemu.system.chardev_registry.ChardevRegistry`.
"""

from __future__ import annotations

import socket
from typing import Any

from pyemu.chardev.file import FileBackend
from pyemu.chardev.null import NullBackend
from pyemu.chardev.pty import PtyBackend
from pyemu.chardev.socket import SocketBackend
from pyemu.chardev.spec import SocketSpec
from pyemu.chardev.stdio import StdioBackend
from pyemu.system.chardev_registry import ChardevRegistry


def _host_port(address: Any) -> str:
    host, port = str(address[0]), int(address[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_filename(spec: SocketSpec, local: str | tuple[str, int], peer: Any | None) -> str:
    """``unix:PATH,server=on`` / ``tcp:HOST:PORT,server=on <-> PEER`` with a peer connected (``peer`` is
    its address, or ``""`` for a Unix peer), ``disconnected:...`` without one."""
    server = ",server=on" if spec.server else ""
    if spec.family == "unix":
        text = f"unix:{local if isinstance(local, str) else spec.path}{server}"
        return text if peer is not None else f"disconnected:{text}"
    text = f"tcp:{_host_port(local) if not isinstance(local, str) else local}{server}"
    if peer is None:
        return f"disconnected:{text}"
    return f"{text} <-> {_host_port(peer)}"


def peer_address(sock: socket.socket | None) -> Any | None:
    """The peer of a connected socket (``""`` for an unnamed Unix peer), None if not connected."""
    if sock is None:
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None


def backend_filename(backend: object) -> str:
    """QEMU's ``filename`` for one of pyemu's character backends."""
    if isinstance(backend, SocketBackend):
        client = getattr(backend, "_client", None)  # the one connected peer, if any
        return socket_filename(backend.spec, backend.address, peer_address(client))
    if isinstance(backend, PtyBackend):
        return f"pty:{backend.pty_name}"
    if isinstance(backend, FileBackend):
        return "file"
    if isinstance(backend, StdioBackend):
        return "stdio"
    if isinstance(backend, NullBackend):
        return "null"
    return str(getattr(backend, "label", type(backend).__name__))


def query_chardev(registry: ChardevRegistry) -> list[dict[str, Any]]:
    """The ChardevInfo list, in the order the backends were opened."""
    out: list[dict[str, Any]] = []
    for use in registry.uses():
        filename = use.filename() if use.filename is not None else backend_filename(use.backend)
        out.append({"label": use.label, "filename": filename, "frontend-open": bool(use.frontend_open())})
    return out
