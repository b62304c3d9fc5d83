"""``pyemu-img commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] [-r rate] filename``.

Writes everything the image (and any image between it and ``base``) defines into ``base`` -- by default its
immediate backing file -- so the base then reads as the image did. The base grows first if it is smaller.
Afterwards the image is emptied (it then reads through to the updated base, as before), unless ``-d`` is
given or a deeper base was named with ``-b`` (the images in between are no longer valid then, so emptying
the top would not help; qemu-img documents the same).

The layers above the base are opened without their backing files and the base separately read-write: a
backing chain is opened read-only and refuses writers, so the base could not be written through it.
"""

from __future__ import annotations

import os

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.img.chain import layer_status
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import (as_qcow2, check_format, close_checked, close_quietly, create_image, header_of,
                              open_image, resolve_backing)
from pyemu.img.progress import Progress
from pyemu.system.buffers import io_buffer

SPEC = OptionSpec("b:df:hpqr:t:")

CHUNK = 1 << 20


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class Chain:
    """The layers above the base (top first), each opened without backing, and where the base is."""

    def __init__(self, top: BlockDriver, top_name: str, base_arg: str | None) -> None:
        self.layers: list[tuple[BlockDriver, str]] = [(top, top_name)]
        node, name = top, top_name
        while True:
            header = header_of(node)
            backing = getattr(header, "backing_file", None) if header is not None else None
            if not backing:
                if len(self.layers) == 1 and base_arg is None:
                    raise ImgError("Image does not have a backing file")
                raise ImgError(f"Did not find '{base_arg}' in the backing chain of '{top_name}'")
            path = resolve_backing(name, backing)
            fmt = getattr(header, "backing_format", None)
            if base_arg is None or _same_file(path, base_arg) or backing == base_arg:
                self.base_name, self.base_fmt = path, fmt
                return
            node = open_image(path, fmt=fmt, backing=False)
            self.layers.append((node, path))
            name = path

    def close_below_top(self) -> None:
        for node, _ in self.layers[1:]:
            close_quietly(node)


def commit_data(layers: list[BlockDriver], base: BlockDriver, size: int, progress: Progress) -> None:
    """Copy every range some layer defines into ``base`` (the highest layer wins)."""
    progress.start(size)
    pos = 0
    while pos < size:
        length = min(size - pos, CHUNK)
        for node in layers:
            if pos >= node.size():
                # Past the end of a shorter backing layer the image above reads zeros.
                base.write_zeroes(pos, length, may_unmap=True)
                break
            run, here, zero, data, _, _ = layer_status(node, pos, min(length, node.size() - pos))
            length = run
            if here:
                if zero and not data:
                    base.write_zeroes(pos, run, may_unmap=True)
                else:
                    buf = io_buffer(run)
                    node.preadv(pos, [buf])
                    base.pwritev(pos, [buf])
                break
        pos += length
        progress.set(pos)


def _open_base(name: str, fmt: str | None, size: int, cache: str | None) -> BlockDriver:
    """Open the base read-write, grown to ``size`` first if it is smaller."""
    base = open_image(name, fmt=fmt, writable=True, resize=True, cache=cache)
    if base.size() >= size:
        return base
    image = as_qcow2(base)
    if image is not None:
        try:
            image.truncate(size)
        except BaseException:
            close_quietly(base)
            raise
        return base
    close_checked(base, name)
    try:
        os.truncate(name, size)
    except OSError as exc:
        raise ImgError(f"Could not resize '{name}': {os.strerror(exc.errno or 5)}") from exc
    return open_image(name, fmt=fmt, writable=True, resize=True, cache=cache)


def make_empty(node: BlockDriver, filename: str) -> None:
    """Empty ``node`` so it reads entirely through its backing file, and close it.

    Uses the driver's ``make_empty`` when it has one; otherwise an image without internal snapshots is
    re-created with the same format parameters (what qemu-img does for such images as well).
    """
    make_empty_method = getattr(node, "make_empty", None)
    if make_empty_method is not None:
        try:
            make_empty_method()
        except BaseException:
            close_quietly(node)
            raise
        close_checked(node, filename)
        return
    image = as_qcow2(node)
    if image is None or image.snapshots():
        close_checked(node, filename)
        raise ImgError(f"Could not empty '{filename}': the image has internal snapshots (use -d to keep it)")
    h = image.header
    options: dict[str, object] = {
        "cluster_size": h.cluster_size, "compat": "0.10" if h.version == 2 else "1.1",
        "backing_file": h.backing_file, "backing_fmt": h.backing_format,
        "extended_l2": h.extended_l2, "lazy_refcounts": h.lazy_refcounts,
        "refcount_bits": h.refcount_bits,
    }
    size = node.size()
    close_checked(node, filename)
    create_image(filename, "qcow2", size, options=options)


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    filename = p.args[0]
    base_arg = p.last("-b")
    drop = p.has("-d") or base_arg is not None
    quiet = p.has("-q")
    progress = Progress(p.has("-p") and not quiet)
    cache = p.last("-t")
    top = open_image(filename, fmt=check_format(p.last("-f")), writable=not drop, backing=False, cache=cache)
    chain: Chain | None = None
    try:
        chain = Chain(top, filename, base_arg)
        size = top.size()
        base = _open_base(chain.base_name, chain.base_fmt, size, cache)
        try:
            commit_data([node for node, _ in chain.layers], base, size, progress)
            base.flush()
        except BlockError as exc:
            close_quietly(base)
            raise ImgError(f"Block job failed: {exc}") from exc
        except BaseException:
            close_quietly(base)
            raise
        close_checked(base, chain.base_name)
    except BaseException:
        if chain is not None:
            chain.close_below_top()
        close_quietly(top)
        raise
    chain.close_below_top()
    progress.end()
    if drop:
        close_checked(top, filename)
    else:
        make_empty(top, filename)
    if not quiet:
        print("Image committed.")
    return 0
