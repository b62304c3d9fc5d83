"""``convert``'s pipeline: units are read ahead on worker threads and written in order by the calling thread.

Whatever the number of workers (``-m``) and with ``-W``, the output reads the same as the source, has the
same allocation map, and (in order) is the very same file byte for byte; a failing read or write in the
middle of the pipeline ends the command with qemu-img's single error line and exit status 1 -- no
traceback, no hang, no thread left running.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from img_marks import needs_qemu_img  # type: ignore[import-not-found]
from pyemu.block.errors import BlockIOError
from pyemu.block.file import FileProtocol
from pyemu.block.image import open_image
from pyemu.img.bench import bench_threads
from pyemu.img.convert import UNIT, reader_threads
from pyemu.img.workers import OrderedPool

pytestmark = needs_qemu_img

MiB = 1 << 20
SIZE = 24 * MiB  # 12 units of 2 MiB: more than the default 8 workers keep in flight


@pytest.fixture
def mixed(qimg, qio, workdir: Path) -> Path:  # type: ignore[no-untyped-def]
    """A raw file mixing, across unit boundaries, data, explicit zeros (whole and partial 4 KiB blocks, -S
    finds them), holes and data that ends mid-block; and a qcow2 with data, zero clusters, unallocated
    clusters and compressed clusters."""
    with open("mixed.raw", "wb") as f:
        f.truncate(SIZE)
        for index, offset in enumerate(range(0, SIZE, 3 * MiB)):
            f.seek(offset)
            f.write(bytes([index + 1]) * (MiB + 4096 * index + 100))  # ends mid-block
            f.write(bytes(64 * 1024))                                # written zeros: allocated, read as zeros
            f.write(b"\x7f" * 4096)
        f.seek(UNIT - 2048)
        f.write(b"\x55" * 4096)  # straddles the first unit boundary
    qimg("create", "-q", "-f", "qcow2", "mixed.q", str(SIZE))
    qio("mixed.q", "write -P 0xab 0 3M", "write -z 4M 2M", "write -c -P 7 7M 64k", "write -P 9 9M 100k",
        "write -z 9M 4k", "write -P 3 20M 4M")
    return workdir


def _map(qimg, name: str) -> str:  # type: ignore[no-untyped-def]
    result = qimg("map", "--output=json", name)
    assert result.rc == 0, result.err
    return result.out


@pytest.mark.parametrize("source", ["mixed.raw", "mixed.q"])
@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_workers_give_identical_output(pimg, qimg, mixed: Path, source: str, out_fmt: str) -> None:  # type: ignore[no-untyped-def]
    reference = f"m1.{out_fmt}"
    assert pimg("convert", "-m", "1", "-O", out_fmt, source, reference).rc == 0
    assert qimg("compare", reference, source).rc == 0
    for args in (["-m", "2"], ["-m", "8"], ["-m", "16"], ["-m", "8", "-W"], ["-m", "3", "-S", "0"]):
        out = f"out.{out_fmt}"
        Path(out).unlink(missing_ok=True)
        result = pimg("convert", *args, "-O", out_fmt, source, out)
        assert result.rc == 0, (args, result.err)
        assert qimg("compare", out, source).rc == 0, args
        if out_fmt == "qcow2":
            assert qimg("check", out).rc == 0, args
        if "-S" in args:
            continue  # fully allocated: a different map on purpose
        assert _map(qimg, out) == _map(qimg, reference) or "-W" in args and out_fmt == "qcow2", args
        if "-W" not in args:
            # Writes in order: the same requests in the same order, so the same file.
            assert Path(out).read_bytes() == Path(reference).read_bytes(), args


@pytest.fixture
def failing_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, int], None]:
    """``failing_reads("src.raw", offset)``: reads of that file that reach ``offset`` fail with EIO, as a
    dying disk's would (a host error, raised from the OSError as the file protocol raises it)."""

    def install(name: str, offset: int) -> None:
        real = FileProtocol.preadv

        def preadv(self: FileProtocol, pos: int, buffers: Any) -> None:
            length = sum(memoryview(b).nbytes for b in buffers)
            if os.path.basename(self.filename) == name and pos + length > offset:
                host = OSError(errno.EIO, os.strerror(errno.EIO))
                raise BlockIOError.from_os_error("read", self.filename, host, offset=pos, length=length) from host
            real(self, pos, buffers)

        monkeypatch.setattr(FileProtocol, "preadv", preadv)

    return install


def _run_with_deadline(pimg, *args: str) -> Any:  # type: ignore[no-untyped-def]
    """pimg(*args) on a thread: a hang fails the test instead of stalling the run."""
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(pimg(*args)), daemon=True)
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), f"convert {args} did not finish"
    return outcome[0]


def _convert_threads() -> Iterator[threading.Thread]:
    return (t for t in threading.enumerate() if t.name.startswith("pyemu-img-convert"))


@pytest.mark.parametrize("workers", [["-m", "1"], ["-m", "8"], ["-m", "8", "-W"]])
def test_read_error_mid_pipeline(pimg, qimg, mixed: Path, failing_reads, error_line,  # type: ignore[no-untyped-def]
                                 workers: list[str]) -> None:
    bad = 6 * MiB  # a unit start, where qemu-img's 2 MiB requests start too
    with open("bd.conf", "w") as f:
        f.write(f'[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "{bad // 512}"\nonce = "off"\n')
    q = qimg("convert", "-f", "raw", "-O", "qcow2", "blkdebug:bd.conf:mixed.raw", "q.q")
    failing_reads("mixed.raw", bad)
    p = _run_with_deadline(pimg, "convert", *workers, "-f", "raw", "-O", "qcow2", "mixed.raw", "p.q")
    assert p.rc == q.rc == 1
    assert q.err.strip() == "qemu-img: error while reading at byte 6291456: Input/output error"
    found = re.fullmatch(r"error while reading at byte (\d+): Input/output error", error_line(p))
    assert found is not None, p.err
    if "-W" in workers:  # out of order: whichever failing unit the workers met first
        assert int(found.group(1)) >= bad and int(found.group(1)) % UNIT == 0
    else:  # in order: the first failing unit, as qemu-img, and every unit before it is in the output
        assert int(found.group(1)) == bad
        written = open_image("p.q", read_only=True)
        try:
            got = bytearray(bad)
            written.preadv(0, [memoryview(got)])
        finally:
            written.close()
        with open("mixed.raw", "rb") as f:
            assert got == f.read(bad)
    assert not list(_convert_threads())
    assert qimg("check", "p.q").rc == 0  # what was written before the error is a valid image


def test_write_error_mid_pipeline(pimg, mixed: Path, monkeypatch: pytest.MonkeyPatch, error_line) -> None:  # type: ignore[no-untyped-def]
    real = FileProtocol.pwritev

    def pwritev(self: FileProtocol, pos: int, buffers: Any) -> None:
        if os.path.basename(self.filename) == "p.raw" and pos >= 9 * MiB:
            host = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise BlockIOError.from_os_error("write", self.filename, host, offset=pos) from host
        real(self, pos, buffers)

    monkeypatch.setattr(FileProtocol, "pwritev", pwritev)
    p = _run_with_deadline(pimg, "convert", "-O", "raw", "mixed.raw", "p.raw")
    assert p.rc == 1
    assert error_line(p) == f"error while writing at byte {9 * MiB}: No space left on device"
    assert not list(_convert_threads())


def test_thread_counts_follow_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-order convert reads ahead on at most the CPUs left beside the writer; bench issues buffered
    requests from one thread, O_DIRECT ones from one thread per slot."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert [reader_threads(m) for m in (1, 2, 8, 16)] == [1, 1, 1, 1]
    assert [bench_threads(d, direct=False) for d in (1, 2, 16)] == [1, 1, 1]
    assert bench_threads(16, direct=True) == 16
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [reader_threads(m) for m in (1, 2, 8, 16)] == [1, 2, 7, 7]


def test_ordered_pool_keeps_order_raises_in_place_and_drops_unstarted_tasks() -> None:
    import time

    def slow_inverse(index: int) -> int:
        time.sleep((5 - index) * 0.01)  # later tasks finish first
        if index == 3:
            raise ValueError("task 3")
        return index

    with OrderedPool(slow_inverse, 4, "test-pool") as pool:
        for index in range(5):
            pool.submit(index)
        assert [pool.take() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="task 3"):
            pool.take()
        assert pool.take() == 4

    started: list[int] = []
    release = threading.Event()

    def blocking(index: int) -> None:
        started.append(index)
        release.wait(10)

    pool2: OrderedPool[None] = OrderedPool(blocking, 1, "test-pool")
    for index in range(10):
        pool2.submit(index)
    closer = threading.Thread(target=pool2.close)
    while not started:
        time.sleep(0.001)
    closer.start()
    while not pool2._stopping:  # close() has begun (white box: the flag it sets before joining)
        time.sleep(0.001)
    release.set()
    closer.join(10)
    assert not closer.is_alive() and started == [0]
    assert not [t for t in threading.enumerate() if t.name.startswith("test-pool")]
