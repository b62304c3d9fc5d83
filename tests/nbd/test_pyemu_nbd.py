"""``pyemu-nbd`` exports read and written by the real tools: nbdinfo, nbdcopy, qemu-img, qemu-io; -B bitmaps
as qemu:dirty-bitmap:; qemu-nbd's option behaviour (exit after the last client, --fork, refusals)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from nbd_helpers import make_image, need, pyemu_nbd_argv, run, server_process, url, wait_for_socket

SIZE = 8 << 20


def test_nbdinfo_list_map_json(tmp_path: Path) -> None:
    need("nbdinfo")
    image = tmp_path / "d.img"
    make_image(image, SIZE)
    sock = tmp_path / "s.sock"
    argv = pyemu_nbd_argv() + ["-f", "raw", "-r", "-t", "-x", "disk", "-D", "a test disk", "-k", str(sock),
                               str(image)]
    with server_process(argv, sock):
        listing = run("nbdinfo", "--list", f"nbd+unix://?socket={sock}").stdout
        assert 'export="disk"' in listing and "a test disk" in listing and "is_read_only: true" in listing
        info = json.loads(run("nbdinfo", "--json", url(sock, "disk")).stdout)
        export = info["exports"][0]
        assert info["structured"] is True and export["export-size"] == SIZE
        assert export["contexts"] == ["base:allocation"] and export["can_multi_conn"] is True
        extents = json.loads(run("nbdinfo", "--map", "--json", url(sock, "disk")).stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
            (0, 4096, 0), (4096, (1 << 20) - 4096, 3), (1 << 20, 4096, 0),
            ((1 << 20) + 4096, SIZE - (1 << 20) - 8192, 3), (SIZE - 4096, 4096, 0)]
        missing = run("nbdinfo", url(sock, "nope"), check=False)
        assert missing.returncode != 0


def test_nbdcopy_both_ways_and_qemu_tools(tmp_path: Path) -> None:
    need("nbdcopy", "qemu-img", "qemu-io")
    image = tmp_path / "d.img"
    contents = make_image(image, SIZE)
    sock = tmp_path / "s.sock"
    argv = pyemu_nbd_argv() + ["-f", "raw", "-t", "-e", "0", "-k", str(sock), str(image)]
    source = tmp_path / "src.img"
    with open(source, "wb") as f:
        f.write(os.urandom(SIZE))
    with server_process(argv, sock):
        out = tmp_path / "out.img"
        run("nbdcopy", url(sock), str(out))
        assert out.read_bytes() == contents
        run("nbdcopy", str(source), url(sock))  # writable export, several connections
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), url(sock))
        info = json.loads(run("qemu-img", "info", "--output=json", url(sock)).stdout)
        assert info["virtual-size"] == SIZE
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 64k 192k", "-c", "write -z 1M 1M",
            "-c", "discard 3M 64k", url(sock))
        check = run("qemu-io", "-f", "raw", "-c", "read -P 0x77 64k 192k", "-c", "read -P 0 1M 1M", url(sock)).stdout
        assert "Pattern verification failed" not in check
        converted = tmp_path / "c.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", url(sock), str(converted))
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", url(sock), str(converted))
    expected = bytearray(source.read_bytes())
    expected[64 << 10:256 << 10] = b"\x77" * (192 << 10)
    expected[1 << 20:2 << 20] = bytes(1 << 20)
    data = image.read_bytes()
    assert data[:3 << 20] == bytes(expected[:3 << 20]) and data[(3 << 20) + (64 << 10):] == \
        bytes(expected[(3 << 20) + (64 << 10):])


def test_dirty_bitmap_export(tmp_path: Path) -> None:
    need("nbdinfo", "qemu-img", "qemu-io")
    image = tmp_path / "b.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    run("qemu-img", "bitmap", "--add", str(image), "bm0")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 1M 64k", "-c", "write -P 2 5M 4k", str(image))
    sock = tmp_path / "b.sock"
    with server_process(pyemu_nbd_argv() + ["-r", "-f", "qcow2", "-B", "bm0", "-t", "-k", str(sock), str(image)],
                        sock):
        extents = json.loads(run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:bm0", url(sock)).stdout)
        dirty = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
        assert dirty == [(1 << 20, 64 << 10), (5 << 20, 64 << 10)]
        listing = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={sock}").stdout
        assert "qemu:dirty-bitmap:bm0" in listing
    bad = run(*pyemu_nbd_argv(), "-r", "-B", "nope", "-k", str(sock), str(image), check=False)
    assert bad.returncode == 1 and "Bitmap 'nope' is not found" in bad.stderr


def test_exits_after_last_client_and_fork(tmp_path: Path) -> None:
    need("qemu-img")
    image = tmp_path / "d.img"
    make_image(image, SIZE)
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(pyemu_nbd_argv() + ["-r", "-k", str(sock), str(image)], stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        # wait_for_socket's probe connection was the first client: without -t the server has gone
        assert proc.wait(60) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()  # type: ignore[union-attr]
    pid_file = tmp_path / "pid"
    run(*pyemu_nbd_argv(), "--fork", "--pid-file", str(pid_file), "-t", "-r", "-k", str(sock), str(image))
    pid = int(pid_file.read_text())  # written before the parent returned
    try:
        info = json.loads(run("qemu-img", "info", "--output=json", url(sock)).stdout)
        assert info["virtual-size"] == SIZE
    finally:
        os.kill(pid, 15)
    deadline = time.monotonic() + 60
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_file.exists()


@pytest.mark.parametrize("args, message", [
    (["-c", "/dev/nbd0", "x.img"], "not supported"),
    (["/nonexistent.img"], "Could not open '/nonexistent.img'"),
    (["-e", "many", "x.img"], "Invalid shared device number"),
    (["-p", "99999", "x.img"], "Invalid port number"),
    ([], "Invalid number of arguments"),
    (["--bogus", "x.img"], "not recognized"),
])
def test_refusals(args: list[str], message: str) -> None:
    proc = run(*pyemu_nbd_argv(), *args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_writes_through_pyemu_nbd_mark_persistent_bitmaps(tmp_path: Path) -> None:
    """A client's write to a writable pyemu-nbd export of a qcow2 lands in its enabled persistent bitmap,
    which qemu-nbd -B then serves as dirty (the bitmap is stored when pyemu-nbd exits)."""
    need("nbdinfo", "qemu-img", "qemu-io", "qemu-nbd")
    image = tmp_path / "m.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    run("qemu-img", "bitmap", "--add", str(image), "bm")
    sock = tmp_path / "m.sock"
    with server_process(pyemu_nbd_argv() + ["-f", "qcow2", "-t", "-k", str(sock), str(image)], sock):
        run("qemu-io", "-f", "raw", "-c", "write -P 7 3M 64k", url(sock))
    qsock = tmp_path / "q.sock"
    with server_process(["qemu-nbd", "-r", "-f", "qcow2", "-B", "bm", "-t", "-k", str(qsock), str(image)], qsock):
        extents = json.loads(run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:bm", url(qsock)).stdout)
    assert [(e["offset"], e["length"]) for e in extents if e["type"] & 1] == [(3 << 20, 64 << 10)]
