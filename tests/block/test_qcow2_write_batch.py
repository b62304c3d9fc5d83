"""qcow2's ``write_batch``: whole fresh clusters of several writes share one allocation and one host write,
in the writes' order, with the same image as writing them one by one (qemu-img compare and check agree);
anything else goes through the ordinary write path; a failed host write leaves no entry behind."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyemu.block.errors import BlockIOError
from pyemu.block.file import FileProtocol
from pyemu.block.image import open_image
from pyemu.block.qcow2.driver import Qcow2Format

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed")

CS = 65536
MiB = 1 << 20


def _image(path: Path, *writes: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    for command in writes:
        subprocess.run(["qemu-io", "-c", command, str(path)], check=True, capture_output=True)
    return path


def _open(path: Path) -> Qcow2Format:
    node = open_image(str(path), read_only=False)
    assert isinstance(node, Qcow2Format)
    return node


def _payload(length: int, seed: int) -> memoryview:
    return memoryview(bytes((seed * 7 + i // 512) & 0xFF for i in range(length)))


def _host_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(host offset, bytes) of every write of more than a cluster (data, not a table) the file node receives
    from now on."""
    seen: list[tuple[int, int]] = []
    real = FileProtocol.pwritev

    def pwritev(self: FileProtocol, offset: int, buffers: Any) -> None:
        size = sum(memoryview(b).nbytes for b in buffers)
        if size > CS:
            seen.append((offset, size))
        real(self, offset, buffers)

    monkeypatch.setattr(FileProtocol, "pwritev", pwritev)
    return seen


def _check_and_compare(batched: Path, one_by_one: Path) -> None:
    for path in (batched, one_by_one):
        assert subprocess.run(["qemu-img", "check", "-q", str(path)]).returncode == 0, path
    assert subprocess.run(["qemu-img", "compare", "-q", str(batched), str(one_by_one)]).returncode == 0


def test_fresh_whole_clusters_share_one_allocation_laid_out_as_one_by_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = [(0, _payload(MiB, 1)), (2 * MiB, _payload(MiB, 2)), (5 * MiB, _payload(3 * CS, 3))]
    batched, one_by_one = _image(tmp_path / "b.qcow2"), _image(tmp_path / "o.qcow2")
    node = _open(one_by_one)
    for offset, data in writes:
        node.pwritev(offset, [data])
    node.close()
    host = _host_writes(monkeypatch)
    node = _open(batched)
    node.write_batch(writes)
    node.close()
    assert len(host) == 1 and host[0][1] == 2 * MiB + 3 * CS  # one host write for all three
    _check_and_compare(batched, one_by_one)
    maps = [subprocess.run(["qemu-img", "map", "--output=json", str(p)], check=True, capture_output=True,
                           text=True).stdout for p in (batched, one_by_one)]
    assert maps[0] == maps[1]  # the same host offsets as separate writes in that order


def test_anything_but_fresh_whole_clusters_takes_the_ordinary_path_in_order(tmp_path: Path) -> None:
    """A cluster written before, a zero cluster, part of a cluster and two writes to the same place: the
    image ends up as if each had been written in turn."""
    setup = ("write -P 9 1M 64k", "write -z 3M 128k")
    writes = [(MiB, _payload(CS, 1)), (2 * MiB, _payload(2 * CS, 2)), (3 * MiB, _payload(2 * CS, 3)),
              (4 * MiB + 512, _payload(4096, 4)), (6 * MiB, _payload(CS, 5)), (6 * MiB, _payload(CS, 6))]
    batched, one_by_one = _image(tmp_path / "b.qcow2", *setup), _image(tmp_path / "o.qcow2", *setup)
    node = _open(one_by_one)
    for offset, data in writes:
        node.pwritev(offset, [data])
    node.close()
    node = _open(batched)
    node.write_batch(writes)
    buf = bytearray(CS)
    node.preadv(6 * MiB, [memoryview(buf)])
    assert buf == _payload(CS, 6)  # the later of two writes to one place wins
    node.close()
    _check_and_compare(batched, one_by_one)


def test_a_failed_host_write_sets_no_entry_and_frees_its_clusters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _image(tmp_path / "b.qcow2")
    real = FileProtocol.pwritev

    def failing(self: FileProtocol, offset: int, buffers: Any) -> None:
        if sum(memoryview(b).nbytes for b in buffers) > MiB:
            host = OSError(errno.ENOSPC, "No space left on device")
            raise BlockIOError.from_os_error("write", self.filename, host, offset=offset) from host
        real(self, offset, buffers)

    node = _open(path)
    monkeypatch.setattr(FileProtocol, "pwritev", failing)
    with pytest.raises(BlockIOError) as info:
        node.write_batch([(0, _payload(MiB, 1)), (2 * MiB, _payload(MiB, 2))])
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(FileProtocol, "pwritev", real)
    for offset in (0, 2 * MiB):
        assert not node.block_status(offset, MiB).allocated
    node.write_batch([(8 * MiB, _payload(CS, 3)), (9 * MiB, _payload(CS, 4))])  # the allocator still works
    node.close()
    result = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout  # no leak: the failed run's clusters were freed
