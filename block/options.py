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
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Sequence

from pyemu.block.backend import BlockBackend, CacheMode
from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockConfigError
from pyemu.block.file import LOCKING_MODES, FileProtocol
from pyemu.block.locking import default_permissions
from pyemu.block.image import open_image, probe_format
from pyemu.block.nbd.uri import is_nbd_url, target_from_options
from pyemu.block.raw import SECTOR_SIZE, RawFormat
from pyemu.block.throttle import ThrottleConfig, ThrottleError

FORMATS = ("raw", "qcow2", "file", "nbd")
INTERFACES = ("none", "virtio")
UNSUPPORTED_INTERFACES = ("ide", "scsi", "floppy", "pflash", "mtd", "sd", "xen")
AIO_MODES = ("threads", "native")
_KNOWN_FORMATS_NOT_YET = ("qcow", "vmdk", "vdi", "vhdx", "vpc", "qed", "luks", "dmg", "parallels",
                          "cloop", "bochs", "vvfat", "host_device", "host_cdrom")
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_SIZE_RE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\s*([bBkKmMgGtTpPeE]?)\Z")
_SIZE_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_TRUE = ("on", "yes", "true")
_FALSE = ("off", "no", "false")
_DISCARD_ALIASES = {"ignore": "ignore", "off": "ignore", "unmap": "unmap", "on": "unmap"}


#: QEMU's pre-2.4 ``-drive`` throttling names, still accepted by 7.2's -drive (renamed to ``throttling.*``).
LEGACY_THROTTLE_NAMES = {
    "bps": "bps-total", "bps_rd": "bps-read", "bps_wr": "bps-write",
    "iops": "iops-total", "iops_rd": "iops-read", "iops_wr": "iops-write",
    "bps_max": "bps-total-max", "bps_rd_max": "bps-read-max", "bps_wr_max": "bps-write-max",
    "iops_max": "iops-total-max", "iops_rd_max": "iops-read-max", "iops_wr_max": "iops-write-max",
    "iops_size": "iops-size",
}


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
    format: str | None = None
    """None: probe (qcow2 by its magic, else raw with a warning and block 0 guarded), as QEMU."""
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
    copy_on_read: bool = False
    """``copy-on-read=on``: a copy-on-read filter above the image (data read from the backing chain is
    written into the top image, :mod:`pyemu.block.copy_on_read`)."""
    offset: int = 0
    size: int | None = None
    reconnect_delay: int = 0
    """NBD only: seconds requests wait for a lost NBD connection to come back (QEMU's reconnect-delay)."""
    throttling: ThrottleConfig = field(default_factory=ThrottleConfig)
    """``throttling.*`` (and QEMU's legacy ``bps``/``iops_rd``/... spellings): the drive's I/O limits."""
    throttle_group: str | None = None
    """``throttling.group``: share the limits with the other drives (and ``-object throttle-group``) of
    that name."""

    def __post_init__(self) -> None:
        if not self.file:
            raise _error("parameter 'file' is required (empty drives are not supported)")
        if self.format in _KNOWN_FORMATS_NOT_YET:
            raise _error(f"format '{self.format}' is not supported yet (only raw and qcow2)")
        if self.format is not None and self.format not in FORMATS:
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
        if type(self.offset) is not int or self.offset < 0:  # noqa: E721
            raise _error(f"Parameter 'offset' expects a non-negative integer, not {self.offset!r}")
        if self.size is not None and (type(self.size) is not int or self.size < 0):  # noqa: E721
            raise _error(f"Parameter 'size' expects a non-negative integer, not {self.size!r}")
        if self.size is not None and self.size % SECTOR_SIZE:
            raise _error(f"Specified size is not multiple of {SECTOR_SIZE}")
        if type(self.reconnect_delay) is not int or self.reconnect_delay < 0:  # noqa: E721
            raise _error(f"Parameter 'reconnect-delay' expects a non-negative integer, not {self.reconnect_delay!r}")
        if self.format == "nbd" and not is_nbd_url(self.file):
            raise _error(f"format 'nbd' needs an NBD URL (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket="
                         f"PATH), not '{self.file}'")
        if self.format not in ("raw", None) and (self.offset or self.size is not None):
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
        if self.copy_on_read and self.readonly:
            notes.append("-drive: warning: disabling copy-on-read on read-only drive")  # QEMU 7.2's words
        return tuple(notes)

    def probe_warning(self) -> str:
        return (f"WARNING: Image format was not specified for '{self.file}' and probing guessed raw.\n"
                "         Automatically detecting the format is dangerous for raw images, write operations on "
                "block 0 will be restricted.\n"
                "         Specify the 'raw' format explicitly to remove the restrictions.")

    @classmethod
    def from_props(cls, props: Sequence[tuple[str, str]]) -> "DriveOptions":
        """Build from ``-drive`` key=value pairs (a later key overrides an earlier one, as in QEMU)."""
        values: dict[str, object] = {}
        cache_name: str | None = None
        cache_overrides: dict[str, bool] = {}
        nbd_props: dict[str, str] = {}
        limits: dict[str, int] = {}
        for key, value in props:
            if key in ("driver", "file.driver"):
                if value != "nbd":
                    raise _error(f"driver '{value}' is not supported here (use format=)")
                nbd_props["driver"] = value
            elif key.startswith(("server.", "file.server.")) or key in ("export", "file.export"):
                nbd_props[key.removeprefix("file.")] = value
            elif key in ("reconnect-delay", "file.reconnect-delay"):
                if not value.isdigit():
                    raise _error(f"Parameter 'reconnect-delay' expects a non-negative integer, not '{value}'")
                values["reconnect_delay"] = int(value)
            elif key == "file":
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
            elif key == "copy-on-read":
                values["copy_on_read"] = parse_bool(key, value)
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
            elif key in ("throttling.group", "group"):
                values["throttle_group"] = value
            elif key.startswith("throttling.") or key in LEGACY_THROTTLE_NAMES:
                name = LEGACY_THROTTLE_NAMES.get(key) or key[len("throttling."):]
                if not value.isdigit():
                    raise _error(f"Parameter '{key}' expects a number")
                limits[name] = int(value)
            else:
                raise _error(f"Invalid parameter '{key}'")
        if nbd_props:
            if "file" in values:
                raise _error("file= cannot be combined with driver=nbd options (use one or the other)")
            if nbd_props.pop("driver", None) != "nbd":
                raise _error("server.* and export options need driver=nbd")
            try:
                values["file"] = target_from_options(nbd_props).url()
            except BlockConfigError as exc:
                raise _error(str(exc)) from exc
            values.setdefault("format", "raw")
        if "file" not in values:
            raise _error("parameter 'file' is required (empty drives are not supported)")
        cache = CacheMode.parse(cache_name) if cache_name is not None else CacheMode()
        values["cache"] = dataclasses.replace(cache, **cache_overrides)
        if limits:
            try:
                values["throttling"] = ThrottleConfig.from_limits(limits)
            except ThrottleError as exc:
                raise _error(str(exc)) from None
        return cls(**values)  # type: ignore[arg-type]


def open_drive(options: DriveOptions, *, warn: Callable[[str], None] | None = None) -> BlockBackend:
    """Open the image as QEMU would for this ``-drive``: raw or qcow2 (with its backing chain) over file,
    QEMU-compatible locks, and with ``snapshot=on`` a temporary qcow2 overlay taking every write.

    Raises BlockConfigError ("-drive: Could not open 'PATH': No such file or directory", O_DIRECT not
    supported, bad offset/size for the image, a corrupt qcow2 header) or ImageLockedError. ``warn`` gets the
    format-probing warning and the notes.
    """
    for note in options.notes:
        if warn is not None:
            warn(note)
    try:
        fmt = options.format
        base_read_only = options.readonly or options.snapshot
        if fmt is None and is_nbd_url(options.file):
            # Probed over the connection that then serves the drive: a qemu-nbd without -t serves one client.
            root = _open_nbd_root(options, None, read_only=base_read_only, guard_block0=True)
            fmt = str(root.name)
            if fmt == "raw" and warn is not None:
                warn(options.probe_warning())
        else:
            if fmt is None:
                fmt = probe_format(options.file)
                if fmt == "raw" and warn is not None:
                    warn(options.probe_warning())
            root = _open_root(options, fmt, read_only=base_read_only, guard_block0=options.format is None)
    except BlockConfigError as exc:
        if str(exc).startswith("-drive:"):
            raise
        raise BlockConfigError(f"-drive: {exc}", errno=exc.errno) from exc
    try:
        if options.snapshot:
            root = temporary_overlay(root, fmt, cache_direct=options.cache.direct)
        if options.copy_on_read and not options.readonly:
            from pyemu.block.copy_on_read import CopyOnRead

            root = CopyOnRead(root, user=f"copy-on-read filter of drive '{options.effective_id}'")
        backend = BlockBackend(root, read_only=options.readonly, cache=options.cache, discard=options.discard,
                               id=options.effective_id)
        if options.throttling.enabled:  # throttling.group= alone throttles nothing in QEMU 7.2 either
            backend.set_throttle(options.throttling, options.throttle_group)
        return backend
    except BlockConfigError as exc:
        root.close()
        if str(exc).startswith("-drive:"):
            raise
        raise BlockConfigError(f"-drive: {exc}", errno=exc.errno) from exc
    except BaseException:
        root.close()
        raise


def _open_root(options: DriveOptions, fmt: str, *, read_only: bool, guard_block0: bool) -> BlockDriver:
    if is_nbd_url(options.file):
        return _open_nbd_root(options, fmt, read_only=read_only, guard_block0=guard_block0)
    if fmt == "qcow2":
        perm, shared = default_permissions(read_only=read_only)
        return open_image(options.file, format="qcow2", read_only=read_only, cache_direct=options.cache.direct,
                          locking=options.locking, perm=perm, shared=shared)
    perm, shared = default_permissions(read_only=read_only, fixed_size=fmt == "raw" and options.has_window)
    protocol = FileProtocol.open(options.file, read_only=read_only, direct=options.cache.direct,
                                 locking=options.locking, perm=perm, shared=shared)
    if fmt == "file":
        return protocol
    try:
        return RawFormat(protocol, offset=options.offset, size=options.size, guard_block0=guard_block0)
    except BaseException:
        protocol.close()
        raise


def _open_nbd_root(options: DriveOptions, fmt: str | None, *, read_only: bool, guard_block0: bool) -> BlockDriver:
    """raw (with its window) or qcow2 over the ``nbd`` protocol node, or the bare node for format=nbd;
    ``fmt`` None probes the export's first bytes on the same connection."""
    from pyemu.block.nbd.image import open_nbd_image, probe_nbd_format

    node = open_nbd_image(options.file, format="nbd", read_only=read_only, reconnect_delay=options.reconnect_delay)
    try:
        if fmt is None:
            fmt = probe_nbd_format(node)
        if fmt in ("nbd", "file"):
            return node
        if fmt == "qcow2":
            from pyemu.block.qcow2.driver import Qcow2Format
            return Qcow2Format.open(node, read_only=read_only)
        return RawFormat(node, offset=options.offset, size=options.size, guard_block0=guard_block0)
    except BaseException:
        node.close()
        raise


def temporary_overlay(base: BlockDriver, fmt: str, *, cache_direct: bool = False) -> BlockDriver:
    """A qcow2 overlay in the temporary directory over the open node ``base`` (``-snapshot``): the guest
    writes into it, ``base`` is never written. The file is unlinked at once, so nothing is left behind even
    when pyemu is killed."""
    from pyemu.block.qcow2.create import create_qcow2
    from pyemu.block.qcow2.driver import Qcow2Format

    directory = os.environ.get("TMPDIR", "/var/tmp")
    if not os.path.isdir(directory):
        directory = tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="pyemu-snapshot-", suffix=".qcow2", dir=directory)
    os.close(fd)
    try:
        create_qcow2(path, base.size() // 512 * 512 or 512, backing_file=os.path.abspath(base.filename),
                     backing_format=fmt if fmt != "file" else "raw")
        file = FileProtocol.open(path, read_only=False, direct=cache_direct, locking="off", growable=True)
        try:
            return Qcow2Format.open(file, read_only=False, open_backing=lambda header: base)
        except BaseException:
            file.close()
            raise
    finally:
        os.unlink(path)
