"""The NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md): constants, message layouts and bounded I/O.

Server and client share this module so both sides agree on every number and layout, and every length that
comes off the wire is checked here before anything is allocated for it: an option longer than
:data:`MAX_OPTION_LENGTH`, a string longer than :data:`MAX_STRING`, a request payload above
:data:`MAX_PAYLOAD` (32 MiB, QEMU's NBD_MAX_BUFFER_SIZE) or a wrong magic number raise
:class:`NbdProtocolError`, which callers answer with an error reply or a disconnect -- never with an
unbounded buffer.
"""

from __future__ import annotations

import errno as _errno
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from pyemu.block.errors import BlockError

# -- handshake --------------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
DEFAULT_PORT = 10809

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags (per export) ----------------------------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# -- transmission -----------------------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8
COMMAND_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect", CMD_FLUSH: "flush",
                 CMD_TRIM: "trim", CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write-zeroes",
                 CMD_BLOCK_STATUS: "block-status", CMD_RESIZE: "resize"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAGS_KNOWN = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME

CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# -- NBD errno values (the protocol's own numbering, Linux-like but fixed by the spec) ---------------------
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# -- bounds -----------------------------------------------------------------------------------------------
MAX_PAYLOAD = 32 * 1024 * 1024
"""Largest read or write a server accepts and a client sends (QEMU's NBD_MAX_BUFFER_SIZE)."""
MAX_STRING = 4096
"""Longest export name, description or context name (the spec's NBD_MAX_STRING_SIZE)."""
MAX_OPTION_LENGTH = 64 * 1024
"""Longest option payload a server reads; longer ones end the connection (nothing sane needs more)."""
MAX_META_QUERIES = 128
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096

HANDSHAKE_HEAD = struct.Struct(">QQH")
OPTION_HEAD = struct.Struct(">QII")
OPTION_REPLY_HEAD = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
EXPORT_INFO = struct.Struct(">HQH")
BLOCK_SIZE_INFO = struct.Struct(">HIII")
EXTENT = struct.Struct(">II")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class NbdError(BlockError):
    """Root of the NBD errors."""


class NbdProtocolError(NbdError):
    """The peer broke the protocol (bad magic, a length over a bound, a reply that does not fit): the
    connection cannot be trusted any more and is closed."""


class NbdDisconnected(NbdError):
    """The peer closed the connection (or it broke) while a message was expected."""


def errno_to_nbd(code: int) -> int:
    """The NBD error for a block-layer errno, as QEMU's ``system_errno_to_nbd_errno`` maps it: NBD has no
    EACCES or EROFS, so permission problems become EPERM/EINVAL and unknown errors EINVAL. A snapshot-access
    read outside the fleecing bitmap (EACCES in the block layer) therefore reaches the client as EINVAL,
    which is what qemu-storage-daemon 7.2 sends too (qemu-io: "read failed: Invalid argument")."""
    return {
        _errno.EPERM: NBD_EPERM, _errno.EROFS: NBD_EPERM,
        _errno.EIO: NBD_EIO,
        _errno.ENOMEM: NBD_ENOMEM,
        _errno.ENOSPC: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC,
        _errno.EOVERFLOW: NBD_EOVERFLOW,
        _errno.ENOTSUP: NBD_ENOTSUP, _errno.EOPNOTSUPP: NBD_ENOTSUP,
        _errno.ESHUTDOWN: NBD_ESHUTDOWN,
    }.get(code, NBD_EINVAL)


def nbd_to_errno(code: int) -> int:
    """The host errno for an NBD error received by the client (unknown values become EINVAL)."""
    return {NBD_EPERM: _errno.EPERM, NBD_EIO: _errno.EIO, NBD_ENOMEM: _errno.ENOMEM, NBD_EINVAL: _errno.EINVAL,
            NBD_ENOSPC: _errno.ENOSPC, NBD_EOVERFLOW: _errno.EOVERFLOW, NBD_ENOTSUP: _errno.ENOTSUP,
            NBD_ESHUTDOWN: _errno.ESHUTDOWN}.get(code, _errno.EINVAL)


# -- bounded socket I/O -----------------------------------------------------------------------------------

def recv_exact(sock: socket.socket, length: int) -> bytes:
    """Exactly ``length`` bytes (the caller has bounded ``length``); NbdDisconnected on EOF."""
    buf = bytearray(length)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from the socket."""
    pos = 0
    total = view.nbytes
    while pos < total:
        try:
            got = sock.recv_into(view[pos:], total - pos)
        except OSError as exc:
            raise NbdDisconnected(f"connection broke: {exc.strerror or exc}") from exc
        if got == 0:
            raise NbdDisconnected("connection closed by peer")
        pos += got


def discard_exact(sock: socket.socket, length: int) -> None:
    """Read and drop ``length`` bytes in bounded pieces (an unwanted payload we can still skip)."""
    scratch = memoryview(bytearray(min(length, 1 << 20) or 1))
    while length > 0:
        piece = min(length, scratch.nbytes)
        recv_into_exact(sock, scratch[:piece])
        length -= piece


def send_all(sock: socket.socket, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Send every part (one ``sendmsg`` when it takes them all: header and data leave in one segment)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    try:
        while views:
            sent = sock.sendmsg(views[:512])
            while sent and views:
                if sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
    except OSError as exc:
        raise NbdDisconnected(f"connection broke: {exc.strerror or exc}") from exc


# -- message helpers --------------------------------------------------------------------------------------

def read_string(data: bytes, pos: int, *, what: str) -> tuple[str, int]:
    """A u32-length-prefixed UTF-8 string at ``pos`` of an option payload; returns (string, next pos)."""
    if pos + 4 > len(data):
        raise NbdProtocolError(f"{what}: truncated length")
    (length,) = U32.unpack_from(data, pos)
    pos += 4
    if length > MAX_STRING:
        raise NbdProtocolError(f"{what}: {length} bytes is longer than {MAX_STRING}")
    if pos + length > len(data):
        raise NbdProtocolError(f"{what}: string runs past the end of the option")
    try:
        text = data[pos:pos + length].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NbdProtocolError(f"{what}: not UTF-8") from exc
    return text, pos + length


def pack_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise NbdError(f"string of {len(raw)} bytes is longer than NBD's limit of {MAX_STRING}")
    return U32.pack(len(raw)) + raw


@dataclass(frozen=True)
class Request:
    """One transmission-phase request header (the payload of a write follows it on the wire)."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int

    def pack(self) -> bytes:
        return REQUEST.pack(REQUEST_MAGIC, self.flags, self.type, self.handle, self.offset, self.length)

    @classmethod
    def unpack(cls, data: bytes) -> "Request":
        magic, flags, type_, handle, offset, length = REQUEST.unpack(data)
        if magic != REQUEST_MAGIC:
            raise NbdProtocolError(f"bad request magic {magic:#x} (expected {REQUEST_MAGIC:#x})")
        return cls(flags, type_, handle, offset, length)


@dataclass(frozen=True)
class MetaQuery:
    """A parsed LIST/SET_META_CONTEXT option: the export it is about and the queries."""

    export: str
    queries: tuple[str, ...]

    @classmethod
    def parse(cls, data: bytes) -> "MetaQuery":
        export, pos = read_string(data, 0, what="export name")
        if pos + 4 > len(data):
            raise NbdProtocolError("meta context option: truncated query count")
        (count,) = U32.unpack_from(data, pos)
        pos += 4
        if count > MAX_META_QUERIES:
            raise NbdProtocolError(f"meta context option: {count} queries (at most {MAX_META_QUERIES})")
        queries = []
        for _ in range(count):
            query, pos = read_string(data, pos, what="meta context query")
            queries.append(query)
        if pos != len(data):
            raise NbdProtocolError("meta context option: trailing bytes")
        return cls(export, tuple(queries))

    def pack(self) -> bytes:
        return pack_string(self.export) + U32.pack(len(self.queries)) + b"".join(map(pack_string, self.queries))


@dataclass(frozen=True)
class InfoRequest:
    """A parsed NBD_OPT_INFO/GO payload: export name and the information types asked for."""

    export: str
    infos: tuple[int, ...]

    @classmethod
    def parse(cls, data: bytes) -> "InfoRequest":
        export, pos = read_string(data, 0, what="export name")
        if pos + 2 > len(data):
            raise NbdProtocolError("info request: truncated request count")
        (count,) = U16.unpack_from(data, pos)
        pos += 2
        if pos + 2 * count != len(data):
            raise NbdProtocolError("info request: length does not match its request count")
        infos = struct.unpack_from(f">{count}H", data, pos)
        return cls(export, tuple(infos))

    def pack(self) -> bytes:
        return pack_string(self.export) + U16.pack(len(self.infos)) + struct.pack(f">{len(self.infos)}H",
                                                                                  *self.infos)


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEAD.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def structured_chunk(handle: int, reply_type: int, payload_length: int, *, done: bool) -> bytes:
    """The header of one structured reply chunk (its payload follows)."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, reply_type, handle,
                                 payload_length)


def error_chunk(handle: int, nbd_errno: int, message: str) -> bytes:
    text = message.encode("utf-8")[:MAX_STRING]
    payload = U32.pack(nbd_errno) + U16.pack(len(text)) + text
    return structured_chunk(handle, REPLY_TYPE_ERROR, len(payload), done=True) + payload
