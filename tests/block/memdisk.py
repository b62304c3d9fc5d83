"""An in-memory BlockDriver for the block-copy and copy-before-write tests: it logs what was written, can
fail requests, and can hold a request in flight until the test lets it go (to observe who waits for whom
without timing assumptions)."""

from __future__ import annotations

import threading
from typing import Sequence

from pyemu.block.driver import BlockCapabilities, BlockStatus, check_request
from pyemu.block.errors import BlockIOError

KiB = 1024
MiB = 1 << 20
WAIT = 60.0  # generous: the machine is shared; a test fails on this only when something hangs


class Hold:
    """Holds the next request of one kind overlapping a range: ``entered`` is set when it arrives, and it
    goes on when ``release`` is set."""

    def __init__(self, op: str, offset: int, length: int) -> None:
        self.op, self.offset, self.end = op, offset, offset + length
        self.entered = threading.Event()
        self.release = threading.Event()

    def matches(self, op: str, offset: int, length: int) -> bool:
        return op == self.op and offset < self.end and self.offset < offset + length


class MemDisk:
    """A ``size``-byte node in memory. ``fail`` maps an op ("read", "write", "zeroes") to an errno that
    requests of that kind raise; ``holds`` are one-shot request holds; ``log`` records (op, offset, length)
    of every write-like request served."""

    name = "mem"

    def __init__(self, size: int, *, data: bytes | None = None, cluster_size: int | None = None,
                 write_zeroes: bool = True, unallocated: Sequence[tuple[int, int]] = ()) -> None:
        self.data = bytearray(data if data is not None else bytes(size))
        assert len(self.data) == size
        if cluster_size is not None:
            self.cluster_size = cluster_size
        self._write_zeroes = write_zeroes
        self.unallocated = list(unallocated)
        self.fail: dict[str, int] = {}
        self.holds: list[Hold] = []
        self.log: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        self.closed = False
        self.flushed = 0

    filename = "mem"
    read_only = False

    @property
    def capabilities(self) -> BlockCapabilities:
        return BlockCapabilities(discard=True, write_zeroes=self._write_zeroes, block_status=True,
                                 direct_io=False)

    def size(self) -> int:
        return len(self.data)

    def hold(self, op: str, offset: int, length: int) -> Hold:
        hold = Hold(op, offset, length)
        with self.lock:
            self.holds.append(hold)
        return hold

    def _enter(self, op: str, offset: int, length: int) -> None:
        check_request(offset, length, len(self.data), what=op)
        with self.lock:
            hold = next((h for h in self.holds if h.matches(op, offset, length)), None)
            if hold is not None:
                self.holds.remove(hold)
        if hold is not None:
            hold.entered.set()
            assert hold.release.wait(WAIT), "a held request was never released"
        code = self.fail.get(op)
        if code is not None:
            raise BlockIOError(f"{op} at {offset} failed (injected)", errno=code, offset=offset, length=length)

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        length = sum(memoryview(b).nbytes for b in buffers)
        self._enter("read", offset, length)
        pos = offset
        for buf in buffers:
            view = memoryview(buf).cast("B")
            with self.lock:
                view[:] = self.data[pos:pos + view.nbytes]
            pos += view.nbytes

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        blob = b"".join(bytes(b) for b in buffers)
        self._enter("write", offset, len(blob))
        with self.lock:
            self.data[offset:offset + len(blob)] = blob
            self.log.append(("write", offset, len(blob)))

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        self._enter("zeroes", offset, length)
        with self.lock:
            self.data[offset:offset + length] = bytes(length)
            self.log.append(("zeroes", offset, length))

    def discard(self, offset: int, length: int) -> None:
        self._enter("discard", offset, length)
        with self.lock:
            self.data[offset:offset + length] = bytes(length)
            self.log.append(("discard", offset, length))

    def flush(self) -> None:
        self.flushed += 1

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """Extents of 64 KiB steps: zero when all bytes are zero; unallocated where the test said so."""
        check_request(offset, length, len(self.data), what="block-status", nonempty=True)
        if self.fail.get("status"):
            raise BlockIOError("block-status failed (injected)", errno=self.fail["status"], offset=offset)
        for start, run in self.unallocated:
            if start <= offset < start + run:
                return BlockStatus(offset, min(length, start + run - offset), allocated=False, zero=True)
        step = 64 * KiB
        end = min(offset + length, (offset // step + 1) * step)
        with self.lock:
            zero = not any(self.data[offset:end])
        return BlockStatus(offset, end - offset, allocated=True, zero=zero)

    def close(self) -> None:
        self.closed = True

    def writes_in(self, offset: int, length: int) -> list[tuple[str, int, int]]:
        """Logged write-like requests overlapping the range."""
        with self.lock:
            return [e for e in self.log if e[1] < offset + length and offset < e[1] + e[2]]


def pattern(size: int, seed: int = 1) -> bytes:
    """Non-zero bytes that differ from cluster to cluster (a wrong offset shows)."""
    out = bytearray(size)
    for pos in range(0, size, 4096):
        word = ((pos // 4096) * 2654435761 + seed) & 0xFFFFFFFF
        out[pos:pos + 4096] = (word.to_bytes(4, "little") + b"\x5a" * 4) * 512
    return bytes(out[:size])
