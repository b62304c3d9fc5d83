"""The framing of a VM-state stream: a magic and format version, then sections, then an end marker.

Layout (little-endian)::

    "PYEMU-VM"  u32 format-version
    section*:   u8 kind  u16 id-length  u32 payload-length  u32 crc32(kind, id, payload)  id  payload
    END section (payload: u32 number of sections before it, u64 RAM bytes sent)

Why per-section lengths and checksums: a reader can refuse a section before allocating for it (every kind
has a maximum payload size, so a hostile length costs nothing) and names the section that is damaged; the
end marker's counts catch a stream cut at a section boundary. The payloads' meaning is
:mod:`pyemu.migration.vmstate`'s business; this module only frames them.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from typing import IO, Iterator, Protocol

from pyemu.migration.errors import StreamCorrupt, StreamFormatError, StreamTruncated

MAGIC = b"PYEMU-VM"
FORMAT_VERSION = 1
_START = struct.Struct("<8sI")
_SECTION = struct.Struct("<BHII")
_END = struct.Struct("<IQ")
MAX_ID = 200


class Kind(enum.IntEnum):
    HEADER = 1
    DEVICE = 2
    CPU = 3
    CLOCK = 4
    RAM = 5
    MAPPED_RAM = 6
    """A RAM region stored page-aligned after the stream's end marker (:mod:`pyemu.migration.mapped_ram`)."""
    END = 0x7F


RAM_CHUNK = 1 << 20
"""At most this many bytes of RAM per section (plus its 8-byte address)."""
MAX_PAYLOAD: dict[Kind, int] = {Kind.HEADER: 1 << 20, Kind.DEVICE: 1 << 20, Kind.CPU: 1 << 20,
                                Kind.CLOCK: 4096, Kind.RAM: 8 + RAM_CHUNK, Kind.MAPPED_RAM: 4096,
                                Kind.END: _END.size}


@dataclass(frozen=True)
class Section:
    kind: Kind
    id: str
    payload: bytes

    @property
    def where(self) -> str:
        return f"section {self.kind.name.lower()} '{self.id}'" if self.id else f"section {self.kind.name.lower()}"


class Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


def _crc(kind: int, ident: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(ident, zlib.crc32(bytes([kind])))) & 0xFFFFFFFF


def section_size(ident: str, payload_size: int) -> int:
    """Bytes a section with this id and payload size takes in the stream (a writer that must know where
    the stream ends before writing its last sections, as the mapped-ram layout does)."""
    return _SECTION.size + len(ident.encode()) + payload_size


END_SECTION_SIZE = _SECTION.size + _END.size
"""Bytes of the end marker section."""


class StreamWriter:
    """Writes sections to ``out``; :meth:`finish` writes the end marker."""

    def __init__(self, out: Writable) -> None:
        self._out = out
        self.sections = 0
        self.ram_bytes = 0
        self.bytes_written = _START.size
        out.write(_START.pack(MAGIC, FORMAT_VERSION))

    def section(self, kind: Kind, ident: str, payload: bytes | memoryview) -> None:
        raw_id = ident.encode()
        if len(raw_id) > MAX_ID:
            raise ValueError(f"section id {ident!r} is longer than {MAX_ID} bytes")
        if len(payload) > MAX_PAYLOAD[kind]:
            raise ValueError(f"{kind.name} section '{ident}' is {len(payload)} bytes, the format allows "
                             f"{MAX_PAYLOAD[kind]}")
        self._out.write(_SECTION.pack(kind, len(raw_id), len(payload), _crc(kind, raw_id, payload)) + raw_id)
        self._out.write(bytes(payload))
        self.sections += 1
        self.bytes_written += _SECTION.size + len(raw_id) + len(payload)
        if kind is Kind.RAM:
            self.ram_bytes += len(payload) - 8

    def finish(self) -> None:
        self.section(Kind.END, "", _END.pack(self.sections, self.ram_bytes))


class StreamReader:
    """Reads and checks sections from ``source``. Iterating yields every section before the end marker,
    each with a verified length, checksum and kind; the end marker's counts are checked too."""

    def __init__(self, source: IO[bytes]) -> None:
        self._in = source
        self.bytes_read = 0
        head = self._read(_START.size, "the stream header")
        magic, version = _START.unpack(head)
        if magic != MAGIC:
            raise StreamFormatError("not a pyemu VM-state stream (bad magic)")
        if version != FORMAT_VERSION:
            raise StreamFormatError(f"VM-state format version {version} is not supported (this pyemu reads "
                                    f"version {FORMAT_VERSION})")

    def _read(self, size: int, what: str) -> bytes:
        chunks: list[bytes] = []
        left = size
        while left:
            data = self._in.read(left)
            if not data:
                raise StreamTruncated(f"the stream ends inside {what} ({size - left} of {size} bytes)")
            chunks.append(data)
            left -= len(data)
        self.bytes_read += size
        return b"".join(chunks)

    def __iter__(self) -> Iterator[Section]:
        count = 0
        ram = 0
        while True:
            raw_kind, id_len, length, crc = _SECTION.unpack(self._read(_SECTION.size, f"section {count + 1}'s header"))
            try:
                kind = Kind(raw_kind)
            except ValueError:
                raise StreamCorrupt(f"section {count + 1} has unknown kind {raw_kind}") from None
            if id_len > MAX_ID:
                raise StreamCorrupt(f"section {count + 1} has an id of {id_len} bytes (at most {MAX_ID})")
            raw_id = self._read(id_len, f"section {count + 1}'s id")
            try:
                ident = raw_id.decode()
            except UnicodeDecodeError:
                raise StreamCorrupt(f"section {count + 1} has an id that is not UTF-8") from None
            where = Section(kind, ident, b"").where
            if length > MAX_PAYLOAD[kind]:
                raise StreamCorrupt(f"payload of {length} bytes is over the {MAX_PAYLOAD[kind]}-byte limit", where)
            payload = self._read(length, where)
            if _crc(kind, raw_id, payload) != crc:
                raise StreamCorrupt("checksum mismatch", where)
            if kind is Kind.END:
                if length != _END.size:
                    raise StreamCorrupt("bad end marker", where)
                sections, ram_bytes = _END.unpack(payload)
                if sections != count or ram_bytes != ram:
                    raise StreamCorrupt(f"the end marker counts {sections} sections and {ram_bytes} RAM bytes, "
                                        f"the stream had {count} and {ram}", where)
                return
            count += 1
            if kind is Kind.RAM:
                ram += max(0, length - 8)
            yield Section(kind, ident, payload)
