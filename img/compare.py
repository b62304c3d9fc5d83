"""``pyemu-img compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2``.

Compares what a guest would read from the two images (through their backing chains). Exit status 0
"Images are identical.", 1 "Content mismatch at offset N!" (N is the first differing 512-byte sector, as
qemu-img reports it), 2 on errors. Images of different sizes are identical when the longer one's tail reads
as zeros, unless ``-s`` (strict) is given; strict mode also requires the same allocation status at every
offset ("Strict mode: Offset N block status mismatch!").
"""

from __future__ import annotations

import contextlib

from pyemu.block.driver import BlockDriver
from pyemu.img.chain import Extent, status
from pyemu.img.errors import UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import check_format, opened
from pyemu.img.progress import Progress
from pyemu.system.buffers import BytesLike, io_buffer, same_bytes

SPEC = OptionSpec("F:T:Uf:hpqs", ("force-share",))

SECTOR = 512
CHUNK = 1 << 20
EXIT_IDENTICAL = 0
EXIT_DIFFERENT = 1


class _Done(Exception):
    """Stops the walk with an exit status; the message was already printed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def read(node: BlockDriver, offset: int, length: int) -> memoryview:
    buf = io_buffer(length)
    node.preadv(offset, [buf])
    return buf


def first_difference(a: BytesLike, b: BytesLike) -> int | None:
    """Index of the first differing byte, or None; compares in big slices first (fast path)."""
    if same_bytes(a, b):
        return None
    step = 4096
    for pos in range(0, len(a), step):
        if not same_bytes(a[pos:pos + step], b[pos:pos + step]):
            for i in range(pos, min(pos + step, len(a))):
                if a[i] != b[i]:
                    return i
    return None


def first_nonzero(buf: BytesLike) -> int | None:
    stripped = len(buf) - len(bytes(buf).lstrip(b"\0"))
    return None if stripped == len(buf) else stripped


def strict_key(ext: Extent, size: int) -> tuple[bool, bool, bool, bool, bool]:
    """What qemu-img's strict mode compares: allocation, zero, data, offset known, extent reaches EOF."""
    return ext.present, ext.zero, ext.data, ext.offset is not None, ext.end >= size


class Comparison:
    def __init__(self, a: BlockDriver, b: BlockDriver, *, strict: bool, quiet: bool, progress: Progress) -> None:
        self.a, self.b = a, b
        self.strict = strict
        self.quiet = quiet
        self.progress = progress

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def mismatch(self, offset: int) -> None:
        self.say(f"Content mismatch at offset {offset // SECTOR * SECTOR}!")
        raise _Done(EXIT_DIFFERENT)

    def run(self) -> int:
        size_a, size_b = self.a.size(), self.b.size()
        common = min(size_a, size_b)
        total = max(size_a, size_b)
        self.progress.start(total)
        if size_a != size_b and self.strict:
            self.say("Strict mode: Image size mismatch!")
            return EXIT_DIFFERENT
        try:
            self._common(common)
            if size_a != size_b:
                self.say("Warning: Image size mismatch!")
                self._tail(self.a if size_a > size_b else self.b, common, total)
        except _Done as done:
            return done.status
        self.progress.set(total)
        self.say("Images are identical.")
        return EXIT_IDENTICAL

    def _common(self, size: int) -> None:
        pos = 0
        while pos < size:
            ea = status(self.a, pos, min(size - pos, CHUNK))
            eb = status(self.b, pos, min(size - pos, CHUNK))
            if self.strict and strict_key(ea, self.a.size()) != strict_key(eb, self.b.size()):
                self.say(f"Strict mode: Offset {pos} block status mismatch!")
                raise _Done(EXIT_DIFFERENT)
            run = min(ea.length, eb.length)
            if not (ea.zero and not ea.data and eb.zero and not eb.data):
                diff = first_difference(read(self.a, pos, run), read(self.b, pos, run))
                if diff is not None:
                    self.mismatch(pos + diff)
            pos += run
            self.progress.set(pos)

    def _tail(self, node: BlockDriver, start: int, end: int) -> None:
        pos = start
        while pos < end:
            ext = status(node, pos, min(end - pos, CHUNK))
            if not (ext.zero and not ext.data):
                nonzero = first_nonzero(read(node, pos, ext.length))
                if nonzero is not None:
                    self.mismatch(pos + nonzero)
            pos += ext.length
            self.progress.set(pos)


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    if len(p.args) != 2:
        raise UsageError("Expecting two image file names")
    fmt1, fmt2 = check_format(p.last("-f")), check_format(p.last("-F"))
    quiet = p.has("-q")
    progress = Progress(p.has("-p") and not quiet)
    share = p.has("-U", "--force-share")
    cache = p.last("-T")
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(opened(p.args[0], fmt=fmt1, force_share=share, cache=cache))
        b = stack.enter_context(opened(p.args[1], fmt=fmt2, force_share=share, cache=cache))
        result = Comparison(a, b, strict=p.has("-s"), quiet=quiet, progress=progress).run()
    progress.end()
    return result
