"""A small synchronous QMP client: enough to drive a VM in another process (pyemu's or QEMU's).

Why our own instead of ``qemu.qmp``: that package is asyncio-only and a test dependency, while
``pyemu-remote`` and :class:`~pyemu.api.remote.RemoteVM` must work from plain blocking code with nothing
beyond pyemu installed. One reader thread splits the stream into replies (matched to requests by ``id``)
and events (handed to an :class:`~pyemu.api.events.EventStream`). Lines are bounded, so a misbehaving
server cannot make the client grow without limit.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from typing import Any

from pyemu.api.errors import CommandError, RemoteError, VmTimeout
from pyemu.api.events import Event, EventStream
from pyemu.api.sockets import connect_stream

MAX_LINE = 64 << 20
DEFAULT_TIMEOUT = 60.0


def open_socket(address: str, timeout: float) -> socket.socket:
    """``address`` is a Unix socket path, or ``HOST:PORT`` for TCP (a path with ``/`` is always Unix)."""
    try:
        return connect_stream(address, timeout)
    except OSError as error:
        raise RemoteError(f"cannot connect to {address}: {error.strerror or error}") from error


class QmpConnection:
    """A negotiated QMP session. ``execute`` is thread-safe; events go to ``events``."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self.events = EventStream()
        self._sock = open_socket(address, timeout)
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._replies: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._broken: str | None = None
        try:
            greeting = self._read_message()
        except RemoteError:
            self.close()
            raise
        if "QMP" not in greeting:
            self.close()
            raise RemoteError(f"{address} is not a QMP monitor (no greeting)")
        self.greeting: dict[str, Any] = greeting["QMP"]
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name="pyemu-qmp-client", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities")

    def _read_message(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_LINE + 1)
        except (OSError, ValueError) as error:
            raise RemoteError(f"connection to {self.address} failed: {error}") from error
        if not line:
            raise RemoteError(f"{self.address} closed the connection")
        if len(line) > MAX_LINE:
            raise RemoteError(f"{self.address} sent a message over {MAX_LINE} bytes")
        try:
            message = json.loads(line)
        except ValueError as error:
            raise RemoteError(f"{self.address} sent malformed JSON: {error}") from error
        if not isinstance(message, dict):
            raise RemoteError(f"{self.address} sent a message that is not a JSON object")
        return message

    def _read_loop(self) -> None:
        while True:
            try:
                message = self._read_message()
            except RemoteError as error:
                with self._cond:
                    self._broken = str(error)
                    self._cond.notify_all()
                self.events.close()
                return
            if "event" in message:
                stamp = message.get("timestamp") or {}
                when = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
                self.events.put(Event(str(message["event"]), dict(message.get("data") or {}), when))
                continue
            with self._cond:
                self._replies[str(message.get("id"))] = message
                self._cond.notify_all()

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run ``command``; its ``return`` value. CommandError when the VM refuses it, RemoteError when the
        connection fails, VmTimeout when no reply comes in time."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        reply = self.request(request, timeout)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise CommandError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
        return reply.get("return")

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send one raw QMP request (an ``id`` is added) and return the whole reply object."""
        request_id = f"pyemu-{next(self._ids)}"
        data = json.dumps({**message, "id": request_id}).encode() + b"\n"
        with self._lock:
            try:
                self._sock.sendall(data)
            except OSError as error:
                raise RemoteError(f"cannot send to {self.address}: {error.strerror or error}") from error
        limit = self.timeout if timeout is None else timeout
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._replies or self._broken is not None,
                                       timeout=limit):
                raise VmTimeout(f"no reply to {message.get('execute')!r} within {limit} s")
            if request_id in self._replies:
                reply = self._replies.pop(request_id)
                reply.pop("id", None)
                return reply
            raise RemoteError(self._broken or "connection lost")

    @property
    def closed(self) -> bool:
        """The server closed the connection (or it broke); nothing more will arrive."""
        with self._cond:
            return self._broken is not None

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._file.close()
        self._sock.close()
