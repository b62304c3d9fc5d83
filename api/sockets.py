"""Connecting to a VM's sockets (QMP monitors, the serial console) by the address a user writes."""

from __future__ import annotations

import socket


def connect_stream(address: str, timeout: float) -> socket.socket:
    """A connected stream socket to ``address``: a Unix socket path, or ``HOST:PORT`` for TCP (an address
    with ``/`` is always a path). Raises OSError; the socket is blocking with ``timeout`` set."""
    host, sep, port = address.rpartition(":")
    if sep and "/" not in address and port.isdigit():
        return socket.create_connection((host or "localhost", int(port)), timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock
