"""``pyemu-img convert [-f fmt] [-O fmt] [-c] [-p] [-q] [-n] [-S size] [-B backing [-F fmt]] [-o opts] [-W]
[-m N] [-t cache] [-T cache] [-U] [--target-is-zero] src... dst``.

Copies the guest-visible contents of one or more sources (concatenated) into a new (or, with ``-n``, an
existing) image. Holes stay holes: the sources' allocation status is followed through their backing chains
so unallocated and zero ranges are never read, and inside data ranges every aligned block of ``-S`` bytes
(default 4 KiB) that is all zeros is skipped as well; ``-S 0`` copies every byte, fully allocating the
target. A fresh target reads as zeros, so skipped ranges need no write; an existing one (``-n``) gets
explicit write-zeroes unless ``--target-is-zero``. ``-c`` stores each cluster compressed (qcow2).
``-B`` gives the target a backing file and copies only what differs from it. ``-W`` lets ``-m`` worker
threads write out of order; without it the copy is sequential.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from typing import Iterator

from pyemu.block.driver import BlockDriver
from pyemu.block.hostio import ZEROS
from pyemu.img.chain import status
from pyemu.img.createopts import CREATE_OPTIONS, OptionSet, help_text, wants_help
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import (as_qcow2, backing_of, check_format, close_checked, close_quietly, create_image, header_of,
                              open_image, resolve_backing)
from pyemu.img.progress import Progress
from pyemu.img.sizes import SizeRangeError, SizeSyntaxError, parse_size

SPEC = OptionSpec("B:CF:O:S:T:Ucf:l:m:no:pqr:t:W", ("force-share", "target-is-zero"))

DEFAULT_SPARSE = 4096
MAX_SPARSE = 16 << 20
UNIT = 2 << 20  # bytes per work unit (a multiple of every cluster size)
SPARSE_ERROR = ("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                "16777216. Select 0 to disable sparse detection (fully allocates output).")


@dataclass(frozen=True)
class Source:
    node: BlockDriver
    base: int  # where this source starts in the target
    size: int
    backing_path: str | None  # realpath of the source's backing file, for -B shortcuts


@dataclass
class Settings:
    sparse: int
    compress: bool
    target_zero: bool  # the target reads as zeros wherever nothing is written
    cluster: int
    same_backing: bool  # -B names the sources' own backing file: unallocated source ranges need no copy


class Sources:
    """The concatenated sources as one address space."""

    def __init__(self, nodes: list[BlockDriver]) -> None:
        self.items: list[Source] = []
        base = 0
        for node in nodes:
            below = backing_of(node)
            path = os.path.realpath(below.filename) if below is not None else None
            self.items.append(Source(node, base, node.size(), path))
            base += node.size()
        self.size = base

    def pieces(self, start: int, end: int) -> Iterator[tuple[Source, int, int]]:
        """``(source, source_offset, length)`` covering target range ``[start, end)``."""
        for src in self.items:
            lo, hi = max(start, src.base), min(end, src.base + src.size)
            if lo < hi:
                yield src, lo - src.base, hi - lo


def _zeros_like(length: int) -> memoryview:
    """A read-only zero buffer of ``length`` bytes (shared up to 1 MiB)."""
    return ZEROS[:length] if length <= ZEROS.nbytes else memoryview(bytes(length))


@functools.lru_cache(maxsize=4)
def _zero_block(block: int) -> bytes:
    return bytes(block)


def _zero(buf: memoryview) -> bool:
    return buf == _zeros_like(len(buf))


class Copier:
    def __init__(self, sources: Sources, target: BlockDriver, settings: Settings, progress: Progress) -> None:
        self.sources = sources
        self.target = target
        self.s = settings
        self.reference = backing_of(target)  # -B: what the target reads where nothing is written
        self.compressor = as_qcow2(target) if settings.compress else None
        self.progress = progress
        self._local = threading.local()

    # -- planning ----------------------------------------------------------------------------------------

    def segments(self, start: int, end: int) -> list[tuple[int, int, str]]:
        """``(target_offset, length, kind)`` with kind "zero", "data" or "skip" (same as -B backing)."""
        out: list[tuple[int, int, str]] = []
        for src, offset, length in self.sources.pieces(start, end):
            pos, stop = offset, offset + length
            while pos < stop:
                ext = status(src.node, pos, stop - pos)
                if self.s.same_backing and ext.depth > 0 and src.backing_path is not None:
                    kind = "skip"
                elif ext.zero and not ext.data:
                    kind = "zero"
                else:
                    kind = "data"
                out.append((src.base + pos, ext.length, kind))
                pos += ext.length
        return out

    def read(self, start: int, length: int) -> bytearray:
        """The sources' bytes for ``[start, start+length)`` in a buffer reused by this thread (every byte of
        it is overwritten by the reads, so it need not be cleared)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) != length:
            buf = bytearray(length)
            self._local.buf = buf
        view = memoryview(buf)
        for src, offset, size in self.sources.pieces(start, start + length):
            at = src.base + offset - start
            src.node.preadv(offset, [view[at:at + size]])
        return buf

    # -- one unit ----------------------------------------------------------------------------------------

    def unit(self, start: int, end: int) -> None:
        segments = self.segments(start, end)
        if self.s.compress:
            self._compressed(start, end, segments)
        else:
            for offset, length, kind in segments:
                if kind == "zero" and self.s.sparse:
                    self._zeros(offset, length)
                elif kind != "skip":
                    self._data(offset, length)
        self.progress.advance(end - start)

    def _zeros(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros in the target."""
        if self.s.target_zero:
            return
        if self.reference is not None:
            ref = self._reference(offset, length)
            for run_start, run_len, is_zero in _runs(ref, self.s.sparse or DEFAULT_SPARSE, offset):
                if not is_zero:
                    self.target.write_zeroes(offset + run_start, run_len, may_unmap=True)
            return
        self.target.write_zeroes(offset, length, may_unmap=True)

    def _data(self, offset: int, length: int) -> None:
        data = self.read(offset, length)
        view = memoryview(data)
        if not self.s.sparse:
            self.target.pwritev(offset, [view])
            return
        ref = memoryview(self._reference(offset, length)) if self.reference is not None else None
        for run_start, run_len, is_zero in _runs(data, self.s.sparse, offset):
            part = view[run_start:run_start + run_len]
            if ref is not None:
                if part == ref[run_start:run_start + run_len]:
                    continue
                if is_zero:
                    self.target.write_zeroes(offset + run_start, run_len, may_unmap=True)
                else:
                    self.target.pwritev(offset + run_start, [part])
            elif is_zero:
                self._zeros(offset + run_start, run_len)
            else:
                self.target.pwritev(offset + run_start, [part])

    def _reference(self, offset: int, length: int) -> bytearray:
        assert self.reference is not None
        buf = bytearray(length)
        size = self.reference.size()
        if offset < size:
            n = min(length, size - offset)
            self.reference.preadv(offset, [memoryview(buf)[:n]])
        return buf

    def _compressed(self, start: int, end: int, segments: list[tuple[int, int, str]]) -> None:
        cs = self.s.cluster
        if all(kind != "data" for _, _, kind in segments):
            for offset, length, kind in segments:
                if kind == "zero":
                    self._zeros(offset, length)
            return
        data = memoryview(self.read(start, end - start))
        ref = memoryview(self._reference(start, end - start)) if self.reference is not None else None
        for pos in range(start, end, cs):
            n = min(cs, end - pos)
            chunk = data[pos - start:pos - start + n]
            if ref is not None and chunk == ref[pos - start:pos - start + n]:
                continue
            if _zero(chunk):
                self._zeros(pos, n)
                continue
            assert self.compressor is not None
            self.compressor.write_compressed(pos, chunk)

    # -- the whole copy ------------------------------------------------------------------------------------

    def units(self) -> list[tuple[int, int]]:
        size = self.sources.size
        step = max(UNIT, self.s.cluster)
        return [(pos, min(pos + step, size)) for pos in range(0, size, step)]

    def run(self, *, workers: int, out_of_order: bool) -> None:
        self.progress.start(self.sources.size)
        units = self.units()
        if out_of_order and workers > 1:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                       thread_name_prefix="pyemu-img-convert") as pool:
                futures = [pool.submit(self.unit, a, b) for a, b in units]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
        else:
            for a, b in units:
                self.unit(a, b)
        self.progress.set(self.sources.size)


def _runs(data: bytes | bytearray, block: int, base: int) -> Iterator[tuple[int, int, bool]]:
    """Split ``data`` (target offset ``base``) into runs of all-zero and other ``block``-aligned blocks."""
    n = len(data)
    if not n:
        return
    view = memoryview(data)
    # Fast paths in C: all zeros (one comparison), or data without ``block`` zero bytes in a row anywhere
    # (then no aligned block can be zero). Only mixed buffers are walked block by block.
    if view == _zeros_like(n):
        yield 0, n, True
        return
    if n >= block and data.find(_zero_block(block)) < 0:
        yield 0, n, False
        return
    pos = 0
    current: tuple[int, bool] | None = None
    while pos < n:
        stop = min(n, (base + pos) // block * block + block - base)
        is_zero = _zero(view[pos:stop])
        if current is None:
            current = (pos, is_zero)
        elif current[1] != is_zero:
            yield current[0], pos - current[0], current[1]
            current = (pos, is_zero)
        pos = stop
    if current is not None:
        yield current[0], n - current[0], current[1]


def _sparse_arg(text: str | None) -> int:
    if text is None:
        return DEFAULT_SPARSE
    try:
        value = parse_size(text)
    except (SizeSyntaxError, SizeRangeError):
        raise ImgError(SPARSE_ERROR) from None
    if value % 512 or value > MAX_SPARSE:
        raise ImgError(SPARSE_ERROR)
    return value


def _workers_arg(text: str | None) -> int:
    if text is None:
        return 8
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 16:
        raise ImgError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    return value


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    out_fmt = check_format(p.last("-O", default="raw"))
    assert out_fmt is not None
    src_fmt = check_format(p.last("-f"))
    option_strings = p.all("-o")
    if wants_help(option_strings):
        print(help_text(out_fmt, CREATE_OPTIONS[out_fmt]))
        return 0
    if len(p.args) < 2:
        raise UsageError("Must specify image file name")
    if p.has("-l"):
        raise ImgError("Internal snapshots cannot be read by convert yet (-l is not supported)")
    *src_names, out_name = p.args
    sparse = _sparse_arg(p.last("-S"))
    workers = _workers_arg(p.last("-m"))
    skip_create = p.has("-n")
    compress = p.has("-c")
    quiet = p.has("-q")
    if skip_create and option_strings:
        raise ImgError("-o has no effect when skipping image creation")
    if p.has("--target-is-zero") and not skip_create:
        raise ImgError("--target-is-zero requires use of -n flag")
    if compress and out_fmt != "qcow2":
        raise ImgError("Compression not supported for this file format")
    options = OptionSet(CREATE_OPTIONS[out_fmt], option_strings)
    backing = p.last("-B")
    backing_fmt = p.last("-F")
    if backing is not None or "backing_file" in options:
        if out_fmt == "raw":
            raise ImgError(f"Backing file not supported for file format '{out_fmt}'")
        if backing is not None:
            options.set("backing_file", backing)
        if backing_fmt is not None:
            options.set("backing_fmt", backing_fmt)
        if "backing_fmt" not in options:
            raise ImgError("Use of backing file requires explicit backing format")
        check_format(str(options.get("backing_fmt")))
    progress = Progress(p.has("-p") and not quiet)

    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(_closing(open_image(name, fmt=src_fmt, force_share=p.has("-U", "--force-share"),
                                                         cache=p.last("-T"))))
                 for name in src_names]
        sources = Sources(nodes)
        if not skip_create:
            values = dict(options.values)
            values.pop("size", None)
            values.pop("compression_type", None)
            size = -(-sources.size // 512) * 512 if out_fmt == "qcow2" else sources.size
            create_image(out_name, out_fmt, size, options=values)
        target = open_image(out_name, fmt=out_fmt, writable=True, cache=p.last("-t") or "unsafe",
                            backing="backing_file" in options or skip_create)
        try:
            if target.size() < sources.size:
                raise ImgError("output file is smaller than input file")
            header = header_of(target)
            if compress and as_qcow2(target) is None:
                raise ImgError("Compression not supported for this file format")
            settings = Settings(
                sparse=sparse, compress=compress,
                target_zero=(not skip_create or p.has("--target-is-zero")) and backing_of(target) is None,
                cluster=getattr(header, "cluster_size", 65536) if header is not None else 65536,
                same_backing=_same_backing(out_name, options, sources))
            Copier(sources, target, settings, progress).run(workers=workers, out_of_order=p.has("-W"))
        except BaseException:
            close_quietly(target)
            raise
        close_checked(target, out_name)
    progress.end()
    return 0


def _same_backing(out_name: str, options: OptionSet, sources: Sources) -> bool:
    """True when the target's backing file is every source's own backing file."""
    backing = options.get("backing_file")
    if not backing:
        return False
    path = os.path.realpath(resolve_backing(out_name, str(backing)))
    return all(src.backing_path == path for src in sources.items)


@contextlib.contextmanager
def _closing(node: BlockDriver) -> Iterator[BlockDriver]:
    try:
        yield node
    finally:
        close_quietly(node)
