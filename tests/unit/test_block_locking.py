"""Image locking: the bytes pyemu holds are QEMU's, conflicts are found within one process (OFD locks are per
open file description) and across processes, and QEMU's own tools agree with us (interop with qemu-io and,
when installed, qemu-system-x86_64)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pyemu.block.errors import BlockConfigError, BlockError, ImageLockedError
from pyemu.block.file import FileProtocol
from pyemu.block.locking import (PERM_ALL, BlockPerm, ImageLock, byte_is_locked_by_others,
                                 default_permissions, perm_name)

QEMU_IO = shutil.which("qemu-io")
QEMU_SYSTEM = shutil.which("qemu-system-x86_64")
needs_qemu_io = pytest.mark.skipif(QEMU_IO is None, reason="qemu-io not installed (apt-get install qemu-utils)")


def held_bytes(path: Path) -> set[int]:
    """Bytes of ``path`` covered by any OFD lock, from /proc/locks."""
    st = path.stat()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "OFDLCK" in fields and dev in fields:
                i = fields.index(dev)
                start, end = int(fields[i + 1]), fields[i + 2]
                held.update(range(start, (int(end) if end != "EOF" else start) + 1))
    return held


def wait_for_locks(path: Path, timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = held_bytes(path)
        if held:
            return held
        time.sleep(0.02)
    raise AssertionError(f"nobody locked {path} within {timeout} s")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "locked.img"
    path.write_bytes(b"\x5a" * (1 << 20))
    return path


def test_permission_constants_match_qemu() -> None:
    assert [int(p) for p in (BlockPerm.CONSISTENT_READ, BlockPerm.WRITE, BlockPerm.WRITE_UNCHANGED,
                             BlockPerm.RESIZE)] == [1, 2, 4, 8]
    assert PERM_ALL == 0x0F
    assert perm_name(BlockPerm.WRITE) == "write"
    assert perm_name(BlockPerm.CONSISTENT_READ | BlockPerm.RESIZE) == "consistent read, resize"
    rw = default_permissions(read_only=False)
    assert rw == (BlockPerm.CONSISTENT_READ | BlockPerm.WRITE,
                  BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED | BlockPerm.RESIZE)
    ro = default_permissions(read_only=True, fixed_size=True)
    assert ro == (BlockPerm.CONSISTENT_READ, BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED)


def test_read_write_open_holds_qemus_bytes(image: Path) -> None:
    """QEMU 7.2 with a read-write virtio-blk drive over raw holds 100, 101 and 201 (measured)."""
    drv = FileProtocol.open(str(image))
    try:
        assert held_bytes(image) == {100, 101, 201}
    finally:
        drv.close()
    assert held_bytes(image) == set()


def test_read_only_open_holds_qemus_bytes(image: Path) -> None:
    drv = FileProtocol.open(str(image), read_only=True)
    try:
        assert held_bytes(image) == {100, 201}
    finally:
        drv.close()


def test_raw_window_also_unshares_resize(image: Path) -> None:
    perm, shared = default_permissions(read_only=False, fixed_size=True)
    drv = FileProtocol.open(str(image), perm=perm, shared=shared)
    try:
        assert held_bytes(image) == {100, 101, 201, 203}
    finally:
        drv.close()


def test_two_read_write_opens_in_one_process_conflict(image: Path) -> None:
    first = FileProtocol.open(str(image))
    try:
        with pytest.raises(ImageLockedError) as info:
            FileProtocol.open(str(image))
        message = str(info.value)
        assert message == f'Failed to get "write" lock\nIs another process using the image [{image}]?'
        assert info.value.permission == "write" and not info.value.shared
        assert isinstance(info.value, BlockError)
        assert held_bytes(image) == {100, 101, 201}  # the failed open left nothing behind
    finally:
        first.close()
    FileProtocol.open(str(image)).close()  # free again once the first is closed


def test_read_only_opens_coexist(image: Path) -> None:
    a = FileProtocol.open(str(image), read_only=True)
    b = FileProtocol.open(str(image), read_only=True)
    a.close()
    b.close()


def test_read_only_user_blocks_writers_and_vice_versa(image: Path) -> None:
    """QEMU's default share-rw=off: a read-only drive refuses writers, and cannot start next to one."""
    reader = FileProtocol.open(str(image), read_only=True)
    try:
        with pytest.raises(ImageLockedError, match='Failed to get "write" lock'):
            FileProtocol.open(str(image))
    finally:
        reader.close()
    writer = FileProtocol.open(str(image))
    try:
        with pytest.raises(ImageLockedError, match='Failed to get shared "write" lock') as info:
            FileProtocol.open(str(image), read_only=True)
        assert info.value.shared
    finally:
        writer.close()


def test_sharing_write_lets_writers_in(image: Path) -> None:
    """share-rw=on equivalent: sharing WRITE removes the 201 byte, so two such writers coexist."""
    shared = PERM_ALL
    a = FileProtocol.open(str(image), shared=shared)
    b = FileProtocol.open(str(image), shared=shared)
    assert held_bytes(image) == {100, 101}
    a.close()
    b.close()


def test_locking_off_takes_no_locks(image: Path) -> None:
    first = FileProtocol.open(str(image))
    try:
        second = FileProtocol.open(str(image), locking="off")
        assert second.lock is None
        second.close()
        assert held_bytes(image) == {100, 101, 201}  # closing the unlocked fd kept the other's locks
    finally:
        first.close()


def test_locks_survive_closing_another_fd_of_the_same_file(image: Path) -> None:
    """The POSIX-lock trap (any close drops the process's locks) does not apply to OFD locks."""
    drv = FileProtocol.open(str(image))
    try:
        fd = os.open(image, os.O_RDONLY)
        os.close(fd)
        assert held_bytes(image) == {100, 101, 201}
    finally:
        drv.close()


def test_unsupported_filesystem_auto_vs_on(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import pyemu.block.locking as locking

    def no_locks(fd: int, cmd: int, lock_type: int, start: int) -> bytes:
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(locking, "_fcntl_lock", no_locks)
    drv = FileProtocol.open(str(image), locking="auto")
    assert drv.lock is None
    drv.close()
    with pytest.raises(BlockConfigError, match="does not support OFD locks"):
        FileProtocol.open(str(image), locking="on")


def test_image_lock_release_and_probe(image: Path) -> None:
    fd = os.open(image, os.O_RDWR)
    other = os.open(image, os.O_RDONLY)
    try:
        lock = ImageLock(fd, str(image))
        assert lock.acquire(BlockPerm.CONSISTENT_READ | BlockPerm.WRITE, BlockPerm.CONSISTENT_READ, required=True)
        assert byte_is_locked_by_others(other, 101)
        assert not byte_is_locked_by_others(fd, 101)  # our own description never conflicts with itself
        assert byte_is_locked_by_others(other, 203)
        lock.release()
        assert not byte_is_locked_by_others(other, 101)
        assert held_bytes(image) == set()
    finally:
        os.close(fd)
        os.close(other)


# -- interop with QEMU's tools ---------------------------------------------------------------------------------

def qemu_io(*args: str, image: Path) -> subprocess.CompletedProcess[str]:
    assert QEMU_IO is not None
    return subprocess.run([QEMU_IO, *args, "-f", "raw", str(image)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def qemu_io_holding(image: Path):
    """Start an interactive qemu-io on the image (read-write unless a flag says otherwise), kept open."""
    procs: list[subprocess.Popen[str]] = []

    def start(*flags: str) -> subprocess.Popen[str]:
        assert QEMU_IO is not None
        proc = subprocess.Popen([QEMU_IO, *flags, "-f", "raw", str(image)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        wait_for_locks(image)
        return proc

    yield start
    for proc in procs:
        try:
            proc.communicate("quit\n", timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@needs_qemu_io
def test_qemu_io_read_write_blocks_pyemu(image: Path, qemu_io_holding) -> None:  # type: ignore[no-untyped-def]
    qemu_io_holding()
    with pytest.raises(ImageLockedError, match='Failed to get shared "write" lock'):
        FileProtocol.open(str(image))
    with pytest.raises(ImageLockedError):
        FileProtocol.open(str(image), read_only=True)  # a read-only drive still refuses a writer (share-rw=off)


@needs_qemu_io
def test_pyemu_read_write_blocks_qemu_io(image: Path) -> None:
    drv = FileProtocol.open(str(image))
    try:
        result = qemu_io("-c", "read 0 512", image=image)
        assert result.returncode != 0
        assert 'Failed to get "write" lock' in result.stderr
        assert f"Is another process using the image [{image}]?" in result.stderr
        # A read-only qemu-io shares everything and needs no write: it may read next to us, as next to QEMU.
        result = qemu_io("-r", "-c", "read -P 0x5a 0 512", image=image)
        assert result.returncode == 0, result.stderr
        assert "read 512/512 bytes" in result.stdout
    finally:
        drv.close()
    result = qemu_io("-c", "write -P 0x11 0 512", image=image)
    assert result.returncode == 0, result.stderr


@needs_qemu_io
def test_read_only_users_coexist_with_qemu(image: Path, qemu_io_holding) -> None:  # type: ignore[no-untyped-def]
    qemu_io_holding("-r")
    drv = FileProtocol.open(str(image), read_only=True)
    try:
        result = qemu_io("-r", "-c", "read 0 512", image=image)
        assert result.returncode == 0, result.stderr
    finally:
        drv.close()


@needs_qemu_io
def test_pyemu_read_only_keeps_qemu_io_writer_out(image: Path) -> None:
    drv = FileProtocol.open(str(image), read_only=True)
    try:
        result = qemu_io("-c", "write 0 512", image=image)
        assert result.returncode != 0 and 'Failed to get "write" lock' in result.stderr
    finally:
        drv.close()


@pytest.mark.skipif(QEMU_SYSTEM is None, reason="qemu-system-x86_64 not installed")
@pytest.mark.parametrize("readonly", [False, True])
def test_same_lock_bytes_as_qemu_system(image: Path, readonly: bool) -> None:
    """Measure what QEMU holds for a virtio-blk drive and compare with pyemu's bytes."""
    assert QEMU_SYSTEM is not None
    drive = f"file={image},format=raw,if=none,id=d0" + (",readonly=on" if readonly else "")
    proc = subprocess.Popen([QEMU_SYSTEM, "-nodefaults", "-display", "none", "-S", "-machine", "microvm",
                             "-drive", drive, "-device", "virtio-blk-device,drive=d0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            qemu_bytes = wait_for_locks(image, timeout=20)
        except AssertionError:
            proc.kill()
            pytest.skip(f"qemu-system did not start: {proc.communicate()[1].strip()}")
        time.sleep(0.2)
        qemu_bytes = held_bytes(image)
        if readonly:
            FileProtocol.open(str(image), read_only=True).close()  # two read-only users coexist
        else:
            with pytest.raises(ImageLockedError):
                FileProtocol.open(str(image))
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    drv = FileProtocol.open(str(image), read_only=readonly)
    try:
        assert held_bytes(image) == qemu_bytes
    finally:
        drv.close()
