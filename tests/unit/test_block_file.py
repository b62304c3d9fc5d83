"""The ``file`` protocol driver on real files in tmp_path: scatter-gather I/O, range checks, sparse files,
discard/write-zeroes, flush, read-only, hostile requests and O_DIRECT with unaligned requests."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from pyemu.block.driver import BlockDriver, BlockStatus
from pyemu.block.errors import BlockConfigError, BlockError, BlockIOError, ReadOnlyError
from pyemu.block.file import FileProtocol
from pyemu.block.hostio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

MiB = 1 << 20


def make_image(path: Path, size: int, *, pattern: bool = True) -> bytes:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size)) if pattern else bytes(size)
    path.write_bytes(data)
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def supports_punch_hole(directory: Path) -> bool:
    probe = directory / "punch-probe"
    probe.write_bytes(b"x" * 65536)
    try:
        fd = os.open(probe, os.O_RDWR)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 65536)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
    finally:
        probe.unlink()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, 64 * 1024)


@pytest.fixture
def driver(image: tuple[Path, bytes]):
    drv = FileProtocol.open(str(image[0]), locking="off")
    yield drv
    drv.close()


def test_is_a_block_driver(driver: FileProtocol) -> None:
    assert isinstance(driver, BlockDriver)
    assert driver.name == "file"
    assert driver.size() == 64 * 1024
    assert driver.capabilities.discard and driver.capabilities.write_zeroes and driver.capabilities.block_status
    assert not driver.capabilities.direct_io


def test_scatter_gather_read(driver: FileProtocol, image: tuple[Path, bytes]) -> None:
    _, data = image
    ram = bytearray(4096)
    views = [memoryview(ram)[0:100], memoryview(ram)[1000:1512], memoryview(ram)[3000:3001]]
    driver.preadv(777, views)
    assert bytes(views[0]) == data[777:877]
    assert bytes(views[1]) == data[877:1389]
    assert bytes(views[2]) == data[1389:1390]


def test_scatter_gather_write(driver: FileProtocol, image: tuple[Path, bytes]) -> None:
    path, data = image
    ram = bytearray(b"A" * 10 + b"B" * 20 + b"C" * 5)
    driver.pwritev(4090, [memoryview(ram)[:10], b"B" * 20, memoryview(ram)[30:]])
    expected = data[:4090] + bytes(ram) + data[4090 + len(ram):]
    assert path.read_bytes() == expected
    check = bytearray(35)
    driver.preadv(4090, [memoryview(check)])
    assert check == ram


def test_many_buffers_beyond_iov_max(driver: FileProtocol, image: tuple[Path, bytes]) -> None:
    _, data = image
    ram = bytearray(3000 * 8)
    views = [memoryview(ram)[i * 8:(i + 1) * 8] for i in range(3000)]
    driver.preadv(0, views)
    assert bytes(ram) == data[:24000]


def test_typed_and_2d_views_are_treated_as_bytes(driver: FileProtocol, image: tuple[Path, bytes]) -> None:
    _, data = image
    ram = bytearray(64)
    driver.preadv(8, [memoryview(ram).cast("I")])
    assert bytes(ram) == data[8:72]


def test_read_past_end_of_file_reads_zeros(tmp_path: Path) -> None:
    """The disk keeps its size; a file shrunk behind our back reads as zeros past its new end."""
    path = tmp_path / "shrink.img"
    data = make_image(path, 8192)
    drv = FileProtocol.open(str(path), locking="off")
    try:
        os.truncate(path, 5000)
        ram = bytearray(b"\xff" * 4096)
        drv.preadv(4096, [memoryview(ram)[:1000], memoryview(ram)[1000:]])
        assert bytes(ram[:904]) == data[4096:5000]
        assert bytes(ram[904:]) == bytes(4096 - 904)
    finally:
        drv.close()


def test_zero_length_requests_are_noops(driver: FileProtocol, image: tuple[Path, bytes]) -> None:
    path, _ = image
    before = digest(path)
    driver.preadv(driver.size(), [memoryview(bytearray(0))])
    driver.pwritev(driver.size(), [b""])
    driver.discard(0, 0)
    driver.write_zeroes(10, 0, may_unmap=True)
    assert digest(path) == before


@pytest.mark.parametrize("offset,length", [
    (-1, 1),                       # negative offset
    (0, -1),                       # negative length
    (-4096, 8192),                 # negative offset whose end lands inside the image
    (64 * 1024 - 1, 2),            # straddles the end
    (64 * 1024, 1),                # starts at the end
    (1 << 63, 512),                # huge offset
    (0, 1 << 63),                  # huge length
    ((1 << 64) - 512, 1024),       # offset + length wraps in 64-bit arithmetic
    ((1 << 63) - 1, 2),            # offset + length overflows int64
])
def test_out_of_range_requests_fail_and_touch_nothing(driver: FileProtocol, image: tuple[Path, bytes],
                                                      offset: int, length: int) -> None:
    path, _ = image
    before = digest(path)
    with pytest.raises(BlockIOError) as info:
        driver.discard(offset, length)
    assert info.value.errno == errno.EINVAL and info.value.offset == offset and info.value.length == length
    for call in (lambda: driver.write_zeroes(offset, length, may_unmap=False),
                 lambda: driver.write_zeroes(offset, length, may_unmap=True),
                 lambda: driver.block_status(offset, length)):
        with pytest.raises(BlockIOError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    if 0 < length <= 1 << 20:  # buffers carry their length: only positive sizes can be expressed
        with pytest.raises(BlockIOError) as info:
            driver.pwritev(offset, [b"\xaa" * length])
        assert info.value.errno == errno.EINVAL
        with pytest.raises(BlockIOError):
            driver.preadv(offset, [memoryview(bytearray(length))])
    assert digest(path) == before
    assert path.stat().st_size == 64 * 1024


def test_write_past_end_never_grows_the_file(driver: FileProtocol, image: tuple[Path, bytes]) -> None:
    path, data = image
    with pytest.raises(BlockIOError) as info:
        driver.pwritev(64 * 1024 - 512, [b"x" * 512, b"y" * 1])
    assert info.value.errno == errno.EINVAL
    assert path.read_bytes() == data


def test_non_integer_offsets_are_refused(driver: FileProtocol) -> None:
    for bad in (True, 1.0, "0", None):
        with pytest.raises(BlockIOError) as info:
            driver.block_status(bad, 512)  # type: ignore[arg-type]
        assert info.value.errno == errno.EINVAL


def test_read_needs_writable_buffers(driver: FileProtocol) -> None:
    with pytest.raises(TypeError):
        driver.preadv(0, [memoryview(b"constant")])


def test_flush(driver: FileProtocol, image: tuple[Path, bytes]) -> None:
    path, _ = image
    driver.pwritev(0, [b"durable"])
    driver.flush()
    assert path.read_bytes()[:7] == b"durable"


def test_failed_flush_fails_every_later_flush(driver: FileProtocol, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed fdatasync the page cache state is unknown: never report success again (QEMU)."""
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(BlockIOError) as info:
        driver.flush()
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    with pytest.raises(BlockIOError) as info:
        driver.flush()
    assert info.value.errno == errno.EIO


def test_discard_punches_a_hole(tmp_path: Path) -> None:
    if not supports_punch_hole(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} does not support FALLOC_FL_PUNCH_HOLE")
    path = tmp_path / "discard.img"
    make_image(path, 4 * MiB)
    os.sync()
    blocks_before = path.stat().st_blocks
    drv = FileProtocol.open(str(path), locking="off")
    try:
        drv.discard(MiB, 2 * MiB)
        drv.flush()
        assert path.stat().st_blocks <= blocks_before - (2 * MiB // 512)
        assert path.stat().st_size == 4 * MiB
        ram = bytearray(b"\xff" * (2 * MiB))
        drv.preadv(MiB, [memoryview(ram)])
        assert ram == bytes(2 * MiB)
        assert drv.block_status(MiB, 2 * MiB) == BlockStatus(MiB, 2 * MiB, allocated=False, zero=True)
    finally:
        drv.close()


def test_discard_on_a_filesystem_without_punch_hole_is_a_noop(driver: FileProtocol, image: tuple[Path, bytes],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import pyemu.block.file as file_mod

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(file_mod, "fallocate", unsupported)
    path, data = image
    driver.discard(0, 4096)  # a hint: no error, data kept
    assert path.read_bytes() == data
    driver.write_zeroes(0, 4096, may_unmap=True)  # falls back to writing zeros
    assert path.read_bytes() == bytes(4096) + data[4096:]


@pytest.mark.parametrize("may_unmap", [False, True])
def test_write_zeroes(driver: FileProtocol, image: tuple[Path, bytes], may_unmap: bool) -> None:
    path, data = image
    driver.write_zeroes(1000, 20000, may_unmap=may_unmap)
    assert path.read_bytes() == data[:1000] + bytes(20000) + data[21000:]
    assert path.stat().st_size == len(data)


def test_write_zeroes_fallback_writes_zero_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyemu.block.file as file_mod

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(file_mod, "fallocate", unsupported)
    path = tmp_path / "wz.img"
    data = make_image(path, 3 * MiB)
    drv = FileProtocol.open(str(path), locking="off")
    try:
        drv.write_zeroes(5, 3 * MiB - 10, may_unmap=False)  # bigger than the zero buffer
    finally:
        drv.close()
    assert path.read_bytes() == data[:5] + bytes(3 * MiB - 10) + data[-5:]


def test_block_status_on_a_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"\x01" * MiB)
    drv = FileProtocol.open(str(path), read_only=True, locking="off")
    try:
        hole = drv.block_status(0, 4 * MiB)
        if hole.allocated:
            pytest.skip("the filesystem does not report holes (SEEK_DATA)")
        assert hole == BlockStatus(0, MiB, allocated=False, zero=True)
        assert drv.block_status(MiB, 4 * MiB - MiB) == BlockStatus(MiB, MiB, allocated=True, zero=False)
        assert drv.block_status(MiB + 4096, 4096) == BlockStatus(MiB + 4096, 4096, allocated=True, zero=False)
        assert drv.block_status(2 * MiB, 2 * MiB) == BlockStatus(2 * MiB, 2 * MiB, allocated=False, zero=True)
        assert drv.block_status(512, 1024) == BlockStatus(512, 1024, allocated=False, zero=True)
        with pytest.raises(BlockIOError):
            drv.block_status(0, 0)
    finally:
        drv.close()


def test_read_only_driver_refuses_writes(image: tuple[Path, bytes]) -> None:
    path, data = image
    drv = FileProtocol.open(str(path), read_only=True, locking="off")
    try:
        assert drv.read_only
        for call in (lambda: drv.pwritev(0, [b"x"]), lambda: drv.discard(0, 4096),
                     lambda: drv.write_zeroes(0, 4096, may_unmap=True)):
            with pytest.raises(ReadOnlyError) as info:
                call()
            assert info.value.errno == errno.EROFS
            assert isinstance(info.value, BlockError)
        ram = bytearray(16)
        drv.preadv(0, [memoryview(ram)])
        assert bytes(ram) == data[:16]
    finally:
        drv.close()
    assert path.read_bytes() == data


def test_open_errors_are_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(BlockConfigError) as info:
        FileProtocol.open(str(missing))
    assert str(info.value) == f"Could not open '{missing}': No such file or directory"
    assert info.value.errno == errno.ENOENT
    with pytest.raises(BlockConfigError, match="Is a directory"):
        FileProtocol.open(str(tmp_path))
    with pytest.raises(BlockConfigError, match="requires .* to be a regular file"):
        FileProtocol.open(str(tmp_path), read_only=True)
    with pytest.raises(BlockConfigError, match="regular file"):
        FileProtocol.open("/dev/null", read_only=True, locking="off")
    with pytest.raises(BlockConfigError, match="locking"):
        FileProtocol.open(str(missing), locking="maybe")


def test_requests_after_close_fail_cleanly(image: tuple[Path, bytes]) -> None:
    drv = FileProtocol.open(str(image[0]), locking="off")
    drv.close()
    drv.close()
    with pytest.raises(BlockIOError) as info:
        drv.preadv(0, [memoryview(bytearray(1))])
    assert info.value.errno == errno.EBADF


def test_host_io_errors_carry_errno(driver: FileProtocol, monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(fd: int, buffers: list[memoryview], offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwritev", enospc)
    with pytest.raises(BlockIOError) as info:
        driver.pwritev(512, [b"x" * 512])
    assert (info.value.errno, info.value.offset, info.value.length) == (errno.ENOSPC, 512, 512)
    assert isinstance(info.value.__cause__, OSError)


def test_short_reads_and_writes_and_eintr_are_retried(driver: FileProtocol, image: tuple[Path, bytes],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = image
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"r": 0, "w": 0}

    def short_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["r"] += 1
        if calls["r"] == 1:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return real_preadv(fd, [buffers[0][:3]], offset)

    def short_pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls["w"] += 1
        return real_pwritev(fd, [buffers[0][:5]], offset)

    monkeypatch.setattr(os, "preadv", short_preadv)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    ram = bytearray(20)
    driver.preadv(100, [memoryview(ram)[:7], memoryview(ram)[7:]])
    assert bytes(ram) == data[100:120]
    driver.pwritev(200, [b"0123456789", b"abcdefghij"])
    monkeypatch.undo()
    assert path.read_bytes()[200:220] == b"0123456789abcdefghij"
    assert calls["w"] == 4


# -- O_DIRECT ----------------------------------------------------------------------------------------------------

def direct_io_dir(tmp_path: Path) -> Path:
    for candidate in (tmp_path, Path("/var/tmp"), Path(__file__).resolve().parents[2]):
        probe = candidate / f".odirect-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            probe.write_bytes(b"\0" * 4096)
            os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
            return candidate
        except OSError:
            continue
        finally:
            probe.unlink(missing_ok=True)
    pytest.skip("no directory on a filesystem that supports O_DIRECT (tried tmp_path, /var/tmp, the repo)")


@pytest.fixture
def direct_image(tmp_path: Path):
    directory = direct_io_dir(tmp_path)
    path = directory / f"direct-{os.getpid()}-{id(tmp_path)}.img"
    size = 3 * MiB + 4096 * 3 + 1536  # not a multiple of the page size: exercises the buffered tail
    data = make_image(path, size)
    try:
        yield path, data
    finally:
        path.unlink(missing_ok=True)


def test_direct_io_opens_with_o_direct(direct_image: tuple[Path, bytes]) -> None:
    path, _ = direct_image
    drv = FileProtocol.open(str(path), direct=True, locking="off")
    try:
        assert drv.capabilities.direct_io
        assert fcntl.fcntl(drv._fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        drv.close()


def test_a_growable_direct_file_keeps_o_direct_for_what_it_grew_by(direct_image: tuple[Path, bytes]) -> None:
    """A qcow2 image's file under ``cache=none`` grows as clusters are allocated: the bytes it grew by are
    read and written with O_DIRECT (only the last partial page is the page cache's), and the pass-through
    says so; a trim brings the boundary back."""
    path, data = direct_image
    drv = FileProtocol.open(str(path), direct=True, locking="off", growable=True)
    try:
        tail = drv.pass_through().direct_end
        assert tail == len(data) // 4096 * 4096
        block = bytes(range(256)) * 256  # 64 KiB, written 1 MiB past the end
        drv.pwritev(len(data) + MiB - len(data) % 4096, [block])
        end = len(data) + MiB - len(data) % 4096 + len(block)
        assert drv.size() == end and drv.pass_through().direct_end == end
        back = bytearray(len(block))
        drv.preadv(end - len(block), [memoryview(back)])
        assert back == block
        drv.truncate(len(data))
        assert drv.pass_through().direct_end == tail
    finally:
        drv.close()
    assert path.read_bytes()[:len(data)] == data


@pytest.mark.parametrize("alignment", [None, 4096], ids=["statx", "fallback-4096"])
def test_direct_io_unaligned_requests(direct_image: tuple[Path, bytes], alignment: int | None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Random unaligned writes and reads against a model; the filesystem's own DIO alignment (statx, 512 on
    ext4) and the 4096 fallback used where statx says nothing (tmpfs)."""
    import pyemu.block.file as file_mod
    if alignment is not None:
        monkeypatch.setattr(file_mod, "dio_alignment", lambda fd: alignment)
    path, data = direct_image
    model = bytearray(data)
    size = len(data)
    rng = random.Random(1234)
    drv = FileProtocol.open(str(path), direct=True, locking="off")
    try:
        requests = [(0, 4096), (1, 1), (100, 1000), (511, 2), (4095, 4098), (MiB - 7, MiB + 14), (size - 1, 1),
                    (size - 3000, 3000), (size - 5000, 2000), (0, size)]
        requests += [(o, rng.randint(1, 70000)) for o in (rng.randrange(0, size - 70000) for _ in range(40))]
        for n, (offset, length) in enumerate(requests):
            payload = bytes(rng.getrandbits(8) for _ in range(min(length, 64))) * (length // 64 + 1)
            payload = payload[:length]
            ram = bytearray(length + 3)
            split = length // 3
            drv.pwritev(offset, [memoryview(ram)[:0], payload[:split], memoryview(bytearray(payload[split:]))])
            model[offset:offset + length] = payload
            drv.preadv(offset, [memoryview(ram)[1:1 + split], memoryview(ram)[1 + split:1 + length]])
            assert ram[1:1 + length] == payload, f"request {n} ({offset}, {length})"
        drv.write_zeroes(3, 9000, may_unmap=False)
        model[3:9003] = bytes(9000)
        drv.flush()
    finally:
        drv.close()
    assert path.stat().st_size == size
    assert path.read_bytes() == bytes(model)


def test_direct_io_aligned_request_into_misaligned_memory(direct_image: tuple[Path, bytes]) -> None:
    path, data = direct_image
    drv = FileProtocol.open(str(path), direct=True, locking="off")
    try:
        ram = bytearray(8192 + 1)
        drv.preadv(4096, [memoryview(ram)[1:]])   # address off by one: the kernel refuses, we bounce
        assert bytes(ram[1:]) == data[4096:4096 + 8192]
        drv.pwritev(8192, [memoryview(ram)[1:4097]])
        check = bytearray(4096)
        drv.preadv(8192, [memoryview(check)])
        assert bytes(check) == data[4096:8192]
    finally:
        drv.close()


def test_direct_io_concurrent_read_modify_write_loses_nothing(direct_image: tuple[Path, bytes]) -> None:
    """Unaligned writes from several threads into the same blocks: each RMW must see the others' data."""
    path, data = direct_image
    drv = FileProtocol.open(str(path), direct=True, locking="off")
    pieces = 64
    threads = 8

    def worker(t: int) -> None:
        for i in range(pieces):
            offset = (i * threads + t) * 37
            drv.pwritev(offset, [bytes([t + 1]) * 37])

    try:
        workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        drv.close()
    content = path.read_bytes()
    for t in range(threads):
        for i in range(pieces):
            offset = (i * threads + t) * 37
            assert content[offset:offset + 37] == bytes([t + 1]) * 37
    end = pieces * threads * 37
    assert content[end:] == data[end:]


def test_direct_io_unsupported_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tmpfs before Linux 6.6 (and some FUSE filesystems) refuse O_DIRECT with EINVAL at open."""
    path = tmp_path / "tmpfs.img"
    make_image(path, 4096)
    real_open = os.open

    def no_direct(name: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(name, flags, mode)
    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(BlockConfigError) as info:
        FileProtocol.open(str(path), direct=True)
    assert str(info.value) == f"Could not open '{path}': filesystem does not support O_DIRECT"


# -- large buffered writes reserve their blocks first (FileProtocol._reserve_blocks) ------------------------

def on_ext4(directory: Path) -> bool:
    from pyemu.block.hostio import EXT4_SUPER_MAGIC, filesystem_type
    fd = os.open(directory, os.O_RDONLY)
    try:
        return filesystem_type(fd) == EXT4_SUPER_MAGIC
    finally:
        os.close(fd)


def test_filesystem_type_matches_stat_f(tmp_path: Path) -> None:
    import subprocess

    from pyemu.block.hostio import filesystem_type
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        magic = filesystem_type(fd)
    finally:
        os.close(fd)
    shown = subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], capture_output=True, text=True, check=True)
    assert magic == int(shown.stdout.strip(), 16)


def recording_fallocate(monkeypatch: pytest.MonkeyPatch, fail: int | None = None) -> list[tuple[int, int, int]]:
    """Replace file.py's fallocate with one that records (mode, offset, length) and then does the real call,
    or fails with ``fail`` (an errno) for KEEP_SIZE-only reservations."""
    import pyemu.block.file as file_mod
    calls: list[tuple[int, int, int]] = []

    def spy(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append((mode, offset, length))
        if fail is not None and mode == FALLOC_FL_KEEP_SIZE:
            raise OSError(fail, os.strerror(fail))
        fallocate(fd, mode, offset, length)
    monkeypatch.setattr(file_mod, "fallocate", spy)
    return calls


def test_large_buffered_writes_reserve_their_range_and_keep_the_size(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if not on_ext4(tmp_path):
        pytest.skip("block reservation is only done on ext4")
    calls = recording_fallocate(monkeypatch)
    path = tmp_path / "sparse.img"
    path.write_bytes(b"")
    os.truncate(path, 8 * MiB)
    drv = FileProtocol.open(str(path), locking="off")
    data = bytes(random.Random(1).randrange(256) for _ in range(256)) * 4096  # 1 MiB
    try:
        drv.pwritev(2 * MiB, [data])
        drv.pwritev(5 * MiB, [data[:4096]])  # small: no reservation
    finally:
        drv.close()
    assert calls == [(FALLOC_FL_KEEP_SIZE, 2 * MiB, MiB)]
    content = path.read_bytes()
    assert len(content) == 8 * MiB
    assert content[2 * MiB:3 * MiB] == data and content[5 * MiB:5 * MiB + 4096] == data[:4096]
    assert content[:2 * MiB] == bytes(2 * MiB) and content[3 * MiB:5 * MiB] == bytes(2 * MiB)


def test_reservation_past_the_end_of_a_growable_file_keeps_its_length_to_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not on_ext4(tmp_path):
        pytest.skip("block reservation is only done on ext4")
    calls = recording_fallocate(monkeypatch)
    path = tmp_path / "grow.img"
    path.write_bytes(b"\1" * 65536)
    drv = FileProtocol.open(str(path), locking="off", growable=True)
    try:
        drv.pwritev(65536, [b"\2" * (128 << 10)])
        assert drv.size() == 65536 + (128 << 10)
    finally:
        drv.close()
    assert calls == [(FALLOC_FL_KEEP_SIZE, 65536, 128 << 10)]
    assert path.read_bytes() == b"\1" * 65536 + b"\2" * (128 << 10)


def test_direct_io_writes_do_not_reserve(direct_image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = recording_fallocate(monkeypatch)
    path, data = direct_image
    drv = FileProtocol.open(str(path), locking="off", direct=True)
    try:
        drv.pwritev(0, [b"\3" * (128 << 10)])
    finally:
        drv.close()
    assert calls == []
    assert path.read_bytes()[:128 << 10] == b"\3" * (128 << 10)


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSPC])
def test_a_failed_reservation_leaves_the_write_to_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         code: int) -> None:
    """An unsupported reservation is not tried again; any other failure is retried next time; either way
    the write itself goes ahead (and reports its own error if it has one)."""
    if not on_ext4(tmp_path):
        pytest.skip("block reservation is only done on ext4")
    calls = recording_fallocate(monkeypatch, fail=code)
    path = tmp_path / "fail.img"
    path.write_bytes(bytes(4 * MiB))
    drv = FileProtocol.open(str(path), locking="off")
    try:
        drv.pwritev(0, [b"\4" * MiB])
        drv.pwritev(MiB, [b"\5" * MiB])
    finally:
        drv.close()
    assert len(calls) == (1 if code == errno.EOPNOTSUPP else 2)
    assert path.read_bytes() == b"\4" * MiB + b"\5" * MiB + bytes(2 * MiB)
