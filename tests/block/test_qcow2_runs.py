"""Runs of clusters looked at in bulk (reads and status queries extend an extent over a table's entries in one
tight loop; allocating writes skip runs of all-zero entries as bytes) must judge every entry as the
cluster-by-cluster code did: a bad entry in the middle of a run is still found and named, and the extents
still stop where the meaning or the host contiguity changes."""

from __future__ import annotations

import errno
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyemu.block.errors import BlockIOError
from pyemu.block.image import open_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed")

CS = 65536


def _image(tmp_path: Path, *writes: str) -> Path:
    path = tmp_path / "run.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True)
    for command in writes:
        subprocess.run(["qemu-io", "-c", command, str(path)], check=True, capture_output=True)
    return path


def _l2_entry_offset(path: Path, vcluster: int) -> int:
    data = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FF_FFFF_FFFF_FE00
    return l2_offset + 8 * vcluster


def _set_entry(path: Path, vcluster: int, word: int) -> None:
    with open(path, "r+b") as f:
        f.seek(_l2_entry_offset(path, vcluster))
        f.write(struct.pack(">Q", word))


def test_extents_stop_at_kind_and_contiguity_changes(tmp_path: Path) -> None:
    path = _image(tmp_path, "write -P 1 0 1M", "write -z 1M 512k", "write -P 2 2M 256k", "write -P 3 4M 64k")
    node = open_image(str(path), read_only=True)
    try:
        seen = []
        pos = 0
        while pos < node.size():
            st = node.block_status(pos, node.size() - pos)
            seen.append((st.offset, st.length, st.allocated, st.zero))
            pos += st.length
        assert seen == [(0, 1 << 20, True, False), (1 << 20, 512 << 10, True, True),
                        ((3 << 20) // 2, 512 << 10, False, True), (2 << 20, 256 << 10, True, False),
                        ((9 << 20) // 4, (7 << 20) // 4, False, True), (4 << 20, CS, True, False),
                        ((4 << 20) + CS, (4 << 20) - CS, False, True)]
        buf = bytearray(3 << 20)
        node.preadv(0, [memoryview(buf)])
        assert buf[:1 << 20] == b"\1" * (1 << 20) and buf[1 << 20:2 << 20] == bytes(1 << 20)
        assert buf[2 << 20:(2 << 20) + (256 << 10)] == b"\2" * (256 << 10)
    finally:
        node.close()


def _entry(path: Path, vcluster: int) -> int:
    with open(path, "rb") as f:
        f.seek(_l2_entry_offset(path, vcluster))
        word: int = struct.unpack(">Q", f.read(8))[0]
    return word


@pytest.mark.parametrize("problem", ["outside the image", "reserved bits"])
def test_bad_entry_inside_a_run_is_reported(tmp_path: Path, problem: str) -> None:
    """Entry 7 of a contiguous run goes bad in a way only the entry itself shows: its host cluster is the
    next one as expected, but lies past the end of the file (truncated), or a reserved bit is set."""
    path = _image(tmp_path, "write -P 1 0 1M")
    word = _entry(path, 7)
    assert _entry(path, 6) & 0x00FF_FFFF_FFFF_FE00 == (word & 0x00FF_FFFF_FFFF_FE00) - CS
    if problem == "outside the image":
        with open(path, "r+b") as f:
            f.truncate(word & 0x00FF_FFFF_FFFF_FE00)
    else:
        _set_entry(path, 7, word | 0x2)
    node = open_image(str(path), read_only=True)
    try:
        with pytest.raises(BlockIOError) as info:
            node.preadv(0, [memoryview(bytearray(1 << 20))])
        assert info.value.errno == errno.EIO
        assert problem in str(info.value) and "guest cluster 7" in str(info.value)
        head = bytearray(7 * CS)  # the clusters before it still read
        node.preadv(0, [memoryview(head)])
        assert head == b"\1" * (7 * CS)
    finally:
        node.close()


def test_allocating_writes_over_zero_runs_and_existing_clusters(tmp_path: Path) -> None:
    path = _image(tmp_path, "write -P 1 1M 64k", "write -z 3M 128k")
    node = open_image(str(path), read_only=False)
    try:
        data = bytes(range(256)) * (4 << 12)  # 4 MiB over unallocated, data and zero clusters
        node.pwritev(512 << 10, [data])
        back = bytearray(len(data))
        node.preadv(512 << 10, [memoryview(back)])
        assert back == data
    finally:
        node.close()
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    expected = bytearray(8 << 20)
    expected[1 << 20:(1 << 20) + CS] = b"\1" * CS
    expected[512 << 10:(512 << 10) + len(data)] = data
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(flat)], check=True)
    assert flat.read_bytes() == expected


@pytest.mark.parametrize("problem, change", [
    ("reserved bits", lambda word: word | 0x2),
    ("unaligned", lambda word: word + 0x200),
    ("reserved bits", lambda word: 0x4),  # an otherwise unallocated entry
])
def test_bad_first_entry_of_a_request_is_reported(tmp_path: Path, problem: str, change) -> None:  # type: ignore[no-untyped-def]
    path = _image(tmp_path, "write -P 1 0 1M")
    _set_entry(path, 3, change(_entry(path, 3)))
    node = open_image(str(path), read_only=True)
    try:
        for offset, length in ((3 * CS, 4096), (3 * CS + 512, 3 * CS)):
            with pytest.raises(BlockIOError) as info:
                node.preadv(offset, [memoryview(bytearray(length))])
            assert problem in str(info.value) and "guest cluster 3" in str(info.value), str(info.value)
        with pytest.raises(BlockIOError):
            node.block_status(3 * CS, CS)
    finally:
        node.close()
