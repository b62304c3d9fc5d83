"""Opening and creating images for the commands, through :mod:`pyemu.block.image` only.

This is where the tool decides how it uses an image -- read-only or read-write, with or without its backing
chain, which QEMU-compatible lock permissions it takes (``-U`` shares everything), which cache mode -- and
where block-layer errors become qemu-img's messages ("Could not open 'x': ..."). Keeping it in one place
means every command opens images the same way as qemu-img does for that command.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any, Iterator, Protocol, cast

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.block.locking import PERM_ALL, BlockPerm
from pyemu.errors import ConfigError
from pyemu.img.errors import ImgError

FORMATS = ("raw", "qcow2")
CACHE_MODES = ("writeback", "writethrough", "none", "off", "directsync", "unsafe")

# qemu-img's own permissions: readers refuse concurrent writers (as a read-only QEMU drive does), writers
# additionally use WRITE; -U/--force-share shares everything and only reads.
_SHARE_READERS = BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED | BlockPerm.RESIZE


def check_format(fmt: str | None) -> str | None:
    """``fmt`` if pyemu knows it; qemu-img's "Unknown file format" otherwise."""
    if fmt is not None and fmt not in FORMATS:
        raise ImgError(f"Unknown file format '{fmt}'")
    return fmt


def check_cache(mode: str | None) -> bool:
    """Validate ``-t``/``-T``; returns True when the mode bypasses the host page cache (O_DIRECT)."""
    if mode is None:
        return False
    if mode not in CACHE_MODES:
        raise ImgError(f"Invalid cache option: {mode}")
    return mode in ("none", "off", "directsync")


def no_flush(mode: str | None) -> bool:
    """cache=unsafe ignores flushes (qemu-img's default for convert's target)."""
    return mode == "unsafe"


def open_image(filename: str, *, fmt: str | None = None, writable: bool = False, backing: bool = True,
               force_share: bool = False, cache: str | None = None, resize: bool = False,
               repairing: bool = False) -> BlockDriver:
    """Open ``filename`` (format probed unless ``fmt``) as qemu-img would for a command.

    ``backing`` False opens the image without its backing chain (``info``, ``rebase -u``). Errors become
    ImgError("Could not open 'FILE': REASON").
    """
    from pyemu.block.image import open_image as block_open

    check_format(fmt)
    direct = check_cache(cache)
    if force_share and writable:
        raise ImgError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    if force_share:
        perm, shared = BlockPerm.CONSISTENT_READ, PERM_ALL
    elif writable:
        perm = BlockPerm.CONSISTENT_READ | BlockPerm.WRITE | (BlockPerm.RESIZE if resize else BlockPerm(0))
        shared = _SHARE_READERS
    else:
        perm, shared = BlockPerm.CONSISTENT_READ, _SHARE_READERS
    try:
        return block_open(filename, format=fmt, read_only=not writable, open_backing=backing,
                          cache_direct=direct, perm=perm, shared=shared, no_flush=no_flush(cache), repairing=repairing)
    except (BlockError, ConfigError) as exc:
        from pyemu.block.qcow2.header import Qcow2FormatError
        # qcow2 format errors already read "Could not open 'FILE': ..." as qemu-img prints them (once);
        # the file protocol's own errors are prefixed again, as qemu-img does too.
        if isinstance(exc, Qcow2FormatError) and exc.filename == filename:
            raise ImgError(str(exc)) from exc
        raise ImgError(f"Could not open '{filename}': {exc}") from exc
    except OSError as exc:
        raise ImgError(f"Could not open '{filename}': {os.strerror(exc.errno or 5)}") from exc


@contextlib.contextmanager
def opened(filename: str, *, fmt: str | None = None, force_share: bool = False,
           cache: str | None = None) -> Iterator[BlockDriver]:
    """A read-only :func:`open_image` as a context manager that always closes the node (and its chain)."""
    node = open_image(filename, fmt=fmt, force_share=force_share, cache=cache)
    try:
        yield node
    finally:
        close_quietly(node)


def close_quietly(node: BlockDriver | None) -> None:
    """Close ``node``; a failure while closing (a final flush) is reported by the caller's own close."""
    if node is None:
        return
    try:
        node.close()
    except (BlockError, OSError):
        pass


def close_checked(node: BlockDriver, filename: str) -> None:
    """Close ``node`` and report a failed final write-back as an ImgError."""
    try:
        node.close()
    except (BlockError, OSError) as exc:
        raise ImgError(f"Error while closing '{filename}': {exc}") from exc


def probe_format(filename: str) -> str:
    from pyemu.block.image import probe_format as block_probe

    try:
        return block_probe(filename)
    except (BlockError, ConfigError) as exc:
        raise ImgError(f"Could not open '{filename}': {exc}") from exc


class Qcow2Node(Protocol):
    """The whole-image operations a qcow2 node offers beyond BlockDriver (see the block contract)."""

    header: Any
    backing: BlockDriver | None

    def size(self) -> int: ...
    def snapshots(self) -> list[Any]: ...
    def create_snapshot(self, name: str) -> Any: ...
    def apply_snapshot(self, name_or_id: str) -> None: ...
    def delete_snapshot(self, name_or_id: str) -> None: ...
    def check(self, repair: str | None = None) -> Any: ...
    def truncate(self, size: int, *, shrink: bool = False) -> None: ...
    def write_compressed(self, offset: int, data: bytes | memoryview) -> None: ...
    def amend(self, *, compat: str | None = None, lazy_refcounts: bool | None = None) -> None: ...
    def set_backing(self, backing_file: str | None, backing_format: str | None) -> None: ...


def as_qcow2(node: BlockDriver) -> Qcow2Node | None:
    """``node`` seen as a qcow2 node, or None for other formats."""
    return cast(Qcow2Node, node) if node.name == "qcow2" else None


def format_of(node: BlockDriver) -> str:
    """The format name of an opened node ("raw", "qcow2")."""
    return str(node.name)


def backing_of(node: BlockDriver) -> BlockDriver | None:
    """The opened backing node of ``node`` (None for raw and for images without one)."""
    return getattr(node, "backing", None)


def chain_of(node: BlockDriver) -> list[BlockDriver]:
    """``node`` followed by its backing nodes, top to bottom."""
    chain = [node]
    while (below := backing_of(chain[-1])) is not None:
        chain.append(below)
    return chain


def header_of(node: BlockDriver) -> object | None:
    """The qcow2 header of ``node``, None for formats without one."""
    return getattr(node, "header", None)


def resolve_backing(overlay: str, backing_file: str) -> str:
    """A backing file name as stored in ``overlay``, usable from the current directory."""
    from pyemu.block.image import resolve_backing as block_resolve

    return block_resolve(overlay, backing_file)


def create_image(filename: str, fmt: str, size: int | None, *, options: dict[str, object]) -> None:
    """Create ``filename`` through the block layer (``create_qcow2`` / ``create_raw``).

    ``options`` carries the typed ``-o`` values (cluster_size, compat, backing_file, backing_fmt,
    extended_l2, lazy_refcounts, refcount_bits, preallocation). Errors become ImgError("FILE: REASON"),
    qemu-img's form for creation failures.
    """
    try:
        _check_not_in_use(filename)
        if fmt == "qcow2":
            from pyemu.block.qcow2.create import create_qcow2

            kwargs: dict[str, Any] = {}
            for key, name in (("cluster_size", "cluster_size"), ("compat", "compat"),
                              ("backing_file", "backing_file"), ("backing_fmt", "backing_format"),
                              ("extended_l2", "extended_l2"), ("lazy_refcounts", "lazy_refcounts"),
                              ("refcount_bits", "refcount_bits"), ("preallocation", "preallocation")):
                if options.get(key) is not None:
                    kwargs[name] = options[key]
            create_qcow2(filename, size, **kwargs)
        elif fmt == "raw":
            from pyemu.block.image import create_raw

            if size is None:
                raise ImgError(f"{filename}: Image creation needs a size parameter")
            create_raw(filename, size, preallocation=str(options.get("preallocation") or "off"))
        else:
            raise ImgError(f"Unknown file format '{fmt}'")
    except (BlockError, ConfigError) as exc:
        raise ImgError(f"{filename}: {exc}") from exc
    except OSError as exc:
        raise ImgError(f"{filename}: {os.strerror(exc.errno or 5)}") from exc


def _check_not_in_use(filename: str) -> None:
    """Refuse to overwrite an image somebody uses (another process, or this one: convert onto a source).

    Creation truncates the file, so like qemu-img we first need the image locks a writer takes; they are
    only tested here and released again, because the block layer's create functions take their own.
    """
    from pyemu.block.file import FileProtocol

    try:
        st = os.stat(filename)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        return
    probe = FileProtocol.open(filename, read_only=False, perm=BlockPerm.CONSISTENT_READ | BlockPerm.WRITE
                              | BlockPerm.RESIZE, shared=BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED)
    probe.close()


def actual_size(filename: str) -> int:
    """Bytes the file occupies on the host (st_blocks * 512), qemu-img's "disk size"; -1 if unknown."""
    try:
        return os.stat(filename).st_blocks * 512
    except OSError:
        return -1
