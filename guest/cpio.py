"""A cpio "newc" archive writer (and reader) for building Linux initramfs images.

Why our own: the kernel's initramfs unpacker reads only the "newc" format (magic ``070701``), the system
``cpio`` tool may be missing, and an archive built from a file list in code is reproducible bit for bit
(fixed mtime, uid/gid 0, inode numbers in entry order, gzip header without a timestamp).

Format, per entry: a 110-byte ASCII header (magic, then 13 fields of 8 hex digits: ino, mode, uid, gid,
nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize including the NUL, check),
the name and its NUL padded to a multiple of 4 bytes, then the data padded to a multiple of 4. The
archive ends with an entry named ``TRAILER!!!``. Symlink data is the target path. Device nodes carry
their numbers in rdevmajor/rdevminor.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from pyemu.errors import PyemuError

NEWC_MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
DEFAULT_MTIME = 0
FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)


class CpioError(PyemuError):
    """An archive entry is invalid (bad path, duplicate name) or an archive cannot be parsed."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``name`` is relative ("bin/busybox"), ``mode`` includes the file-type bits."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = DEFAULT_MTIME
    rdevmajor: int = 0
    rdevminor: int = 0
    ino: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def link_target(self) -> str:
        return self.data.decode("utf-8")


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def normalize_path(path: str) -> str:
    """Archive names are relative and clean: "/bin//sh" -> "bin/sh"; refuse "..", empty and NUL."""
    if "\0" in path:
        raise CpioError(f"cpio path {path!r} contains a NUL")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise CpioError(f"cpio path {path!r} is empty or leaves the archive root")
    return "/".join(parts)


def encode_entry(entry: CpioEntry) -> bytes:
    """Header, padded name and padded data of one entry."""
    name = entry.name.encode("utf-8") + b"\0"
    values = {
        "ino": entry.ino, "mode": entry.mode, "uid": entry.uid, "gid": entry.gid, "nlink": entry.nlink,
        "mtime": entry.mtime, "filesize": len(entry.data), "devmajor": 0, "devminor": 0,
        "rdevmajor": entry.rdevmajor, "rdevminor": entry.rdevminor, "namesize": len(name), "check": 0,
    }
    for field_name, value in values.items():
        if not 0 <= value <= 0xFFFFFFFF:
            raise CpioError(f"cpio entry {entry.name!r}: {field_name} {value} does not fit in 32 bits")
    header = NEWC_MAGIC + b"".join(b"%08X" % values[f] for f in FIELDS)
    return header + name + _pad4(HEADER_SIZE + len(name)) + entry.data + _pad4(len(entry.data))


class CpioArchive:
    """An in-memory list of entries, written in insertion order with missing parent directories added.

    Parents come first because the kernel's unpacker creates each entry as it reads it; a file whose
    directory does not yet exist would be dropped.
    """

    def __init__(self, *, mtime: int = DEFAULT_MTIME) -> None:
        self.mtime = mtime
        self._entries: dict[str, CpioEntry] = {}

    # -- building -----------------------------------------------------------------------------------------
    def add_directory(self, path: str, mode: int = 0o755) -> None:
        name = normalize_path(path)
        existing = self._entries.get(name)
        if existing is not None:
            if not existing.is_dir:
                raise CpioError(f"cpio path {name!r} already exists and is not a directory")
            # An explicit call after an implicit parent creation sets the mode asked for.
            self._entries[name] = replace(existing, mode=stat.S_IFDIR | (mode & 0o7777))
            return
        self._add(CpioEntry(name, stat.S_IFDIR | (mode & 0o7777), nlink=2, mtime=self.mtime))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(CpioEntry(normalize_path(path), stat.S_IFREG | (mode & 0o7777), bytes(data), mtime=self.mtime))

    def add_symlink(self, path: str, target: str) -> None:
        if not target or "\0" in target:
            raise CpioError(f"symlink {path!r} has an invalid target {target!r}")
        self._add(CpioEntry(normalize_path(path), stat.S_IFLNK | 0o777, target.encode("utf-8"), mtime=self.mtime))

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A device node: ``kind`` "c" (character) or "b" (block), e.g. /dev/console c 5 1."""
        type_bits = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(kind)
        if type_bits is None:
            raise CpioError(f"device node {path!r}: kind must be 'c' or 'b', not {kind!r}")
        self._add(
            CpioEntry(
                normalize_path(path), type_bits | (mode & 0o7777), mtime=self.mtime,
                rdevmajor=major, rdevminor=minor,
            )
        )

    def _add(self, entry: CpioEntry) -> None:
        if entry.name in self._entries:
            raise CpioError(f"cpio path {entry.name!r} added twice")
        parent = entry.name.rpartition("/")[0]
        if parent:
            self.add_directory(parent)
        self._entries[entry.name] = entry

    # -- output -------------------------------------------------------------------------------------------
    def __contains__(self, path: str) -> bool:
        return normalize_path(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[CpioEntry, ...]:
        return tuple(self._entries.values())

    def to_bytes(self) -> bytes:
        """The uncompressed archive. Inode numbers are assigned 1, 2, ... in entry order."""
        out = io.BytesIO()
        for number, entry in enumerate(self._entries.values(), start=1):
            out.write(encode_entry(_with_ino(entry, number)))
        out.write(encode_entry(CpioEntry(TRAILER, 0, nlink=1, mtime=0)))
        return out.getvalue()

    def to_gzip(self, level: int = 9) -> bytes:
        """The archive gzip-compressed, with a zero timestamp in the gzip header (reproducible)."""
        return gzip.compress(self.to_bytes(), compresslevel=level, mtime=0)

    def write_gzip(self, path: str | os.PathLike[str], level: int = 9) -> int:
        """Write the gzip-compressed archive to ``path`` (atomically); returns its size."""
        data = self.to_gzip(level)
        temporary = f"{os.fspath(path)}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
        return len(data)


def _with_ino(entry: CpioEntry, ino: int) -> CpioEntry:
    return replace(entry, ino=ino)


def iter_entries(data: bytes) -> Iterator[CpioEntry]:
    """Parse a newc archive (uncompressed; gzip is detected and undone), stopping at the trailer."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    offset = 0
    while True:
        header = data[offset : offset + HEADER_SIZE]
        if len(header) < HEADER_SIZE:
            raise CpioError(f"cpio archive ends inside a header at offset {offset}")
        if header[:6] != NEWC_MAGIC:
            raise CpioError(f"cpio header at offset {offset} has magic {header[:6]!r}, expected 070701")
        try:
            values = {name: int(header[6 + 8 * i : 14 + 8 * i], 16) for i, name in enumerate(FIELDS)}
        except ValueError as exc:
            raise CpioError(f"cpio header at offset {offset} has a non-hex field") from exc
        name_start = offset + HEADER_SIZE
        name_end = name_start + values["namesize"]
        if values["namesize"] < 1 or name_end > len(data):
            raise CpioError(f"cpio entry at offset {offset} has a bad name size")
        name = data[name_start : name_end - 1].decode("utf-8", "replace")
        data_start = name_end + (-(HEADER_SIZE + values["namesize"]) % 4)
        data_end = data_start + values["filesize"]
        if data_end > len(data):
            raise CpioError(f"cpio entry {name!r} runs past the end of the archive")
        if name == TRAILER:
            return
        yield CpioEntry(
            name, values["mode"], bytes(data[data_start:data_end]), values["uid"], values["gid"],
            values["nlink"], values["mtime"], values["rdevmajor"], values["rdevminor"], values["ino"],
        )
        offset = data_end + (-values["filesize"] % 4)


def read_archive(data: bytes) -> dict[str, CpioEntry]:
    """All entries of an archive by name."""
    return {entry.name: entry for entry in iter_entries(data)}


def archive_from_entries(entries: Iterable[CpioEntry], *, mtime: int = DEFAULT_MTIME) -> CpioArchive:
    """Rebuild an archive from parsed entries (used to check that writing is a round trip)."""
    archive = CpioArchive(mtime=mtime)
    for entry in entries:
        kind = stat.S_IFMT(entry.mode)
        perms = entry.mode & 0o7777
        if kind == stat.S_IFDIR:
            archive.add_directory(entry.name, perms)
        elif kind == stat.S_IFREG:
            archive.add_file(entry.name, entry.data, perms)
        elif kind == stat.S_IFLNK:
            archive.add_symlink(entry.name, entry.link_target)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            device_kind = "c" if kind == stat.S_IFCHR else "b"
            archive.add_device(entry.name, device_kind, entry.rdevmajor, entry.rdevminor, perms)
        else:
            raise CpioError(f"cpio entry {entry.name!r} has an unsupported file type {kind:#o}")
    return archive
