"""The ``nbd`` protocol driver: a block node whose bytes live on an NBD server (QEMU's block/nbd.c).

Opening runs the fixed-newstyle handshake: structured replies, the ``base:allocation`` metadata context (so
``map`` and ``convert`` see holes) and NBD_OPT_GO (NBD_OPT_EXPORT_NAME with servers that lack it). Any
number of threads may issue requests at once: each gets a handle, requests leave under a send lock, and one
receiver thread routes every reply chunk to its request by handle -- reading data straight into the
caller's buffer. Replies are checked against what was asked (unknown handle, data outside the request,
oversized chunks): a server that breaks the protocol loses the connection, it never writes outside a
buffer.

When the connection drops, requests in flight fail with EIO -- unless ``reconnect_delay`` is set: then the
driver reconnects (same export, same size required) and retries them for up to that many seconds, as
QEMU's ``reconnect-delay`` does.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from pyemu.block.driver import BlockCapabilities, BlockStatus, check_request
from pyemu.block.errors import BlockConfigError, BlockIOError, ReadOnlyError
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.nbd import protocol as P
from pyemu.block.nbd.uri import NbdAddress, NbdTarget
from pyemu.system.buffers import io_buffer

CONNECT_TIMEOUT = 30.0
MAX_REPLY_CHUNK = P.MAX_PAYLOAD + 4096
MAX_STATUS_CHUNK = 1 << 20
_ZERO_CHUNK = 1 << 30


class _ConnectionLost(Exception):
    pass


@dataclass
class _Pending:
    request: P.Request
    target: memoryview | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: int = 0
    message: str = ""
    lost: bool = False
    extents: list[tuple[int, int]] | None = None
    context: int = -1


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int
    structured: bool
    allocation_context: int | None
    max_payload: int


def connect_socket(address: NbdAddress, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connected stream socket to ``address``; OSError when nobody listens."""
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _option_replies(sock: socket.socket, option: int) -> list[tuple[int, bytes]]:
    """Every reply to ``option`` up to and including the final ACK or error."""
    replies = []
    while True:
        magic, opt, reply_type, length = P.OPTION_REPLY_HEAD.unpack(P.recv_exact(sock, P.OPTION_REPLY_HEAD.size))
        if magic != P.OPTION_REPLY_MAGIC:
            raise P.NbdProtocolError(f"bad option reply magic {magic:#x}")
        if opt != option:
            raise P.NbdProtocolError(f"reply for option {opt} while waiting for option {option}")
        if length > P.MAX_OPTION_LENGTH:
            raise P.NbdProtocolError(f"option reply of {length} bytes")
        data = P.recv_exact(sock, length)
        replies.append((reply_type, data))
        if reply_type == P.REP_ACK or reply_type & P.REP_FLAG_ERROR:
            return replies
        if len(replies) > 100000:
            raise P.NbdProtocolError("endless option replies")


def _send_option(sock: socket.socket, option: int, data: bytes = b"") -> None:
    P.send_all(sock, [P.OPTION_HEAD.pack(P.IHAVEOPT, option, len(data)), data])


def handshake(sock: socket.socket, export: str, *, structured: bool = True,
              contexts: Sequence[str] = (P.CONTEXT_BASE_ALLOCATION,)) -> tuple[ExportInfo, dict[str, int]]:
    """Negotiate ``export`` on a connected socket. Returns the export's info and the meta context ids the
    server agreed to (name -> id). Raises BlockConfigError for an export the server does not have."""
    magic, second, server_flags = P.HANDSHAKE_HEAD.unpack(P.recv_exact(sock, P.HANDSHAKE_HEAD.size))
    if magic != P.NBDMAGIC:
        raise P.NbdProtocolError("not an NBD server (bad magic)")
    if second != P.IHAVEOPT:
        raise P.NbdProtocolError("the server speaks the oldstyle protocol, which is not supported")
    fixed = bool(server_flags & P.FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(server_flags & P.FLAG_NO_ZEROES)
    P.send_all(sock, [P.U32.pack((P.FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (P.FLAG_C_NO_ZEROES if no_zeroes
                                                                                else 0))])
    negotiated: dict[str, int] = {}
    use_structured = False
    if fixed and structured:
        _send_option(sock, P.OPT_STRUCTURED_REPLY)
        use_structured = _option_replies(sock, P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
        if use_structured and contexts:
            _send_option(sock, P.OPT_SET_META_CONTEXT, P.MetaQuery(export, tuple(contexts)).pack())
            for reply_type, data in _option_replies(sock, P.OPT_SET_META_CONTEXT):
                if reply_type == P.REP_META_CONTEXT and len(data) >= 4:
                    negotiated[data[4:].decode("utf-8", "replace")] = P.U32.unpack_from(data)[0]
    if fixed:
        _send_option(sock, P.OPT_GO, P.InfoRequest(export, (P.INFO_BLOCK_SIZE,)).pack())
        size = flags = -1
        max_payload = P.MAX_PAYLOAD
        for reply_type, data in _option_replies(sock, P.OPT_GO):
            if reply_type == P.REP_INFO and len(data) >= 2:
                (info,) = P.U16.unpack_from(data)
                if info == P.INFO_EXPORT and len(data) == P.EXPORT_INFO.size:
                    _, size, flags = P.EXPORT_INFO.unpack(data)
                elif info == P.INFO_BLOCK_SIZE and len(data) == P.BLOCK_SIZE_INFO.size:
                    _, _, _, maximum = P.BLOCK_SIZE_INFO.unpack(data)
                    max_payload = max(4096, min(maximum, P.MAX_PAYLOAD))
            elif reply_type == P.REP_ERR_UNSUP:
                return _export_name(sock, export, no_zeroes, use_structured, negotiated)
            elif reply_type & P.REP_FLAG_ERROR:
                text = data.decode("utf-8", "replace")
                if reply_type == P.REP_ERR_UNKNOWN:
                    raise BlockConfigError(f"Requested export not available (server reported: {text})",
                                           option=None, errno=errno.ENOENT)
                raise BlockConfigError(f"NBD server refused export '{export}': {text or reply_type}",
                                       option=None, errno=errno.EINVAL)
        if size < 0:
            raise P.NbdProtocolError("server did not send the export's size")
        return ExportInfo(size, flags, use_structured, negotiated.get(P.CONTEXT_BASE_ALLOCATION),
                          max_payload), negotiated
    return _export_name(sock, export, no_zeroes, False, {})


def _export_name(sock: socket.socket, export: str, no_zeroes: bool, structured: bool,
                 negotiated: dict[str, int]) -> tuple[ExportInfo, dict[str, int]]:
    _send_option(sock, P.OPT_EXPORT_NAME, export.encode("utf-8"))
    try:
        data = P.recv_exact(sock, 10 if no_zeroes else 134)
    except P.NbdDisconnected as exc:
        raise BlockConfigError(f"Requested export not available: '{export}'", option=None,
                               errno=errno.ENOENT) from exc
    size, flags = P.U64.unpack_from(data)[0], P.U16.unpack_from(data, 8)[0]
    return ExportInfo(size, flags, structured, negotiated.get(P.CONTEXT_BASE_ALLOCATION),
                      P.MAX_PAYLOAD), negotiated


class _Connection:
    """One negotiated connection and its receiver thread."""

    def __init__(self, sock: socket.socket, info: ExportInfo) -> None:
        self.sock = sock
        self.info = info
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._handles = itertools.count(1)
        self.alive = True
        self.failure = ""
        sock.settimeout(None)
        self._receiver = threading.Thread(target=self._receive_loop, name="nbd-client-rx", daemon=True)
        self._receiver.start()

    def submit(self, request_type: int, offset: int, length: int, *, flags: int = 0,
               payload: Sequence[memoryview] = (), target: memoryview | None = None) -> _Pending:
        with self._send_lock:
            if not self.alive:
                raise _ConnectionLost(self.failure)
            request = P.Request(flags, request_type, next(self._handles), offset, length)
            pending = _Pending(request, target)
            with self._pending_lock:
                self._pending[request.handle] = pending
            try:
                P.send_all(self.sock, [request.pack(), *payload])
            except P.NbdDisconnected as exc:
                self._fail(str(exc))
                raise _ConnectionLost(str(exc)) from exc
        return pending

    def wait(self, pending: _Pending) -> _Pending:
        pending.done.wait()
        if pending.lost:
            raise _ConnectionLost(self.failure)
        return pending

    def _fail(self, reason: str) -> None:
        with self._pending_lock:
            if self.alive:
                self.failure = reason
            self.alive = False
            pending, self._pending = list(self._pending.values()), {}
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for item in pending:
            item.lost = True
            item.done.set()

    def _receive_loop(self) -> None:
        try:
            while True:
                self._receive_one()
        except (P.NbdDisconnected, P.NbdProtocolError, OSError) as exc:
            self._fail(str(exc))

    def _take(self, handle: int) -> _Pending:
        """The request a reply is for; it stays registered until :meth:`_complete`, so a protocol error
        in the middle of its reply still fails it (through :meth:`_fail`) instead of leaving it waiting."""
        with self._pending_lock:
            pending = self._pending.get(handle)
        if pending is None:
            raise P.NbdProtocolError(f"reply for unknown handle {handle:#x}")
        return pending

    def _complete(self, pending: _Pending) -> None:
        with self._pending_lock:
            self._pending.pop(pending.request.handle, None)
        pending.done.set()

    def _receive_one(self) -> None:
        head = P.recv_exact(self.sock, 4)
        (magic,) = P.U32.unpack(head)
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", P.recv_exact(self.sock, 12))
            pending = self._take(handle)
            if error:
                pending.error = error
            elif pending.request.type == P.CMD_READ and pending.target is not None:
                P.recv_into_exact(self.sock, pending.target)
            self._complete(pending)
            return
        if magic != P.STRUCTURED_REPLY_MAGIC or not self.info.structured:
            raise P.NbdProtocolError(f"bad reply magic {magic:#x}")
        flags, reply_type, handle, length = struct.unpack(">HHQI", P.recv_exact(self.sock, 16))
        done = bool(flags & P.REPLY_FLAG_DONE)
        pending = self._take(handle)
        request = pending.request
        if reply_type == P.REPLY_TYPE_OFFSET_DATA:
            if request.type != P.CMD_READ or length < 8 or length > MAX_REPLY_CHUNK:
                raise P.NbdProtocolError("unexpected data chunk")
            (offset,) = P.U64.unpack(P.recv_exact(self.sock, 8))
            start = offset - request.offset
            count = length - 8
            if start < 0 or start + count > request.length or pending.target is None:
                raise P.NbdProtocolError(f"data chunk at {offset}+{count} outside the read")
            P.recv_into_exact(self.sock, pending.target[start:start + count])
        elif reply_type == P.REPLY_TYPE_OFFSET_HOLE:
            if request.type != P.CMD_READ or length != 12:
                raise P.NbdProtocolError("unexpected hole chunk")
            offset, hole = struct.unpack(">QI", P.recv_exact(self.sock, 12))
            start = offset - request.offset
            if start < 0 or start + hole > request.length or pending.target is None:
                raise P.NbdProtocolError(f"hole chunk at {offset}+{hole} outside the read")
            pending.target[start:start + hole] = bytes(hole)
        elif reply_type == P.REPLY_TYPE_BLOCK_STATUS:
            if request.type != P.CMD_BLOCK_STATUS or length < 12 or length > MAX_STATUS_CHUNK or (length - 4) % 8:
                raise P.NbdProtocolError("unexpected block status chunk")
            data = P.recv_exact(self.sock, length)
            (context,) = P.U32.unpack_from(data)
            if context == self.info.allocation_context and pending.extents is None:
                pending.extents = [P.EXTENT.unpack_from(data, pos) for pos in range(4, length, 8)]
        elif reply_type in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET) or reply_type & 0x8000:
            if length < 6 or length > P.MAX_STRING + 14:
                raise P.NbdProtocolError("malformed error chunk")
            data = P.recv_exact(self.sock, length)
            error, msg_len = struct.unpack_from(">IH", data)
            pending.error = error or P.NBD_EIO
            pending.message = data[6:6 + msg_len].decode("utf-8", "replace")
        elif reply_type == P.REPLY_TYPE_NONE:
            if length:
                raise P.NbdProtocolError("NONE chunk with payload")
        else:
            if length > MAX_STATUS_CHUNK:
                raise P.NbdProtocolError(f"unknown chunk type {reply_type} of {length} bytes")
            P.discard_exact(self.sock, length)
        if done:
            self._complete(pending)

    def close(self) -> None:
        with self._send_lock:
            if self.alive:
                try:
                    P.send_all(self.sock, [P.Request(0, P.CMD_DISC, 0, 0, 0).pack()])
                except P.NbdDisconnected:
                    pass
        self._fail("closed")
        self._receiver.join(5)
        self.sock.close()


class NbdClient:
    """A block node over NBD. Create with :meth:`open`."""

    name = "nbd"

    def __init__(self, target: NbdTarget, connection: _Connection, *, read_only: bool,
                 reconnect_delay: float) -> None:
        self.target = target
        self._conn: _Connection | None = connection
        self._conn_lock = threading.Lock()
        self.reconnect_delay = reconnect_delay
        info = connection.info
        self._size = info.size
        self._flags = info.flags
        self.read_only = read_only
        self.filename = target.url()
        self.capabilities = BlockCapabilities(discard=bool(info.flags & P.TF_SEND_TRIM), write_zeroes=True,
                                              block_status=info.allocation_context is not None, direct_io=False)
        self._max_payload = info.max_payload
        self._closed = False

    @classmethod
    def open(cls, target: NbdTarget, *, read_only: bool = False, reconnect_delay: float = 0.0,
             connect_timeout: float = CONNECT_TIMEOUT) -> "NbdClient":
        """Connect and negotiate; BlockConfigError when the server cannot be reached or refuses the export."""
        if reconnect_delay < 0:
            raise BlockConfigError("reconnect-delay must not be negative", option=None)
        connection = cls._connect(target, connect_timeout)
        if connection.info.flags & P.TF_READ_ONLY and not read_only:
            connection.close()
            raise BlockConfigError("NBD export is read-only", option=None, errno=errno.EACCES)
        return cls(target, connection, read_only=read_only, reconnect_delay=reconnect_delay)

    @staticmethod
    def _connect(target: NbdTarget, timeout: float) -> _Connection:
        try:
            sock = connect_socket(target.address, timeout)
        except OSError as exc:
            raise BlockConfigError(f"Failed to connect to '{target.address}': {exc.strerror or exc}",
                                   option=None, errno=exc.errno) from exc
        try:
            info, _ = handshake(sock, target.export)
        except (P.NbdError, OSError) as exc:
            sock.close()
            if isinstance(exc, BlockConfigError):
                raise
            raise BlockConfigError(f"NBD handshake with '{target.address}' failed: {exc}", option=None,
                                   errno=errno.EIO) from exc
        except BaseException:
            sock.close()
            raise
        return _Connection(sock, info)

    # -- connection management -----------------------------------------------------------------------------

    def _connection(self, deadline: float | None) -> _Connection:
        """The live connection, reconnecting when it was lost: once, or until ``deadline`` (monotonic) when
        reconnect-delay is set -- the first request that finds the connection gone starts that clock."""
        with self._conn_lock:
            if self._closed:
                raise BlockIOError(f"NBD node '{self.filename}' is closed", errno=errno.EIO)
            if self._conn is not None and self._conn.alive:
                return self._conn
            if deadline is None and self.reconnect_delay > 0:
                deadline = time.monotonic() + self.reconnect_delay
            old = self._conn
            self._conn = None
            if old is not None:
                old.close()
            while True:
                try:
                    conn = self._connect(self.target, timeout=5.0)
                except BlockConfigError as exc:
                    if deadline is None or time.monotonic() >= deadline:
                        raise BlockIOError(f"NBD connection to '{self.target.address}' lost and not "
                                           f"re-established: {exc}", errno=errno.EIO) from exc
                    time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                    continue
                if conn.info.size != self._size:
                    conn.close()
                    raise BlockIOError("NBD server came back with a different export size "
                                       f"({conn.info.size} instead of {self._size})", errno=errno.EIO)
                self._conn = conn
                return conn

    def _run(self, request_type: int, offset: int, length: int, *, flags: int = 0,
             payload: Sequence[memoryview] = (), target: memoryview | None = None) -> _Pending:
        deadline: float | None = None
        while True:
            conn = self._connection(deadline)
            try:
                pending = conn.wait(conn.submit(request_type, offset, length, flags=flags, payload=payload,
                                                target=target))
            except _ConnectionLost as exc:
                if self.reconnect_delay <= 0:
                    raise BlockIOError(f"NBD connection to '{self.target.address}' lost: {exc}", errno=errno.EIO,
                                       offset=offset, length=length) from None
                if deadline is None:
                    deadline = time.monotonic() + self.reconnect_delay
                continue
            if pending.error:
                code = P.nbd_to_errno(pending.error)
                what = P.COMMAND_NAMES.get(request_type, str(request_type))
                detail = f": {pending.message}" if pending.message else ""
                raise BlockIOError(f"NBD {what} at offset {offset} length {length} failed: "
                                   f"{os.strerror(code)}{detail}", errno=code, offset=offset,
                                   length=length)
            return pending

    # -- the driver interface ------------------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers, writable=True)
        length = total_length(views)
        check_request(offset, length, self._size, what="read")
        if len(views) == 1:
            self._read_into(offset, views[0])
            return
        buf = io_buffer(length)
        self._read_into(offset, buf)
        pos = 0
        for view in views:
            view[:] = buf[pos:pos + view.nbytes]
            pos += view.nbytes

    def _read_into(self, offset: int, view: memoryview) -> None:
        pos = 0
        while pos < view.nbytes:
            piece = min(self._max_payload, view.nbytes - pos)
            self._run(P.CMD_READ, offset + pos, piece, target=view[pos:pos + piece])
            pos += piece

    def _check_writable(self, what: str, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{what} refused: NBD node '{self.filename}' is read-only", offset=offset,
                                length=length)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        views = byte_views(buffers, writable=False)
        length = total_length(views)
        check_request(offset, length, self._size, what="write")
        self._check_writable("write", offset, length)
        data = views[0] if len(views) == 1 else memoryview(b"".join(views))
        pos = 0
        while pos < length:
            piece = min(self._max_payload, length - pos)
            self._run(P.CMD_WRITE, offset + pos, piece, payload=[data[pos:pos + piece]])
            pos += piece

    def flush(self) -> None:
        if self._flags & P.TF_SEND_FLUSH and not self.read_only:
            self._run(P.CMD_FLUSH, 0, 0)

    def discard(self, offset: int, length: int) -> None:
        check_request(offset, length, self._size, what="discard")
        self._check_writable("discard", offset, length)
        if not self._flags & P.TF_SEND_TRIM:
            return
        for pos in range(offset, offset + length, _ZERO_CHUNK):
            self._run(P.CMD_TRIM, pos, min(_ZERO_CHUNK, offset + length - pos))

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        check_request(offset, length, self._size, what="write-zeroes")
        self._check_writable("write-zeroes", offset, length)
        if self._flags & P.TF_SEND_WRITE_ZEROES:
            flags = 0 if may_unmap else P.CMD_FLAG_NO_HOLE
            for pos in range(offset, offset + length, _ZERO_CHUNK):
                self._run(P.CMD_WRITE_ZEROES, pos, min(_ZERO_CHUNK, offset + length - pos), flags=flags)
            return
        zeros = memoryview(bytes(min(length, self._max_payload)))
        for pos in range(offset, offset + length, zeros.nbytes or 1):
            piece = min(zeros.nbytes, offset + length - pos)
            self._run(P.CMD_WRITE, pos, piece, payload=[zeros[:piece]])

    def block_status(self, offset: int, length: int) -> BlockStatus:
        check_request(offset, length, self._size, what="block-status", nonempty=True)
        if not self.capabilities.block_status:
            return BlockStatus(offset, length, allocated=True, zero=False)
        ask = min(length, 0xFFFFFFFF & ~0xFFF or length)
        pending = self._run(P.CMD_BLOCK_STATUS, offset, ask, flags=P.CMD_FLAG_REQ_ONE)
        if not pending.extents:
            raise BlockIOError(f"NBD server sent no base:allocation extent at offset {offset}", errno=errno.EIO,
                               offset=offset, length=length)
        extent_length, flags = pending.extents[0]
        if extent_length == 0:
            raise BlockIOError(f"NBD server sent an empty extent at offset {offset}", errno=errno.EIO,
                               offset=offset, length=length)
        return BlockStatus(offset, min(extent_length, length), allocated=not flags & P.STATE_HOLE,
                           zero=bool(flags & P.STATE_ZERO))

    def close(self) -> None:
        with self._conn_lock:
            if self._closed:
                return
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
