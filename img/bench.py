"""``pyemu-img bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-i aio] [-n] [--no-drain]
[-o offset] [--pattern=byte] [-q] [-s buffer_size] [-S step] [-t cache] [-w] [-U] filename``.

Issues ``count`` reads (or writes, ``-w``) of ``buffer_size`` bytes through the block layer, starting at
``offset`` and advancing by ``step`` (default: the buffer size) modulo the image size, and reports the wall
time as qemu-img does. With ``--flush-interval`` a flush follows every N writes, after the writes in flight
have completed unless ``--no-drain``.

``depth`` requests are in flight at once with ``-t none``/``directsync`` (O_DIRECT: one thread per slot,
each waiting on the device). Through the host page cache a request is CPU work, most of it Python that
holds the GIL, so a second thread can only take turns with the first and pays a thread switch every time:
buffered requests are issued one after another from a single thread whatever the depth (on 2 CPUs, 4 KiB
qcow2 reads at depth 16 took 1.0-1.3 s per 100 000 from one thread, 1.5-1.9 s from two, 1.7-2.7 s from
sixteen; writes 1.25-1.36 s from one, 2.1-2.6 s from two).
The line printed still names ``depth``, as qemu-img's does.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.img.errors import ImgError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import check_cache, check_format, close_checked, close_quietly, open_image
from pyemu.img.sizes import SizeRangeError, SizeSyntaxError, SUFFIX_HINT, parse_size

SPEC = OptionSpec("Uc:d:f:hi:no:qs:S:t:w", ("flush-interval=", "no-drain", "pattern=", "force-share"))

AIO_MODES = ("threads", "native", "io_uring")


def _int(text: str, message: str, *, minimum: int = 0) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ImgError(message) from None
    if value < minimum:
        raise ImgError(message)
    return value


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except (SizeSyntaxError, SizeRangeError):
        raise ImgError(f"Invalid {what} specified. {SUFFIX_HINT}") from None


def bench_threads(depth: int, direct: bool) -> int:
    """Threads that issue the requests: ``depth`` for O_DIRECT, else one (module docstring)."""
    return depth if direct else 1


class Bench:
    def __init__(self, node: BlockDriver, *, count: int, depth: int, offset: int, bufsize: int, step: int,
                 write: bool, pattern: int, flush_interval: int, drain: bool, threads: int | None = None) -> None:
        self.node = node
        self.count = count
        self.depth = depth
        self.threads = depth if threads is None else threads
        self.offset = offset
        self.bufsize = bufsize
        self.step = step
        self.write = write
        self.pattern = bytes([pattern]) * bufsize
        self.flush_interval = flush_interval
        self.drain = drain
        self.size = node.size()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def offset_of(self, index: int) -> int:
        if self.size == 0:
            return self.offset
        return (self.offset + index * self.step) % self.size if index else self.offset

    def _request(self, buf: memoryview) -> Callable[[int], None]:
        """The request one worker repeats at each offset: a write of the pattern, or a read into ``buf``
        (decided once, not per request: at ~100 k requests/s the loop's own Python counts)."""
        if self.write:
            pattern, pwritev = [self.pattern], self.node.pwritev
            return lambda offset: pwritev(offset, pattern)
        views, preadv = [buf], self.node.preadv
        return lambda offset: preadv(offset, views)

    def _batch(self, first: int, end: int) -> None:
        """Requests ``[first, end)`` on ``threads`` threads, each taking the next request when it is done (a
        single thread takes them all at once: there is nobody to share them with)."""
        cursor = [first]
        claim = 1 if self.threads > 1 else end - first
        flush_every = 0 if self.drain else self.flush_interval

        def worker() -> None:
            request = self._request(memoryview(bytearray(self.bufsize)))
            while True:
                with self._lock:
                    if self.error is not None or cursor[0] >= end:
                        return
                    start = cursor[0]
                    cursor[0] = min(end, start + claim)
                try:
                    for index in range(start, min(end, start + claim)):
                        request(self.offset_of(index))
                        if flush_every and (index + 1) % flush_every == 0:
                            self.node.flush()
                except BaseException as exc:  # reported once by the caller
                    with self._lock:
                        if self.error is None:
                            self.error = exc
                    return

        threads = [threading.Thread(target=worker, name=f"pyemu-img-bench-{i}", daemon=True)
                   for i in range(min(self.threads, end - first))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.error is not None:
            raise self.error

    def run(self) -> float:
        start = time.monotonic()
        if self.flush_interval and self.drain:
            for first in range(0, self.count, self.flush_interval):
                end = min(self.count, first + self.flush_interval)
                self._batch(first, end)
                if end - first == self.flush_interval:
                    self.node.flush()
        elif self.count:
            self._batch(0, self.count)
        return time.monotonic() - start


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    count = _int(p.value("-c", default="75000"), "Invalid request count specified")
    depth = _int(p.value("-d", default="64"), "Invalid queue depth specified", minimum=1)
    offset = _size(p.value("-o", default="0"), "offset")
    bufsize = _size(p.value("-s", default="4096"), "buffer size")
    step_text = p.last("-S")
    step = bufsize if step_text is None else _size(step_text, "step_size")
    write = p.has("-w")
    pattern_text = p.last("--pattern")
    pattern = 0
    if pattern_text is not None:
        pattern = _int(pattern_text, "Invalid pattern byte specified")
        if pattern > 0xFF:
            raise ImgError("Invalid pattern byte specified")
    flush_text = p.last("--flush-interval")
    flush_interval = 0 if flush_text is None else _int(flush_text, "Invalid flush interval specified")
    aio = p.last("-i")
    if aio is not None and aio not in AIO_MODES:
        raise ImgError(f"Invalid aio option: {aio}")
    if flush_interval and not write:
        raise ImgError("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise ImgError("Flush interval can't be smaller than depth")
    if len(p.args) != 1:
        raise ImgError("Expecting one image file name")
    filename = p.args[0]
    if (p.has("-n") or aio == "native") and p.last("-t") not in ("none", "off", "directsync"):
        raise ImgError(f"Could not open '{filename}': aio=native was specified, but it requires cache.direct=on, "
                       "which was not specified.")
    node = open_image(filename, fmt=check_format(p.last("-f")), writable=write,
                      force_share=p.has("-U", "--force-share"), cache=p.last("-t"))
    try:
        # qemu-img prints these even with -q.
        print(f"Sending {count} {'write' if write else 'read'} requests, {bufsize} bytes each, {depth} in "
              f"parallel (starting at offset {offset}, step size {step})", flush=True)
        if flush_interval:
            print(f"Sending flush every {flush_interval} requests", flush=True)
        bench = Bench(node, count=count, depth=depth, offset=offset, bufsize=bufsize, step=step, write=write,
                      pattern=pattern, flush_interval=flush_interval, drain=not p.has("--no-drain"),
                      threads=bench_threads(depth, check_cache(p.last("-t"))))
        try:
            elapsed = bench.run()
        except BlockError as exc:
            raise ImgError(f"Failed request: {exc}") from exc
    except BaseException:
        close_quietly(node)
        raise
    close_checked(node, filename)
    print(f"Run completed in {elapsed:3.3f} seconds.")
    return 0
