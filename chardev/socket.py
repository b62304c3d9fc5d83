"""Socket backends: ``unix:PATH[,server[,nowait]]`` and ``tcp:HOST:PORT[,server[,nowait]]``.

A server accepts one client at a time, as QEMU does: while a client is connected further connections
wait in the listen backlog, and when it leaves the next one is accepted. Without ``nowait`` opening blocks
until the first client connects (a harness can attach before the guest prints anything). Output with no
client connected is dropped; output a slow client has not read yet is buffered up to ``output_limit``
bytes and the excess dropped, so a stalled peer never blocks the VM (``write`` runs under the machine
lock) nor grows memory without bound. A Unix server removes its socket file on close.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import sys
import threading
from typing import Callable

from pyemu.chardev.base import CharBackend, Selectable, append_bounded, host_warning
from pyemu.chardev.errors import ChardevError, ChardevTimeoutError
from pyemu.chardev.spec import SocketSpec

READ_CHUNK = 4096
DEFAULT_OUTPUT_LIMIT = 1 << 20


def _stderr_notice(message: str) -> None:
    sys.stderr.write(f"pyemu: {message}\n")
    sys.stderr.flush()


class SocketBackend(CharBackend):
    """``connect_timeout`` bounds the start-up wait for a client (server with ``wait``) or the connect
    (client); None waits forever, like QEMU. ``notice`` receives the "waiting for connection" line."""

    def __init__(
        self,
        spec: SocketSpec,
        *,
        connect_timeout: float | None = None,
        notice: Callable[[str], None] | None = _stderr_notice,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> None:
        super().__init__(str(spec))
        self.spec = spec
        self.output_limit = output_limit
        self.bytes_dropped = 0
        self._lock = threading.Lock()  # guards _client, _output, _client_failed
        self._client: socket.socket | None = None
        self._client_failed = False
        self._output = bytearray()
        self._listener: socket.socket | None = None
        self._unix_identity: tuple[int, int] | None = None
        self._connected = threading.Event()
        try:
            if spec.server:
                self._listen()
                if spec.wait:
                    if notice is not None:
                        notice(f"waiting for connection on: {self.describe_address()}")
                    self._accept_first(connect_timeout)
                assert self._listener is not None
                self._listener.setblocking(False)
            else:
                self._connect(connect_timeout)
        except BaseException:
            self._close_resources()
            self._wake.close()
            raise
        self._start_thread(self._run, f"pyemu-chardev-{spec.family}")

    # -- set-up -----------------------------------------------------------------------------------------
    def _error(self, what: str, exc: OSError) -> ChardevError:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            return ChardevTimeoutError(f"{what}: timed out", spec=self.label)
        return ChardevError(f"{what}: {reason}", spec=self.label)

    def _listen(self) -> None:
        spec = self.spec
        if spec.family == "unix":
            self._remove_stale_socket(spec.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                listener.bind(spec.path)
                listener.listen(1)
                info = os.stat(spec.path)
            except OSError as exc:
                listener.close()
                raise self._error(f"cannot listen on unix socket '{spec.path}'", exc) from exc
            self._unix_identity = (info.st_dev, info.st_ino)
        else:
            family = socket.AF_INET6 if ":" in spec.bind_host else socket.AF_INET
            try:
                listener = socket.create_server((spec.bind_host, spec.port), family=family, backlog=1)
            except OSError as exc:
                raise self._error(f"cannot listen on tcp {spec.bind_host}:{spec.port}", exc) from exc
        self._listener = listener

    def _remove_stale_socket(self, path: str) -> None:
        """A socket file left by an earlier run is replaced (as QEMU does); any other file is an error."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(f"cannot check '{path}'", exc) from exc
        if not stat.S_ISSOCK(info.st_mode):
            raise ChardevError(f"'{path}' exists and is not a socket; refusing to replace it", spec=self.label)
        try:
            os.unlink(path)
        except OSError as exc:
            raise self._error(f"cannot remove stale socket '{path}'", exc) from exc

    def _accept_first(self, timeout: float | None) -> None:
        assert self._listener is not None
        self._listener.settimeout(timeout)
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            raise self._error(f"no client connected to {self.describe_address()}", exc) from exc
        self._set_client(conn)

    def _connect(self, timeout: float | None) -> None:
        spec = self.spec
        try:
            if spec.family == "unix":
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    conn.settimeout(timeout)
                    conn.connect(spec.path)
                except OSError:
                    conn.close()
                    raise
            else:
                conn = socket.create_connection((spec.bind_host, spec.port), timeout=timeout)
        except OSError as exc:
            raise self._error(f"cannot connect to {self.describe_address()}", exc) from exc
        self._set_client(conn)

    def _set_client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if self.spec.family == "tcp" and self.spec.nodelay:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._client = conn
            self._client_failed = False
            self._output.clear()
        self._connected.set()

    # -- status -----------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client is not None

    def wait_connected(self, timeout: float) -> bool:
        """Block until a peer is connected (tests, harnesses); False on timeout."""
        return self._connected.wait(timeout)

    @property
    def address(self) -> str | tuple[str, int]:
        """The listening (or connected-to) address: the path, or (host, port) with the real port."""
        if self.spec.family == "unix":
            return self.spec.path
        if self._listener is not None:
            name = self._listener.getsockname()
            return (str(name[0]), int(name[1]))
        return (self.spec.bind_host, self.spec.port)

    def describe_address(self) -> str:
        address = self.address
        if isinstance(address, str):
            return f"unix:{address}" + (",server" if self.spec.server else "")
        return f"tcp:{address[0]}:{address[1]}" + (",server" if self.spec.server else "")

    # -- output -----------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        wake = False
        with self._lock:
            client = self._client
            if client is None or self._client_failed:
                self.bytes_dropped += len(data)
                return
            if not self._output:
                try:
                    sent = client.send(data, socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._client_failed = True  # the I/O thread closes it; never close under its select
                    self.bytes_dropped += len(data)
                    self._wake.wake()
                    return
                data = data[sent:]
            if data:
                self.bytes_dropped += append_bounded(self._output, data, self.output_limit)
                wake = True
        if wake:
            self._wake.wake()

    # -- I/O thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._offer_input()
                with self._lock:
                    client = self._client
                    failed = self._client_failed
                    flush = bool(self._output)
                if client is not None and failed:
                    self._disconnect()
                    continue
                readers: list[Selectable] = [self._wake]
                writers: list[Selectable] = []
                if client is None:
                    if self._listener is not None:
                        readers.append(self._listener)
                else:
                    if self._wants_input():
                        readers.append(client)
                    if flush:
                        writers.append(client)
                readable, writable, _ = select.select(readers, writers, [], self._select_timeout())
                if self._wake in readable:
                    self._wake.drain()
                if self._listener is not None and self._listener in readable:
                    self._accept()
                if client is not None and client in writable:
                    self._flush(client)
                if client is not None and client in readable:
                    self._read(client)
        except (OSError, ValueError) as exc:
            if not self._closed.is_set():
                host_warning(f"chardev {self.label}: stopped: {exc}")

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return  # the peer gave up before we accepted, or no descriptors left: try again later
        self._set_client(conn)

    def _flush(self, client: socket.socket) -> None:
        with self._lock:
            if self._client is not client or not self._output:
                return
            try:
                sent = client.send(self._output, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                return
            except OSError:
                self._client_failed = True
                return
            del self._output[:sent]

    def _read(self, client: socket.socket) -> None:
        try:
            data = client.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._pending_input += data
        else:
            self._disconnect()

    def _disconnect(self) -> None:
        """The peer left: drop it and its unsent output; a server goes back to accepting."""
        with self._lock:
            client, self._client = self._client, None
            self.bytes_dropped += len(self._output)
            self._output.clear()
            self._client_failed = False
        self._connected.clear()
        if client is not None:
            client.close()

    # -- close ------------------------------------------------------------------------------------------
    def _close_resources(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._unix_identity is not None:
            try:
                info = os.stat(self.spec.path)
                if (info.st_dev, info.st_ino) == self._unix_identity:
                    os.unlink(self.spec.path)
            except OSError:
                pass
            self._unix_identity = None
