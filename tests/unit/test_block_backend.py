"""BlockBackend policies (read-only, cache modes, discard, close while busy) and the raw format's window.

Policies are checked against a small in-memory driver that records what reached it; the raw window and the
read-only refusal are also checked on real files."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Sequence

import pytest

from pyemu.block.backend import BlockBackend, CacheMode
from pyemu.block.driver import BlockCapabilities, BlockDriver, BlockStatus, check_request
from pyemu.block.errors import BlockConfigError, BlockIOError, ReadOnlyError
from pyemu.block.file import FileProtocol
from pyemu.block.raw import RawFormat


class MemoryDriver:
    """A block node in a bytearray that logs the calls reaching it."""

    name = "memory"
    filename = "memory"

    def __init__(self, size: int = 1 << 16, *, read_only: bool = False) -> None:
        self.data = bytearray(size)
        self.read_only = read_only
        self.capabilities = BlockCapabilities(discard=True, write_zeroes=True, block_status=False, direct_io=False)
        self.calls: list[str] = []
        self.closed = False
        self.gate: threading.Event | None = None

    def size(self) -> int:
        return len(self.data)

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.calls.append("read")
        for buf in buffers:
            buf[:] = self.data[offset:offset + len(buf)]
            offset += len(buf)

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        self.calls.append("write")
        for buf in buffers:
            self.data[offset:offset + len(buf)] = buf
            offset += len(buf)

    def flush(self) -> None:
        self.calls.append("flush")

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(f"discard {offset} {length}")

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        self.calls.append(f"zeroes {offset} {length} unmap={may_unmap}")
        self.data[offset:offset + length] = bytes(length)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        check_request(offset, length, self.size(), nonempty=True)
        return BlockStatus(offset, length, allocated=True, zero=False)

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True


def test_memory_driver_is_a_block_driver() -> None:
    assert isinstance(MemoryDriver(), BlockDriver)


# -- cache modes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,direct,writeback,no_flush", [
    ("writeback", False, True, False),
    ("writethrough", False, False, False),
    ("none", True, True, False),
    ("off", True, True, False),
    ("directsync", True, False, False),
    ("unsafe", False, True, True),
])
def test_cache_mode_parse(name: str, direct: bool, writeback: bool, no_flush: bool) -> None:
    mode = CacheMode.parse(name)
    assert (mode.direct, mode.writeback, mode.no_flush) == (direct, writeback, no_flush)
    assert CacheMode.parse(mode.name) == mode


def test_cache_mode_default_is_writeback() -> None:
    assert CacheMode() == CacheMode.parse("writeback")


def test_cache_mode_unknown_names_the_value() -> None:
    with pytest.raises(BlockConfigError, match="'bogus'") as info:
        CacheMode.parse("bogus")
    assert info.value.option == "-drive"


def test_writeback_does_not_flush_on_write() -> None:
    drv = MemoryDriver()
    backend = BlockBackend(drv, read_only=False, cache=CacheMode.parse("writeback"), id="d0")
    backend.pwritev(0, [b"abc"])
    backend.flush()
    assert drv.calls == ["write", "flush"]


@pytest.mark.parametrize("name", ["writethrough", "directsync"])
def test_writethrough_flushes_after_every_write(name: str) -> None:
    drv = MemoryDriver()
    backend = BlockBackend(drv, read_only=False, cache=CacheMode.parse(name), id="d0")
    backend.pwritev(0, [b"abc"])
    backend.write_zeroes(0, 512, may_unmap=False)
    assert drv.calls == ["write", "flush", "zeroes 0 512 unmap=False", "flush"]


def test_unsafe_never_flushes() -> None:
    drv = MemoryDriver()
    backend = BlockBackend(drv, read_only=False, cache=CacheMode.parse("unsafe"), id="d0")
    backend.flush()
    assert drv.calls == []
    wt_unsafe = BlockBackend(MemoryDriver(), read_only=False, cache=CacheMode(writeback=False, no_flush=True))
    wt_unsafe.pwritev(0, [b"x"])
    assert wt_unsafe.root.calls == ["write"]  # type: ignore[attr-defined]


# -- discard -------------------------------------------------------------------------------------------------------

def test_discard_ignore_is_a_silent_noop() -> None:
    drv = MemoryDriver()
    backend = BlockBackend(drv, read_only=False, discard="ignore", id="d0")
    backend.discard(0, 4096)
    backend.write_zeroes(0, 4096, may_unmap=True)
    assert drv.calls == ["zeroes 0 4096 unmap=False"]  # MAY_UNMAP dropped without discard=unmap, as in QEMU


def test_discard_unmap_reaches_the_driver() -> None:
    drv = MemoryDriver()
    backend = BlockBackend(drv, read_only=False, discard="unmap", id="d0")
    backend.discard(512, 4096)
    backend.write_zeroes(0, 4096, may_unmap=True)
    assert drv.calls == ["discard 512 4096", "zeroes 0 4096 unmap=True"]


def test_a_node_without_discard_or_write_zeroes_still_serves_them() -> None:
    """After a root swap the device may send what its first node offered: discard is a hint (dropped),
    write-zeroes becomes written zeros, as QEMU's block layer falls back."""
    drv = MemoryDriver()
    drv.capabilities = BlockCapabilities(discard=False, write_zeroes=False, block_status=False, direct_io=False)
    drv.data[:] = b"\xff" * len(drv.data)
    backend = BlockBackend(drv, read_only=False, discard="unmap", id="d0")
    backend.discard(0, 4096)
    backend.write_zeroes(8192, 4096, may_unmap=True)
    assert drv.calls == ["write"]
    assert drv.data[8192:8192 + 4096] == bytes(4096) and drv.data[:4096] == b"\xff" * 4096


def test_bad_discard_mode() -> None:
    with pytest.raises(BlockConfigError):
        BlockBackend(MemoryDriver(), read_only=False, discard="sometimes")


# -- read-only -----------------------------------------------------------------------------------------------------

def test_read_only_backend_refuses_writes_on_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    data = bytes(range(256)) * 64
    path.write_bytes(data)
    drv = FileProtocol.open(str(path), locking="off")  # the node could write; the drive says no
    backend = BlockBackend(drv, read_only=True, discard="unmap", id="ro0")
    try:
        assert backend.read_only
        for call in (lambda: backend.pwritev(0, [b"x" * 512]), lambda: backend.discard(0, 4096),
                     lambda: backend.write_zeroes(0, 4096, may_unmap=True)):
            with pytest.raises(ReadOnlyError) as info:
                call()
            assert info.value.errno == errno.EROFS
        ram = bytearray(512)
        backend.preadv(0, [memoryview(ram)])
        assert bytes(ram) == data[:512]
        backend.flush()
    finally:
        backend.close()
    assert path.read_bytes() == data


def test_read_write_backend_over_read_only_node_is_refused() -> None:
    with pytest.raises(BlockConfigError):
        BlockBackend(MemoryDriver(read_only=True), read_only=False)


# -- lifetime and threads ------------------------------------------------------------------------------------------

def test_close_waits_for_requests_in_flight_and_then_fails_new_ones() -> None:
    drv = MemoryDriver()
    drv.gate = threading.Event()
    backend = BlockBackend(drv, read_only=False, id="d0")
    reader = threading.Thread(target=backend.preadv, args=(0, [memoryview(bytearray(16))]))
    reader.start()
    time.sleep(0.05)
    closer = threading.Thread(target=backend.close)
    closer.start()
    time.sleep(0.05)
    assert not drv.closed  # still waiting for the read
    drv.gate.set()
    reader.join(5)
    closer.join(5)
    assert drv.calls == ["read", "close"]
    with pytest.raises(BlockIOError) as info:
        backend.preadv(0, [memoryview(bytearray(1))])
    assert info.value.errno == errno.ENOMEDIUM
    backend.close()  # idempotent


def test_concurrent_io_threads_on_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "mt.img"
    path.write_bytes(bytes(1 << 20))
    backend = BlockBackend(FileProtocol.open(str(path), locking="off"), read_only=False, id="mt")
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(100):
                offset = (t * 100 + i) * 512
                backend.pwritev(offset, [bytes([t + 1]) * 512])
                check = bytearray(512)
                backend.preadv(offset, [memoryview(check)])
                assert check == bytes([t + 1]) * 512
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    backend.close()
    assert not errors
    content = path.read_bytes()
    for t in range(8):
        assert content[t * 51200:(t + 1) * 51200] == bytes([t + 1]) * 51200


def test_backend_passes_size_status_and_capabilities() -> None:
    drv = MemoryDriver(8192)
    backend = BlockBackend(drv, read_only=False, id="d0")
    assert backend.size() == 8192
    assert backend.capabilities is drv.capabilities
    assert backend.block_status(0, 512) == BlockStatus(0, 512, allocated=True, zero=False)


# -- raw format ----------------------------------------------------------------------------------------------------

@pytest.fixture
def big_image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "part.img"
    data = bytes((i * 13) & 0xFF for i in range(1 << 16))
    path.write_bytes(data)
    return path, data


def test_raw_without_window_is_the_whole_child(big_image: tuple[Path, bytes]) -> None:
    path, data = big_image
    raw = RawFormat(FileProtocol.open(str(path), locking="off"))
    try:
        assert raw.name == "raw" and raw.size() == len(data) and not raw.has_window
        assert raw.filename == str(path) and not raw.read_only
        assert isinstance(raw, BlockDriver)
    finally:
        raw.close()


def test_raw_window_reads_and_writes_inside_only(big_image: tuple[Path, bytes]) -> None:
    path, data = big_image
    child = FileProtocol.open(str(path), locking="off")
    raw = RawFormat(child, offset=4096, size=8192)
    try:
        assert raw.size() == 8192
        ram = bytearray(100)
        raw.preadv(10, [memoryview(ram)])
        assert bytes(ram) == data[4106:4206]
        raw.pwritev(8192 - 4, [b"EDGE"])
        raw.write_zeroes(0, 16, may_unmap=False)
        raw.discard(4096, 512)
        raw.flush()
        for bad in ((8192 - 3, 4), (-1, 1), (8192, 1), ((1 << 64) - 4096, 8192)):
            with pytest.raises(BlockIOError) as info:
                raw.pwritev(bad[0], [b"X" * bad[1]])
            assert info.value.errno == errno.EINVAL
            with pytest.raises(BlockIOError):
                raw.preadv(bad[0], [memoryview(bytearray(bad[1]))])
            with pytest.raises(BlockIOError):
                raw.discard(*bad)
            with pytest.raises(BlockIOError):
                raw.write_zeroes(*bad, may_unmap=True)
        status = raw.block_status(100, 200)
        assert (status.offset, status.length, status.allocated) == (100, 200, True)
    finally:
        raw.close()
    content = path.read_bytes()
    assert content[:4096] == data[:4096]
    assert content[4096:4112] == bytes(16)
    assert content[4096 + 8188:4096 + 8192] == b"EDGE"
    assert content[4096 + 8192:] == data[4096 + 8192:]
    assert child.closed


@pytest.mark.parametrize("offset,size,message", [
    (1 << 17, None, r"Offset \(131072\) cannot be greater than size of image \(65536\)"),
    (4096, 1 << 16, r"The sum of offset \(4096\) and size \(65536\) has to be smaller or equal"),
    (0, 1000, "Specified size is not multiple of 512"),
    (-1, None, "non-negative"),
])
def test_raw_window_validation(big_image: tuple[Path, bytes], offset: int, size: int | None,
                               message: str) -> None:
    child = FileProtocol.open(str(big_image[0]), locking="off")
    try:
        with pytest.raises(BlockConfigError, match=message):
            RawFormat(child, offset=offset, size=size)
    finally:
        child.close()
