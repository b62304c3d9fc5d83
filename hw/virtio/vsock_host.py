"""The host side of virtio-vsock: Unix sockets in Firecracker's "hybrid vsock" convention.

pyemu needs no ``vhost_vsock`` kernel module and no host CID: host programs talk to the guest over Unix
sockets, exactly as with Firecracker (docs/vsock.md there), so tools written for Firecracker work as is.

* Host-initiated: pyemu listens on ``uds-path``. A host program connects, sends ``CONNECT <port>\\n``
  (decimal guest port); pyemu asks the guest (a vsock REQUEST to that port), and once the guest accepted
  answers ``OK <host-side port>\\n`` on the same Unix connection, which from then on carries the stream.
  If nobody in the guest listens, the Unix connection is closed.
* Guest-initiated: a guest ``connect()`` to CID 2 port ``P`` becomes a Unix ``connect()`` to
  ``<uds-path>_<P>``; nobody listening there means a vsock RST for the guest (ECONNRESET).

Why a muxer with its own epoll: the device must stop watching a host socket whenever it cannot pass on
what the socket would deliver (the guest has no rx buffers, or no credit for this connection). With a
level-triggered selector a socket that stays readable but is not read would wake the I/O thread forever;
so every host socket lives in this private epoll set with exactly the interest the connection can serve
(read, write, both or none -- "none" removes it, since EPOLLHUP is reported even with an empty mask), and
the epoll descriptor itself is the single reader the I/O thread watches (the nesting Firecracker's muxer
uses too). The I/O thread's selector only knows readers; an EPOLLOUT interest here is how a connection
waits for a full host socket to drain without a second thread or a polling timer.

Everything here runs on the device's I/O thread, under the device's lock (given to the muxer), except
construction and :meth:`HostMuxer.close`.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import stat
import threading
from dataclasses import dataclass, field
from typing import Protocol

from pyemu.hw.virtio.errors import VirtioError
from pyemu.system import log
from pyemu.system.iothread import IoThread

SUN_PATH_MAX = 107
"""Bytes of a Unix socket path (``sun_path`` is 108 bytes with its NUL)."""
CONNECT_LINE_MAX = 32
"""``CONNECT 4294967295\\n`` is 19 bytes; a longer first line is not a connect command (Firecracker: 32)."""
MAX_PENDING_HOST = 64
"""Host connections that have not yet sent their CONNECT line; more are closed at once (a stuck or
hostile host program must not make pyemu hold descriptors without bound)."""
LISTEN_BACKLOG = 64
ACCEPTS_PER_EVENT = 16
"""Accepts per readiness event, so a flood of connects cannot starve the guest's traffic."""

_CONNECT_RE = re.compile(rb"CONNECT ([0-9]{1,10})\r?\n")


class VsockHostError(VirtioError):
    """The host side of a vsock device failed (listening socket, connecting to a host listener)."""

    def __init__(self, message: str, *, path: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno_


class HostConnectError(VsockHostError):
    """Nobody accepts connections at ``<uds-path>_<port>`` (the guest gets a vsock RST)."""


class HostSocketHandler(Protocol):
    """A connection's reaction to its host socket (called on the I/O thread under the device lock)."""

    def host_readable(self) -> None: ...

    def host_writable(self) -> None: ...


class HostConnectSink(Protocol):
    """The device: takes a host connection whose ``CONNECT <port>`` line arrived."""

    def host_connect(self, sock: socket.socket, port: int) -> bool:
        """Start a vsock connection to guest ``port`` over ``sock``; False refuses it (sock is closed)."""
        ...


@dataclass
class _Watch:
    sock: socket.socket
    handler: HostSocketHandler
    mask: int = 0


@dataclass
class _PendingLine:
    """A host connection still sending ``CONNECT <port>\\n``."""

    sock: socket.socket
    line: bytearray = field(default_factory=bytearray)


def _epoll_mask(read: bool, write: bool) -> int:
    return (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)


class HostMuxer:
    """The listening socket at ``uds_path``, the pending CONNECT lines and every connection's host socket,
    in one epoll set that the device's I/O thread watches as a single reader."""

    def __init__(self, uds_path: str, sink: HostConnectSink, lock: threading.RLock) -> None:
        self.uds_path = uds_path
        self._sink = sink
        self._lock = lock
        self._epoll = select.epoll()
        self._watches: dict[int, _Watch] = {}
        self._pending: dict[int, _PendingLine] = {}
        self._iothread: IoThread | None = None
        self._closed = False
        self.accepted = 0
        try:
            self._listener, self._inode = _listen(uds_path)
        except BaseException:
            self._epoll.close()
            raise
        self._epoll.register(self._listener.fileno(), select.EPOLLIN)

    # -- life cycle ---------------------------------------------------------------------------------------
    def fileno(self) -> int:
        """The epoll descriptor: readable whenever some host socket has an event we asked for."""
        return self._epoll.fileno()

    def attach(self, iothread: IoThread) -> None:
        """Serve the host sockets on ``iothread`` (the device's I/O thread, as its queues)."""
        if self._iothread is not None:
            return
        self._iothread = iothread
        iothread.add_reader(self, self._dispatch, self._handler_failed)

    def close(self) -> None:
        """Stop listening, close every host socket and remove ``uds_path`` (if it is still ours)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._iothread is not None:
            try:
                self._iothread.remove_reader(self)
            except VirtioError:
                pass
            except Exception:  # a stopped or closed I/O thread: nothing watches us any more
                pass
        with self._lock:
            for pending in self._pending.values():
                pending.sock.close()
            self._pending.clear()
            for watch in self._watches.values():
                watch.sock.close()
            self._watches.clear()
            self._listener.close()
            self._epoll.close()
        try:
            if os.lstat(self.uds_path).st_ino == self._inode:
                os.unlink(self.uds_path)
        except OSError:
            pass

    # -- connections (called by the device) ---------------------------------------------------------------
    def connect_port(self, port: int) -> socket.socket:
        """A connected, non-blocking socket to the host listener for guest-initiated port ``port``."""
        path = f"{self.uds_path}_{port}"
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            raise HostConnectError(f"vsock: '{path}' is longer than a Unix socket path can be", path=path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            # EAGAIN: the listener's backlog is full -- a refusal too; a blocking connect would stall
            # every device on this I/O thread.
            raise HostConnectError(f"vsock: cannot connect to '{path}': {exc.strerror}", path=path,
                                   errno_=exc.errno) from exc
        return sock

    def watch(self, sock: socket.socket, handler: HostSocketHandler) -> None:
        """Route readiness of ``sock`` to ``handler`` (no interest yet: see :meth:`set_interest`)."""
        sock.setblocking(False)
        self._watches[sock.fileno()] = _Watch(sock, handler)

    def set_interest(self, sock: socket.socket, *, read: bool, write: bool) -> None:
        """Watch ``sock`` for exactly these events; none at all takes it out of the epoll set."""
        watch = self._watches.get(sock.fileno())
        if watch is None or self._closed:
            return
        mask = _epoll_mask(read, write)
        if mask == watch.mask:
            return
        fd = sock.fileno()
        if watch.mask == 0:
            self._epoll.register(fd, mask)
        elif mask == 0:
            self._epoll.unregister(fd)
        else:
            self._epoll.modify(fd, mask)
        watch.mask = mask

    def forget(self, sock: socket.socket) -> None:
        """Stop watching and close ``sock``."""
        fd = sock.fileno()
        watch = self._watches.pop(fd, None) if fd >= 0 else None
        if watch is not None and watch.mask and not self._closed:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass
        sock.close()

    # -- the I/O thread -----------------------------------------------------------------------------------
    def _handler_failed(self, exc: BaseException) -> None:
        log.log("guest_errors", f"vsock {self.uds_path}: host socket handler failed: {type(exc).__name__}: {exc}")

    def _dispatch(self) -> None:
        with self._lock:
            if self._closed:
                return
            events = self._epoll.poll(0)
            for fd, mask in events:
                if fd == self._listener.fileno():
                    self._accept()
                elif fd in self._pending:
                    self._read_connect_line(fd)
                else:
                    watch = self._watches.get(fd)
                    if watch is None:
                        continue  # closed by an earlier handler in this batch
                    trouble = mask & (select.EPOLLHUP | select.EPOLLERR)
                    if watch.mask & select.EPOLLIN and mask & (select.EPOLLIN | trouble):
                        watch.handler.host_readable()
                    # The read handler may have closed the socket or changed the interest.
                    if self._watches.get(fd) is watch and watch.mask & select.EPOLLOUT and \
                            mask & (select.EPOLLOUT | trouble):
                        watch.handler.host_writable()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the host's problem, the guest runs on
                log.log("guest_errors", f"vsock {self.uds_path}: accept failed: {exc.strerror}")
                return
            self.accepted += 1
            if len(self._pending) >= MAX_PENDING_HOST:
                log.log("guest_errors", f"vsock {self.uds_path}: {MAX_PENDING_HOST} host connections have "
                                        "not sent their CONNECT line yet; closing a new one")
                sock.close()
                continue
            sock.setblocking(False)
            self._pending[sock.fileno()] = _PendingLine(sock)
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _read_connect_line(self, fd: int) -> None:
        """Take ``CONNECT <port>\\n`` off the socket and not one byte more: what follows it is stream data
        for the guest, read only once the guest accepted and granted credit."""
        pending = self._pending[fd]
        want = CONNECT_LINE_MAX - len(pending.line)
        try:
            peek = pending.sock.recv(want, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peek = b""
        newline = peek.find(b"\n")
        if not peek:
            self._drop_pending(fd, None)
            return
        take = newline + 1 if newline >= 0 else len(peek)
        try:
            pending.line += pending.sock.recv(take)
        except OSError:
            self._drop_pending(fd, None)
            return
        if newline < 0:
            if len(pending.line) >= CONNECT_LINE_MAX:
                self._drop_pending(fd, f"no CONNECT line in the first {CONNECT_LINE_MAX} bytes")
            return
        match = _CONNECT_RE.fullmatch(bytes(pending.line))
        port = int(match.group(1)) if match else -1
        if not 0 <= port <= 0xFFFFFFFF:
            self._drop_pending(fd, f"expected 'CONNECT <port>', got {bytes(pending.line)!r}")
            return
        del self._pending[fd]
        self._epoll.unregister(fd)
        if not self._sink.host_connect(pending.sock, port):
            pending.sock.close()

    def _drop_pending(self, fd: int, why: str | None) -> None:
        pending = self._pending.pop(fd)
        self._epoll.unregister(fd)
        pending.sock.close()
        if why:
            log.log("guest_errors", f"vsock {self.uds_path}: host connection closed: {why}")


def _listen(path: str) -> tuple[socket.socket, int]:
    """A listening socket bound at ``path``, and its inode (so close removes only our own file).

    A socket file left by a process that died is replaced (nobody accepts on it); a live one, or a file
    that is not a socket, is an error -- pyemu never takes a path over from another program.
    """
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise VsockHostError(f"uds-path '{path}' is longer than {SUN_PATH_MAX} bytes", path=path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise VsockHostError(f"uds-path '{path}': {exc.strerror}", path=path, errno_=exc.errno) from exc
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise VsockHostError(f"uds-path '{path}' exists and is not a socket", path=path,
                                 errno_=errno.EEXIST)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale
        except OSError as exc:
            raise VsockHostError(f"uds-path '{path}': {exc.strerror}", path=path, errno_=exc.errno) from exc
        else:
            raise VsockHostError(f"uds-path '{path}' is in use by another program", path=path,
                                 errno_=errno.EADDRINUSE)
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        listener.bind(path)
        listener.listen(LISTEN_BACKLOG)
        inode = os.lstat(path).st_ino
    except OSError as exc:
        listener.close()
        raise VsockHostError(f"uds-path '{path}': {exc.strerror}", path=path, errno_=exc.errno) from exc
    return listener, inode
