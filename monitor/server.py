"""QMP listeners: ``-qmp unix:PATH,server=on,wait=off``, ``-qmp tcp:HOST:PORT,...``, ``-qmp stdio`` and
libvirt's ``-chardev socket,id=mon,... -mon chardev=mon,mode=control``, all served by one background
thread with a selector.

Every listener accepts any number of clients at once, each with its own :class:`QmpSession`. Commands run
on the server thread one at a time (QEMU too runs QMP commands in its main loop), so a slow ``stop`` delays
other clients but never interleaves with them. Events come from any thread: they are queued and the
selector is woken through a pipe. Output is buffered per client and bounded: a client that stops reading
is dropped rather than letting memory grow. A client that goes away mid-command only loses its reply.
"""

from __future__ import annotations

import collections
import errno
import os
import selectors
import socket
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from pyemu.chardev.spec import UNIX_PATH_MAX, SocketSpec, StdioSpec, parse_chardev_spec
from pyemu.errors import ConfigError, PyemuError
from pyemu.monitor.chardev_info import peer_address, socket_filename
from pyemu.monitor.control import ControlApi
from pyemu.monitor.qmp import QmpSession, timestamp
from pyemu.system.config import ObjectOptions, VmConfig

if TYPE_CHECKING:
    from pyemu.monitor.hmp_session import HmpSession

MAX_PENDING_OUTPUT = 16 << 20
"""Bytes queued for one client before it is considered stuck and dropped."""
READ_SIZE = 65536
CLOSE_FLUSH_SECONDS = 2.0

EndpointSpec = Union[SocketSpec, StdioSpec]


class MonitorError(PyemuError):
    """A QMP listener cannot be set up (address in use, path not writable...)."""


@dataclass(frozen=True)
class Endpoint:
    """Where one monitor listens (or, ``server=off``, connects to), how the user wrote it (for messages),
    which protocol it speaks, and its chardev label (``compat_monitorN`` or the ``-chardev`` id)."""

    spec: EndpointSpec
    label: str
    pretty: bool = False
    mode: str = "control"
    chardev_label: str = ""


def parse_qmp_spec(text: str, option: str = "-qmp") -> Endpoint:
    """Validate a ``-qmp``/``-monitor`` argument: a unix/tcp socket (listening, or with ``server=off``
    connecting out to a listening client) or stdio."""
    spec = parse_chardev_spec(text, option=option)
    return _endpoint(spec, f"{option} {text}", option)


def _endpoint(spec: object, label: str, option: str, pretty: bool = False) -> Endpoint:
    if isinstance(spec, StdioSpec):
        return Endpoint(spec, label, pretty)
    if isinstance(spec, SocketSpec):
        return Endpoint(spec, label, pretty)
    raise ConfigError(f"{label}: a monitor needs a socket (unix:PATH,server=on,wait=off or "
                      "tcp:HOST:PORT,server=on,wait=off, or server=off to connect out) or stdio", option=option)


def endpoints_from_config(config: VmConfig) -> list[Endpoint]:
    """Every ``-qmp``, ``-qmp-pretty``, ``-monitor`` and ``-mon`` of ``config``, in command-line order.
    Monitors given by a spec are labelled ``compat_monitorN`` in that order, as in QEMU."""
    from pyemu.chardev.options import describe, parse_chardev_options

    chardevs: dict[str, ObjectOptions] = {c.id: c for c in config.chardevs}
    out: list[Endpoint] = []
    compat = 0
    for monitor in config.monitors:
        if monitor.spec is not None:
            option = "-qmp" if monitor.mode == "control" else "-monitor"
            endpoint = parse_qmp_spec(monitor.spec, option)
            out.append(Endpoint(endpoint.spec, endpoint.label, monitor.pretty, monitor.mode,
                                f"compat_monitor{compat}"))
            compat += 1
            continue
        assert monitor.chardev is not None
        options = chardevs.get(monitor.chardev)
        if options is None:  # VmConfig checks this; a config built by hand may not have
            raise ConfigError(f"-mon: chardev '{monitor.chardev}' not found", option="-mon")
        parsed = parse_chardev_options(options)
        endpoint = _endpoint(parsed.spec, f"-chardev {describe(options)}", "-mon", monitor.pretty)
        out.append(Endpoint(endpoint.spec, endpoint.label, monitor.pretty, monitor.mode, options.id))
    return out


class _Client:
    """One connected client (or stdio): its fds, its session and its pending output."""

    def __init__(self, server: "MonitorServer", rfd: int, wfd: int, sock: socket.socket | None,
                 endpoint: Endpoint) -> None:
        self.server = server
        self.rfd = rfd
        self.wfd = wfd
        self.sock = sock
        self.endpoint = endpoint
        self.out = bytearray()
        self.dead = False
        self.session: QmpSession | HmpSession
        # The command tables (HMP's and QMP's import every command module, ~35 ms) are loaded when a
        # monitor client appears, not by every VM's start-up.
        if endpoint.mode == "readline":
            from pyemu.monitor.hmp import HumanMonitor
            from pyemu.monitor.hmp_session import HmpSession

            # On stdio the terminal echoes and edits the line itself (cooked mode).
            self.session = HmpSession(HumanMonitor(server.control), self.queue,
                                      echo=not isinstance(endpoint.spec, StdioSpec))
        else:
            from pyemu.monitor.commands import make_executor

            self.session = QmpSession(make_executor(server.control), self.queue, pretty=endpoint.pretty)

    def queue(self, data: bytes) -> None:
        if self.dead:
            return
        self.out += data
        if len(self.out) > MAX_PENDING_OUTPUT:
            self.dead = True
            return
        self.flush()

    def flush(self) -> None:
        while self.out and not self.dead:
            try:
                written = os.write(self.wfd, self.out)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError:
                self.dead = True
                break
            del self.out[:written]
        self.server._update_interest(self)

    def close(self) -> None:
        self.dead = True
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass


class MonitorServer:
    """Serves QMP on the given endpoints for one VM, on a daemon thread."""

    def __init__(self, control: ControlApi, endpoints: list[Endpoint]) -> None:
        self.control = control
        self.endpoints = endpoints
        self._selector = selectors.DefaultSelector()
        self._listeners: list[tuple[socket.socket, Endpoint]] = []
        self._clients: list[_Client] = []
        self._events: collections.deque[tuple[str, dict[str, Any], dict[str, int]]] = collections.deque()
        self._events_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._unlink: list[str] = []
        control.subscribe(self.emit)

    # -- set-up -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """:meth:`open` and :meth:`serve` at once (for callers that need no gap between them)."""
        self.open()
        self.serve()

    def open(self) -> None:
        """Open every listener (errors are :class:`MonitorError`) and wait for a first client where
        ``wait=on`` asks for it. Clients that connect now are queued until :meth:`serve`, so the VM
        runner can start the VM in between and nobody sees a half-started machine (as in QEMU, whose
        main loop serves monitors only once the VM is started)."""
        try:
            for endpoint in self.endpoints:
                self._register_chardev(endpoint)
                if isinstance(endpoint.spec, StdioSpec):
                    self._add_client(0, 1, None, endpoint)
                    continue
                if not endpoint.spec.server:
                    conn = self._connect(endpoint)
                    self._add_client(conn.fileno(), conn.fileno(), conn, endpoint)
                    continue
                sock = self._listen(endpoint)
                self._listeners.append((sock, endpoint))
                if endpoint.spec.wait:
                    print(f"pyemu: QMP: waiting for connection on {endpoint.spec}", file=sys.stderr, flush=True)
                    conn, _ = sock.accept()
                    self._add_client(conn.fileno(), conn.fileno(), conn, endpoint)
                sock.setblocking(False)
                self._selector.register(sock, selectors.EVENT_READ, ("listen", endpoint))
        except BaseException:
            self.close()
            raise

    def serve(self) -> None:
        """Start answering clients on the background thread."""
        self._thread = threading.Thread(target=self._loop, name="pyemu-qmp", daemon=True)
        self._thread.start()

    def _listen(self, endpoint: Endpoint) -> socket.socket:
        spec = endpoint.spec
        assert isinstance(spec, SocketSpec)
        try:
            if spec.family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    os.unlink(spec.path)  # a stale socket from an earlier run, as QEMU does
                except FileNotFoundError:
                    pass
                except OSError as error:
                    sock.close()
                    raise MonitorError(f"{endpoint.label}: cannot replace {spec.path}: {error.strerror}") from error
                # Bind under a temporary name and rename once listening, so the path never exists
                # without a listener behind it (a client polling for it would get ECONNREFUSED).
                staging = f"{spec.path}.{os.getpid()}~"
                if len(staging.encode()) > UNIX_PATH_MAX:
                    staging = spec.path
                sock.bind(staging)
                sock.listen(16)
                if staging != spec.path:
                    os.rename(staging, spec.path)
                self._unlink.append(spec.path)
                return sock
            else:
                infos = socket.getaddrinfo(spec.bind_host, spec.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
                family = infos[0][0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(infos[0][4])
            sock.listen(16)
            return sock
        except MonitorError:
            raise
        except OSError as error:
            raise MonitorError(f"{endpoint.label}: cannot listen: {error.strerror or error}") from error

    def _connect(self, endpoint: Endpoint) -> socket.socket:
        """``server=off``: connect out to a client that listens (QEMU's reverse monitor connection, which
        e.g. qemu.qmp's ``QMPClient.accept()`` waits for)."""
        spec = endpoint.spec
        assert isinstance(spec, SocketSpec)
        target = spec.path if spec.family == "unix" else f"{spec.bind_host}:{spec.port}"
        try:
            if spec.family == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(spec.path)
                except OSError:
                    sock.close()
                    raise
                return sock
            return socket.create_connection((spec.bind_host, spec.port))
        except OSError as error:
            raise MonitorError(f"{endpoint.label}: Failed to connect to '{target}': "
                               f"{error.strerror or error}") from error

    def _register_chardev(self, endpoint: Endpoint) -> None:
        """List the monitor's socket or stdio in ``query-chardev``, as QEMU lists its monitor chardevs."""
        registry = getattr(self.control.machine, "chardevs", None)
        if registry is not None and endpoint.chardev_label:
            registry.add(endpoint.chardev_label, self, filename=lambda: self._chardev_filename(endpoint))

    def _chardev_filename(self, endpoint: Endpoint) -> str:
        spec = endpoint.spec
        if not isinstance(spec, SocketSpec):
            return "stdio"
        client = next((c for c in list(self._clients) if c.endpoint is endpoint and not c.dead), None)
        peer = peer_address(client.sock) if client is not None else None
        local: str | tuple[str, int] = spec.path
        if spec.family == "tcp":
            listener = next((sock for sock, ep in self._listeners if ep is endpoint), None)
            own = listener if listener is not None else (client.sock if client is not None else None)
            try:
                local = own.getsockname()[:2] if own is not None else (spec.bind_host, spec.port)
            except OSError:
                local = (spec.bind_host, spec.port)
        return socket_filename(spec, local, peer)

    def _add_client(self, rfd: int, wfd: int, sock: socket.socket | None, endpoint: Endpoint) -> None:
        if sock is not None:
            sock.setblocking(False)
        client = _Client(self, rfd, wfd, sock, endpoint)
        self._clients.append(client)
        self._selector.register(rfd, selectors.EVENT_READ, ("client", client))
        client.session.start()

    def _update_interest(self, client: _Client) -> None:
        if client.dead or client.rfd != client.wfd:
            return  # stdio writes block instead (fd 1 cannot share fd 0's registration)
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        try:
            if self._selector.get_key(client.rfd).events != mask:
                self._selector.modify(client.rfd, mask, ("client", client))
        except (KeyError, ValueError):
            pass

    # -- events (any thread) ----------------------------------------------------------------------------
    def emit(self, name: str, data: dict[str, Any]) -> None:
        with self._events_lock:
            self._events.append((name, data, timestamp()))
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # already awake (pipe full) or closing

    def _deliver_events(self) -> None:
        while True:
            with self._events_lock:
                if not self._events:
                    return
                name, data, stamp = self._events.popleft()
            for client in list(self._clients):
                if not client.dead:
                    client.session.send_event(name, data, stamp)

    # -- the server thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            try:
                ready = self._selector.select()
            except OSError as error:
                if error.errno == errno.EINTR:
                    continue
                raise
            for key, mask in ready:
                kind, target = key.data
                if kind == "wake":
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                elif kind == "listen":
                    self._accept(key.fileobj, target)  # type: ignore[arg-type]
                else:
                    try:
                        self._service(target, mask)
                    except Exception as error:  # a bug here must cost one client, not the monitor
                        print(f"pyemu: QMP: dropping a client after an internal error: "
                              f"{type(error).__name__}: {error}", file=sys.stderr)
                        target.dead = True
            self._deliver_events()
            self._reap()

    def _accept(self, sock: socket.socket, endpoint: Endpoint) -> None:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as error:
            print(f"pyemu: QMP: accept on {endpoint.spec}: {error.strerror}", file=sys.stderr)
            return
        self._add_client(conn.fileno(), conn.fileno(), conn, endpoint)

    def _service(self, client: _Client, mask: int) -> None:
        if client.dead:
            return
        if mask & selectors.EVENT_WRITE:
            client.flush()
        if mask & selectors.EVENT_READ:
            try:
                data = os.read(client.rfd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                client.dead = True
                return
            if not data:
                client.dead = True
                return
            client.session.feed(data)
            if client.session.closing:
                self._close_client(client, flush=True)

    def _close_client(self, client: _Client, *, flush: bool) -> None:
        if flush and client.out and client.sock is not None:
            try:
                client.sock.setblocking(True)
                client.sock.settimeout(CLOSE_FLUSH_SECONDS)
                client.sock.sendall(bytes(client.out))
            except OSError:
                pass
            client.out.clear()
        client.dead = True

    def _reap(self) -> None:
        for client in [c for c in self._clients if c.dead]:
            self._clients.remove(client)
            try:
                self._selector.unregister(client.rfd)
            except (KeyError, ValueError):
                pass
            client.close()

    # -- shutdown ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop serving; queued replies and events (a ``quit`` reply, the SHUTDOWN event) are sent first."""
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        self._deliver_events()
        for client in list(self._clients):
            if not client.dead:
                self._close_client(client, flush=True)
            client.close()
        self._clients.clear()
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        for path in self._unlink:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._unlink.clear()
        try:
            self._selector.close()
        except (OSError, ValueError):
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
