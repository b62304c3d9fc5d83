"""``pyemu-img rebase [-f fmt] [-t cache] [-T src_cache] [-p] [-q] [-U] [-u] -b backing [-F backing_fmt]
filename``.

Safe mode (default): every range the image does not define itself is read through the old backing chain
and through the new backing file; wherever the two differ the old contents are written into the image, so
the guest sees the same disk afterwards, and only then is the header switched to the new backing file.
``-b ""`` detaches the image from any backing file (all backing data is copied in first). ``-u`` (unsafe)
only rewrites the header, for renamed or moved backing files. The new backing file name is stored as given
and, when relative, is resolved against the image's directory, as qemu-img does.
"""

from __future__ import annotations

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.img.chain import status
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import (as_qcow2, backing_of, check_format, close_checked, close_quietly, open_image,
                              resolve_backing)
from pyemu.img.progress import Progress
from pyemu.system.buffers import BytesLike, io_buffer, same_bytes

SPEC = OptionSpec("F:T:Ub:f:hpqt:u", ("force-share",))

CHUNK = 1 << 20
SECTOR = 512


def read_or_zero(node: BlockDriver | None, offset: int, length: int) -> memoryview:
    """``length`` bytes at ``offset`` of ``node``; zeros for no node and past its end."""
    buf = io_buffer(length)
    if node is not None and offset < node.size():
        n = min(length, node.size() - offset)
        node.preadv(offset, [buf[:n]])
    return buf


def known_zero(node: BlockDriver | None, offset: int, length: int) -> int:
    """Bytes from ``offset`` (at most ``length``) that ``node`` is known to read as zeros without reading."""
    if node is None or offset >= node.size():
        return length
    ext = status(node, offset, min(length, node.size() - offset))
    return ext.length if ext.zero and not ext.data else 0


def differing_runs(a: BytesLike, b: BytesLike) -> list[tuple[int, int]]:
    """``(start, length)`` of the 512-byte sectors where ``a`` and ``b`` differ, merged."""
    runs: list[tuple[int, int]] = []
    if same_bytes(a, b):
        return runs
    view_a, view_b = memoryview(a), memoryview(b)
    n = len(a)
    pos = 0
    while pos < n:
        end = min(n, pos + SECTOR)
        if not same_bytes(view_a[pos:end], view_b[pos:end]):
            if runs and runs[-1][0] + runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((pos, end - pos))
        pos = end
    return runs


def copy_differences(image: BlockDriver, old: BlockDriver | None, new: BlockDriver | None,
                     progress: Progress) -> None:
    """Write into ``image`` whatever its old backing provides and the new one would provide differently."""
    size = image.size()
    progress.start(size)
    pos = 0
    while pos < size:
        ext = status(image, pos, min(size - pos, CHUNK), depth_limit=0)
        length = ext.length
        if not ext.present:
            _rebase_range(image, old, new, pos, length)
        pos += length
        progress.set(pos)


def _rebase_range(image: BlockDriver, old: BlockDriver | None, new: BlockDriver | None, start: int,
                  length: int) -> None:
    pos, end = start, start + length
    while pos < end:
        n = min(end - pos, CHUNK)
        zero_old = known_zero(old, pos, n)
        zero_new = known_zero(new, pos, n)
        both = min(zero_old, zero_new)
        if both:
            pos += both
            continue
        data_old = read_or_zero(old, pos, n)
        data_new = read_or_zero(new, pos, n)
        for run_start, run_len in differing_runs(data_old, data_new):
            image.pwritev(pos + run_start, [memoryview(data_old)[run_start:run_start + run_len]])
        pos += n


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    unsafe = p.has("-u")
    backing = p.last("-b")
    backing_fmt = check_format(p.last("-F"))
    if backing is None and not unsafe:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    filename = p.args[0]
    if p.has("-U"):
        raise ImgError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    quiet = p.has("-q")
    if backing == "":
        backing = None
    if backing is not None and backing_fmt is None:
        raise ImgError(f"Could not change the backing file to '{backing}': backing format must be specified")
    progress = Progress(p.has("-p") and not quiet)
    image = open_image(filename, fmt=check_format(p.last("-f")), writable=True, backing=not unsafe,
                       cache=p.last("-t"))
    new: BlockDriver | None = None
    try:
        qcow2 = as_qcow2(image)
        if qcow2 is None:
            raise ImgError(f"Could not change the backing file to '{backing or ''}': Operation not supported")
        if not unsafe:
            if backing is not None:
                path = resolve_backing(filename, backing)
                try:
                    new = open_image(path, fmt=backing_fmt, cache=p.last("-T"))
                except ImgError as exc:
                    raise ImgError(f"Could not open new backing file '{path}': {exc.__cause__ or exc}") from exc
            copy_differences(image, backing_of(image), new, progress)
        try:
            image.flush()
            qcow2.set_backing(backing, backing_fmt if backing else None)
        except BlockError as exc:
            raise ImgError(f"Could not change the backing file to '{backing or ''}': {exc}") from exc
    except BaseException:
        close_quietly(new)
        close_quietly(image)
        raise
    close_quietly(new)
    close_checked(image, filename)
    progress.end()
    return 0
