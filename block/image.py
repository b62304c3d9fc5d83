"""Opening an image as a node graph: probe the format, open the protocol node, the format node, and the
whole backing chain under it.

This is the one place that knows how formats stack (raw or qcow2 over ``file``; a qcow2 node's ``backing``
child opened the same way, recursively), so ``-drive``, ``pyemu-img`` and later ``blockdev-add`` build the
same graphs. The backing chain is opened read-only and shares its images with other readers (QEMU's
permissions for a backing child); a chain that loops or is deeper than :data:`MAX_CHAIN_DEPTH` is refused by
name, and a relative backing file name is resolved against the directory of the image that names it, as
qemu-img does.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockConfigError
from pyemu.block.file import FileProtocol
from pyemu.block.hostio import write_full, zero_chunks
from pyemu.block.locking import BlockPerm, default_permissions
from pyemu.block.qcow2.layout import MAGIC

FORMATS = ("raw", "qcow2")
MAX_CHAIN_DEPTH = 64


def probe_format(filename: str) -> str:
    """"qcow2" when the file starts with the qcow2 magic, else "raw" (what QEMU's probe returns for these)."""
    from pyemu.block.nbd import is_nbd_url
    if is_nbd_url(filename):
        from pyemu.block.nbd.image import open_nbd_image, probe_nbd_format
        node = open_nbd_image(filename, format="nbd")
        try:
            return probe_nbd_format(node)
        finally:
            node.close()
    try:
        with open(filename, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise BlockConfigError(f"Could not open '{filename}': {os.strerror(exc.errno or errno.EIO)}", option=None,
                               errno=exc.errno) from exc
    return "qcow2" if head == MAGIC else "raw"


def resolve_backing(overlay: str, backing_file: str) -> str:
    """A backing file name as stored in ``overlay``, made usable from the current directory."""
    if os.path.isabs(backing_file) or ":" in backing_file.split("/", 1)[0]:
        return backing_file
    return os.path.join(os.path.dirname(overlay), backing_file)


def open_image(filename: str, *, format: str | None = None, read_only: bool = True, open_backing: bool = True,
               backing_format: str | None = None, cache_direct: bool = False, locking: str = "auto",
               perm: BlockPerm | None = None, shared: BlockPerm | None = None, no_flush: bool = False,
               repairing: bool = False, _chain: tuple[str, ...] = ()) -> BlockDriver:
    """Open ``filename`` as a format node (raw or qcow2) with its backing chain; see the module docstring.

    ``perm``/``shared`` are the permissions taken on the top image (QEMU-compatible locks); backing files
    are opened read-only and shared with writers that do not change them. ``backing_format`` is not used for
    the top image; it is how a parent passes its header's backing format down.
    """
    from pyemu.block.nbd import is_nbd_url
    if is_nbd_url(filename):
        from pyemu.block.nbd.image import open_nbd_image
        return open_nbd_image(filename, format=format, read_only=read_only)
    if "\0" in filename:
        shown = filename.replace("\0", "\\0")
        raise BlockConfigError(f"Could not open '{shown}': the file name contains a NUL byte", option=None,
                               errno=errno.EINVAL)
    fmt = format if format is not None else probe_format(filename)
    if fmt not in FORMATS:
        raise BlockConfigError(f"Unknown driver '{fmt}'", option=None)
    real = os.path.realpath(filename)
    if real in _chain:
        raise BlockConfigError(f"Could not open backing file: backing chain of '{_chain[0]}' loops at "
                               f"'{filename}'", option=None, errno=errno.ELOOP)
    if len(_chain) > MAX_CHAIN_DEPTH:
        raise BlockConfigError(f"Could not open '{filename}': backing chain deeper than {MAX_CHAIN_DEPTH} images",
                               option=None, errno=errno.EMLINK)
    if perm is None or shared is None:
        default_perm, default_shared = default_permissions(read_only=read_only)
        perm = default_perm if perm is None else perm
        shared = default_shared if shared is None else shared
    protocol = FileProtocol.open(filename, read_only=read_only, direct=cache_direct, locking=locking, perm=perm,
                                 shared=shared, growable=fmt == "qcow2", no_flush=no_flush)
    try:
        if fmt == "raw":
            from pyemu.block.raw import RawFormat
            return RawFormat(protocol)
        from pyemu.block.qcow2.driver import Qcow2Format

        def backing_opener(header) -> BlockDriver | None:  # type: ignore[no-untyped-def]
            if not open_backing or not header.backing_file:
                return None
            return open_backing_image(filename, header, cache_direct=cache_direct, locking=locking,
                                      _chain=_chain + (real,))

        return Qcow2Format.open(protocol, read_only=read_only, open_backing=backing_opener, repairing=repairing)
    except BaseException:
        protocol.close()
        raise


def open_backing_image(overlay: str, header: Any, *, cache_direct: bool = False, locking: str = "auto",
                       _chain: tuple[str, ...] = ()) -> BlockDriver:
    """The backing chain a qcow2 header of ``overlay`` names, opened read-only and shared with writers that
    do not change it (QEMU's backing permissions); errors say "Could not open backing file: ...". Used by
    :func:`open_image` and by ``blockdev-add`` of a qcow2 node without a ``backing`` member."""
    path = resolve_backing(overlay, header.backing_file)
    try:
        return open_image(path, format=header.backing_format, read_only=True, cache_direct=cache_direct,
                          locking=locking, perm=BlockPerm.CONSISTENT_READ,
                          shared=BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED | BlockPerm.RESIZE,
                          _chain=_chain or (os.path.realpath(overlay),))
    except BlockConfigError as exc:
        if str(exc).startswith("Could not open backing file"):
            raise
        raise BlockConfigError(f"Could not open backing file: {exc}", option=None, errno=exc.errno) from exc


def preallocate_file(fd: int, start: int, end: int, preallocation: str) -> None:
    """Reserve (``falloc``) or write zeros over (``full``) ``[start, end)`` of a raw file; ``off`` does
    nothing (the range stays a hole). Raises OSError."""
    if preallocation == "falloc" and end > start:
        os.posix_fallocate(fd, start, end - start)
    elif preallocation == "full":
        for pos, chunk in zero_chunks(start, end - start):
            write_full(fd, pos, [chunk])


def create_raw(filename: str, size: int, *, preallocation: str = "off") -> None:
    """Create (or truncate) a raw image of ``size`` bytes: sparse (off), reserved (falloc) or zero-filled."""
    if preallocation not in ("off", "falloc", "full"):
        raise BlockConfigError(f"Invalid parameter '{preallocation}' for preallocation (expected off, falloc or "
                               "full)", option=None)
    if size < 0:
        raise BlockConfigError("Image size must be non-negative", option=None)
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BlockConfigError(f"Could not create '{filename}': {os.strerror(exc.errno or errno.EIO)}", option=None,
                               errno=exc.errno) from exc
    try:
        os.ftruncate(fd, size)
        preallocate_file(fd, 0, size, preallocation)
        os.fsync(fd)
    except OSError as exc:
        raise BlockConfigError(f"Could not write '{filename}': {os.strerror(exc.errno or errno.EIO)}", option=None,
                               errno=exc.errno) from exc
    finally:
        os.close(fd)
