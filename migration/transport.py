"""QEMU's migration URIs as byte streams: ``file:PATH``, ``exec:COMMAND``, ``tcp:HOST:PORT``, ``unix:PATH``.

``file:`` writes or reads a regular file (QEMU 8.2's spelling; ``offset=`` is not supported). ``exec:``
runs ``COMMAND`` through ``/bin/sh -c`` as QEMU does: the saving side writes into its standard input, the
loading side reads its standard output; a command that exits non-zero fails the migration. ``tcp:`` and
``unix:`` are QEMU's socket migration: the destination listens (bound when ``-incoming``/``migrate-incoming``
is given, so a busy port fails at once) and takes one connection; the source connects. HOST may be an IPv6
address in brackets; port 0 on the destination picks a free port (:attr:`IncomingStream.address` tells
which). Parse and connect errors use QEMU 7.2's words. ``fd:`` is later work and refused by name.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import IO, Any, Callable, cast

from pyemu.migration.errors import TransportError

EXEC_TIMEOUT_S = 60.0
_LATER = ("fd:", "rdma:", "vsock:")
ACCEPT_POLL_S = 0.2


def parse_inet(rest: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as QEMU's inet_parse reads it; TransportError in its words.
    A non-numeric port is kept for the resolver to refuse, as QEMU does, so it is returned as -1 here
    only when the text is empty."""
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or rest[close + 1:close + 2] != ":":
            raise TransportError(f"error parsing IPv6 address '{rest}'")
        host, port = rest[1:close], rest[close + 2:]
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise TransportError(f"error parsing address '{rest}'")
    if not port:
        raise TransportError(f"error parsing address '{rest}'")
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransportError(f"address resolution failed for {rest}: {exc.strerror}") from None
    return str(infos[0][4][0]), int(infos[0][4][1])


def _socket_address(kind: str, rest: str) -> tuple[int, tuple[str, int] | str]:
    if kind == "unix":
        return socket.AF_UNIX, rest
    host, port = parse_inet(rest)
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)


def _split(uri: str) -> tuple[str, str]:
    if uri.startswith("tcp:"):
        rest = uri[4:]
        if ":" not in rest:
            raise TransportError(f"error parsing address '{rest}'")
        return "tcp", rest
    if uri.startswith("unix:"):
        if not uri[5:]:
            raise TransportError("invalid Unix socket address")
        return "unix", uri[5:]
    for scheme in ("file:", "exec:"):
        if uri.startswith(scheme):
            rest = uri[len(scheme):]
            if not rest:
                raise TransportError(f"'{uri}': the URI has no {'path' if scheme == 'file:' else 'command'}")
            return scheme[:-1], rest
    if uri.startswith(_LATER):
        raise TransportError(f"'{uri}': migration over {uri.split(':', 1)[0]} is not supported yet "
                             "(file:, exec:, tcp: and unix: are)")
    raise TransportError(f"unknown migration protocol: {uri}")


def check_uri(uri: str) -> None:
    """TransportError unless ``uri`` is a supported migration URI."""
    _split(uri)


def is_socket_uri(uri: str) -> bool:
    """A ``tcp:``/``unix:`` URI: the destination listens and waits for the source in the background."""
    return uri.startswith(("tcp:", "unix:"))


class _Endpoint:
    """The open end of a URI: a file, an ``exec:`` command's pipe, or a socket (connected on the saving
    side; listening on the loading side until :meth:`IncomingStream.accept`)."""

    def __init__(self, uri: str, *, writing: bool) -> None:
        self.uri = uri
        kind, rest = _split(uri)
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._unix_path: str | None = None
        if kind in ("tcp", "unix"):
            family, address = _socket_address(kind, rest)
            self._open_socket(family, address, rest, writing)
            return
        try:
            if kind == "file":
                self._io: IO[bytes] = open(rest, "wb" if writing else "rb")
            elif writing:
                self._process = subprocess.Popen(["/bin/sh", "-c", rest], stdin=subprocess.PIPE)
                assert self._process.stdin is not None
                self._io = self._process.stdin
            else:
                self._process = subprocess.Popen(["/bin/sh", "-c", rest], stdout=subprocess.PIPE)
                assert self._process.stdout is not None
                self._io = self._process.stdout
        except OSError as exc:
            raise TransportError(f"'{uri}': {exc.strerror or exc}") from exc

    def _open_socket(self, family: int, address: tuple[str, int] | str, rest: str, writing: bool) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if writing:
                sock.connect(address)
                self._socket = sock
                self._io = cast(IO[bytes], sock.makefile("wb", buffering=1 << 16))
            else:
                if family != socket.AF_UNIX:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                elif isinstance(address, str) and os.path.exists(address) and not os.path.isdir(address):
                    os.unlink(address)  # a stale socket left by an earlier run, as QEMU does
                sock.bind(address)
                sock.listen(1)
                sock.settimeout(ACCEPT_POLL_S)
                self._listener = sock
                self._unix_path = address if isinstance(address, str) else None
        except OSError as exc:
            sock.close()
            verb = "connect to" if writing else "bind socket to"
            raise TransportError(f"Failed to {verb} '{rest}': {exc.strerror or exc}") from None

    def shutdown(self) -> None:
        """Break a connected socket from another thread (migrate_cancel): blocked reads and writes end."""
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _close_socket(self) -> None:
        for sock in (self._socket, self._listener):
            if sock is not None:
                sock.close()
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
            self._unix_path = None

    def _reap(self, check: bool = True) -> None:
        """Wait for an ``exec:`` command (killed first when ``check`` is off and it still runs); a command
        that fails or hangs past EXEC_TIMEOUT_S fails the migration."""
        if self._process is None:
            return
        if self._process.poll() is None and not check:
            self._process.kill()
        try:
            status = self._process.wait(timeout=EXEC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise TransportError(f"'{self.uri}': the command did not finish within {EXEC_TIMEOUT_S:g} s") from None
        if check and status != 0:
            raise TransportError(f"'{self.uri}': the command exited with status {status}")


class OutgoingStream(_Endpoint):
    """Where a save goes. ``close`` finishes it (and reports a failed ``exec:`` command)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, writing=True)

    def write(self, data: bytes, /) -> int:
        try:
            return self._io.write(data)
        except OSError as exc:
            if self._process is not None:
                try:
                    status = self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                else:
                    raise TransportError(f"'{self.uri}': the command exited with status {status} before "
                                         "it read the whole stream") from exc
            raise TransportError(f"'{self.uri}': write failed: {exc.strerror or exc}") from exc

    def close(self) -> None:
        try:
            self._io.close()
        except OSError as exc:
            raise TransportError(f"'{self.uri}': {exc.strerror or exc}") from exc
        finally:
            self._close_socket()
            self._reap()

    def abort(self) -> None:
        self.shutdown()
        try:
            self._io.close()
        except OSError:
            pass
        self._close_socket()
        self._reap(check=False)


class IncomingStream(_Endpoint):
    """Where a load comes from: a readable binary stream; ``close`` reports a failed ``exec:`` command."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, writing=False)

    @property
    def address(self) -> tuple[str, int] | str | None:
        """Where a socket destination listens (the real port when 0 was asked for); None otherwise."""
        return self._listener.getsockname() if self._listener is not None else self._unix_path

    @property
    def listening(self) -> bool:
        """A socket destination still waiting for its source."""
        return self._listener is not None

    def socket_address(self) -> dict[str, Any]:
        """Where this destination listens, as QEMU's query-migrate ``socket-address`` entry."""
        address = self.address
        if isinstance(address, str) or address is None:
            return {"type": "unix", "path": address or ""}
        host = str(address[0])
        return {"type": "inet", "host": host, "port": str(address[1]),
                ("ipv6" if ":" in host else "ipv4"): True}

    def accept(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Wait for the source to connect (socket URIs; nothing to do for the others). ``cancelled`` is
        polled so a destination that gives up (migrate_cancel, quit) does not wait forever."""
        listener = self._listener
        if listener is None:
            return
        while True:
            if cancelled():
                raise TransportError(f"'{self.uri}': the incoming migration was cancelled before the source "
                                     "connected")
            try:
                conn, _ = listener.accept()
                break
            except socket.timeout:
                continue
            except OSError as exc:
                raise TransportError(f"'{self.uri}': accept failed: {exc.strerror or exc}") from None
        conn.settimeout(None)
        listener.close()
        self._listener = None
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
            self._unix_path = None
        self._socket = conn
        self._io = cast(IO[bytes], conn.makefile("rb", buffering=1 << 16))

    @property
    def source(self) -> IO[bytes]:
        return self._io

    def close(self, check: bool = True) -> None:
        if self._listener is None:
            try:
                self._io.close()
            except OSError:
                pass
        self._close_socket()
        self._reap(check)
