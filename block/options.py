"""``-drive`` options: QEMU's key=value properties as one frozen, validated config, and opening it.

The CLI splits ``-drive file=disk.img,format=raw,if=virtio,cache=none`` into pairs; :meth:`DriveOptions.
from_props` turns the words into typed values (booleans, sizes, cache modes) and ``__post_init__`` applies
every rule, so a config built by QMP or a test is checked the same way. Options pyemu does not implement
yet are refused by name (snapshot=on, qcow2, io_uring) rather than silently ignored: a user who asked for
them would otherwise get different semantics than they think. :func:`open_drive` builds the node graph
QEMU would (raw over file) and returns the BlockBackend a device attaches to.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Sequence

from pyemu.block.backend import BlockBackend, CacheMode
from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockConfigError
from pyemu.block.file import LOCKING_MODES, FileProtocol
from pyemu.block.locking import default_permissions
from pyemu.block.raw import SECTOR_SIZE, RawFormat

FORMATS = ("raw", "file")
INTERFACES = ("none", "virtio")
UNSUPPORTED_INTERFACES = ("ide", "scsi", "floppy", "pflash", "mtd", "sd", "xen")
AIO_MODES = ("threads", "native")
_KNOWN_FORMATS_NOT_YET = ("qcow2", "qcow", "vmdk", "vdi", "vhdx", "vpc", "qed", "luks", "dmg", "parallels",
                          "cloop", "bochs", "vvfat", "nbd", "host_device", "host_cdrom")
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_SIZE_RE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\s*([bBkKmMgGtTpPeE]?)\Z")
_SIZE_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_TRUE = ("on", "yes", "true")
_FALSE = ("off", "no", "false")
_DISCARD_ALIASES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}


def _error(message: str) -> BlockConfigError:
    return BlockConfigError(f"-drive: {message}")


def parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _error(f"Parameter '{key}' expects 'on' or 'off'")


def parse_size(key: str, value: str) -> int:
    """QEMU's size syntax: bytes, hex, or a binary suffix k/M/G/T/P/E."""
    match = _SIZE_RE.match(value.strip())
    if not match:
        raise _error(f"Parameter '{key}' expects a non-negative number below 2^64 (optional suffix k, M, G, T, "
                     "P, E)")
    digits, suffix = match.groups()
    number = int(digits, 16) if digits[:2].lower() == "0x" else int(digits)
    result = number << _SIZE_SHIFT[suffix.lower()]
    if result >= 1 << 63:
        raise _error(f"Parameter '{key}' is too large: {value}")
    return result


def parse_index(value: str) -> int:
    if not value.isdigit():
        raise _error(f"Parameter 'index' expects a non-negative integer, not '{value}'")
    return int(value)


@dataclass(frozen=True)
class DriveOptions:
    """A validated ``-drive``. ``interface`` is QEMU's ``if``; ``discard`` is normalised to ignore|unmap."""

    file: str
    format: str = "raw"
    interface: str = "none"
    id: str | None = None
    readonly: bool = False
    cache: CacheMode = field(default_factory=CacheMode)
    discard: str = "ignore"
    detect_zeroes: str = "off"
    locking: str = "auto"
    aio: str = "threads"
    media: str = "disk"
    serial: str | None = None
    index: int | None = None
    snapshot: bool = False
    offset: int = 0
    size: int | None = None

    def __post_init__(self) -> None:
        if not self.file:
            raise _error("parameter 'file' is required (empty drives are not supported)")
        if self.format in _KNOWN_FORMATS_NOT_YET:
            raise _error(f"format '{self.format}' is not supported yet (only raw)")
        if self.format not in FORMATS:
            raise _error(f"Unknown driver '{self.format}'")
        if self.interface in UNSUPPORTED_INTERFACES:
            raise _error(f"if={self.interface} is not supported (use if=virtio or if=none)")
        if self.interface not in INTERFACES:
            raise _error(f"unsupported bus type '{self.interface}'")
        if self.id is not None and not _ID_RE.match(self.id):
            raise _error(f"Parameter 'id' expects an identifier (a letter, then letters, digits, '-', '.', "
                         f"'_'), not '{self.id}'")
        discard = _DISCARD_ALIASES.get(self.discard)
        if discard is None:
            raise _error(f"Invalid discard option '{self.discard}' (expected ignore, off, unmap or on)")
        object.__setattr__(self, "discard", discard)
        if self.detect_zeroes in ("on", "unmap"):
            raise _error(f"detect-zeroes={self.detect_zeroes} is not supported yet (only off)")
        if self.detect_zeroes != "off":
            raise _error(f"Parameter 'detect-zeroes' does not accept value '{self.detect_zeroes}'")
        if self.locking not in LOCKING_MODES:
            raise _error(f"Parameter 'locking' does not accept value '{self.locking}' (expected auto, on or off)")
        if self.aio == "io_uring":
            raise _error("aio=io_uring was specified, but is not supported in this build")
        if self.aio not in AIO_MODES:
            raise _error(f"invalid aio option '{self.aio}' (expected threads or native)")
        if self.aio == "native" and not self.cache.direct:
            raise _error("aio=native was specified, but it requires cache.direct=on, which was not specified")
        if self.media == "cdrom":
            raise _error("media=cdrom is not supported (only disk)")
        if self.media != "disk":
            raise _error(f"'{self.media}' invalid media")
        if self.index is not None and (type(self.index) is not int or self.index < 0):  # noqa: E721
            raise _error(f"Parameter 'index' expects a non-negative integer, not {self.index!r}")
        if self.snapshot:
            raise _error("snapshot=on is not supported yet")
        if type(self.offset) is not int or self.offset < 0:  # noqa: E721
            raise _error(f"Parameter 'offset' expects a non-negative integer, not {self.offset!r}")
        if self.size is not None and (type(self.size) is not int or self.size < 0):  # noqa: E721
            raise _error(f"Parameter 'size' expects a non-negative integer, not {self.size!r}")
        if self.size is not None and self.size % SECTOR_SIZE:
            raise _error(f"Specified size is not multiple of {SECTOR_SIZE}")
        if self.format != "raw" and (self.offset or self.size is not None):
            raise _error(f"Block format '{self.format}' does not support the option "
                         f"'{'offset' if self.offset else 'size'}'")

    @property
    def effective_id(self) -> str:
        """``id``, or the name QEMU generates: interface + index ("virtio0", "none0")."""
        return self.id if self.id is not None else f"{self.interface}{self.index or 0}"

    @property
    def has_window(self) -> bool:
        return self.offset != 0 or self.size is not None

    @property
    def notes(self) -> tuple[str, ...]:
        """Informational lines for the user (accepted options that behave differently than in QEMU)."""
        notes: list[str] = []
        if self.aio == "native":
            notes.append("-drive: aio=native behaves as aio=threads in pyemu")
        return tuple(notes)

    @classmethod
    def from_props(cls, props: Sequence[tuple[str, str]]) -> "DriveOptions":
        """Build from ``-drive`` key=value pairs (a later key overrides an earlier one, as in QEMU)."""
        values: dict[str, object] = {}
        cache_name: str | None = None
        cache_overrides: dict[str, bool] = {}
        for key, value in props:
            if key == "file":
                values["file"] = value
            elif key == "format":
                values["format"] = value
            elif key == "if":
                values["interface"] = value
            elif key == "id":
                values["id"] = value
            elif key in ("readonly", "read-only"):
                values["readonly"] = parse_bool(key, value)
            elif key == "cache":
                cache_name = value
            elif key == "cache.direct":
                cache_overrides["direct"] = parse_bool(key, value)
            elif key == "cache.no-flush":
                cache_overrides["no_flush"] = parse_bool(key, value)
            elif key == "cache.writeback":
                cache_overrides["writeback"] = parse_bool(key, value)
            elif key == "discard":
                values["discard"] = value
            elif key == "detect-zeroes":
                values["detect_zeroes"] = value
            elif key in ("locking", "file.locking"):
                values["locking"] = value
            elif key == "aio":
                values["aio"] = value
            elif key == "media":
                values["media"] = value
            elif key == "serial":
                values["serial"] = value
            elif key == "index":
                values["index"] = parse_index(value)
            elif key == "snapshot":
                values["snapshot"] = parse_bool(key, value)
            elif key == "offset":
                values["offset"] = parse_size(key, value)
            elif key == "size":
                values["size"] = parse_size(key, value)
            else:
                raise _error(f"Invalid parameter '{key}'")
        if "file" not in values:
            raise _error("parameter 'file' is required (empty drives are not supported)")
        cache = CacheMode.parse(cache_name) if cache_name is not None else CacheMode()
        values["cache"] = dataclasses.replace(cache, **cache_overrides)
        return cls(**values)  # type: ignore[arg-type]


def open_drive(options: DriveOptions) -> BlockBackend:
    """Open the image as QEMU would for this ``-drive`` (raw over file, with QEMU-compatible locks).

    Raises BlockConfigError ("-drive: Could not open 'PATH': No such file or directory", O_DIRECT not
    supported, bad offset/size for the image) or ImageLockedError.
    """
    perm, shared = default_permissions(read_only=options.readonly,
                                       fixed_size=options.format == "raw" and options.has_window)
    try:
        protocol = FileProtocol.open(options.file, read_only=options.readonly, direct=options.cache.direct,
                                     locking=options.locking, perm=perm, shared=shared)
    except BlockConfigError as exc:
        raise BlockConfigError(f"-drive: {exc}", errno=exc.errno) from exc
    root: BlockDriver = protocol
    try:
        if options.format == "raw":
            root = RawFormat(protocol, offset=options.offset, size=options.size)
        return BlockBackend(root, read_only=options.readonly, cache=options.cache, discard=options.discard,
                            id=options.effective_id)
    except BlockConfigError as exc:
        protocol.close()
        if str(exc).startswith("-drive:"):
            raise
        raise BlockConfigError(f"-drive: {exc}", errno=exc.errno) from exc
    except BaseException:
        protocol.close()
        raise
