"""``check`` against qemu-img 7.2 on clean, leaking and corrupted images: same exit codes (0/2/3/63), same
human lines and JSON keys, and repairs that qemu-img then finds clean."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from img_marks import needs_qemu_img  # type: ignore[import-not-found]

pytestmark = needs_qemu_img


def _first_data_cluster(f) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """(cluster_bits, l2 table offset, refcount block offset) of a fresh single-L2 image."""
    f.seek(0)
    head = f.read(72)
    cluster_bits = struct.unpack(">I", head[20:24])[0]
    l1_offset, reftable_offset = struct.unpack(">Q", head[40:48])[0], struct.unpack(">Q", head[48:56])[0]
    f.seek(l1_offset)
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    f.seek(reftable_offset)
    refblock = struct.unpack(">Q", f.read(8))[0]
    return cluster_bits, l2, refblock


def make_leak(path: Path) -> None:
    """Drop the first L2 entry: its data cluster keeps refcount 1 with no reference (a leak)."""
    with open(path, "r+b") as f:
        _, l2, _ = _first_data_cluster(f)
        f.seek(l2)
        f.write(bytes(8))


def make_corruption(path: Path) -> None:
    """Zero the refcount of the first data cluster while the L2 table still uses it."""
    with open(path, "r+b") as f:
        bits, l2, refblock = _first_data_cluster(f)
        f.seek(l2)
        data = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(refblock + 2 * (data >> bits))
        f.write(b"\0\0")


@pytest.fixture
def images(qimg, qio, workdir: Path) -> Path:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "clean.q", "64M")
    qio("clean.q", "write -P 0xab 0 1M", "write -z 2M 1M", "write -c 4M 64k")
    qimg("create", "-q", "-f", "qcow2", "-b", "clean.q", "-F", "qcow2", "empty-overlay.q")
    qimg("create", "-q", "-f", "raw", "r.raw", "1M")
    for name, mangle in (("leak.q", make_leak), ("corrupt.q", make_corruption)):
        qimg("create", "-q", "-f", "qcow2", name, "10M")
        qio(name, "write 0 128k", "write 1M 64k")
        mangle(workdir / name)
    return workdir


@pytest.mark.parametrize("name, rc", [("empty-overlay.q", 0), ("leak.q", 3), ("corrupt.q", 2), ("r.raw", 63)])
def test_check_matches_qemu_img(pimg, qimg, images: Path, name: str, rc: int) -> None:  # type: ignore[no-untyped-def]
    for fmt in ("human", "json"):
        p = pimg("check", f"--output={fmt}", name)
        q = qimg("check", f"--output={fmt}", name)
        assert p.rc == q.rc == rc
        assert p.out == q.out
    if rc == 63:
        assert "This image format does not support checks" in p.err


def test_check_statistics_line(pimg, qimg, images: Path) -> None:  # type: ignore[no-untyped-def]
    p = pimg("check", "--output=json", "clean.q")
    q = qimg("check", "--output=json", "clean.q")
    assert p.rc == q.rc == 0
    pj, qj = json.loads(p.out), json.loads(q.out)
    for key in ("image-end-offset", "total-clusters", "allocated-clusters", "compressed-clusters", "check-errors",
                "fragmented-clusters", "filename", "format"):
        assert pj[key] == qj[key], key
    assert list(pj)[:3] == ["image-end-offset", "compressed-clusters", "total-clusters"]
    human = pimg("check", "clean.q").out.splitlines()
    reference = qimg("check", "clean.q").out.splitlines()
    assert human[0] == reference[0] == "No errors were found on the image."
    assert human[1] == reference[1] == "17/1024 = 1.66% allocated, 5.88% fragmented, 5.88% compressed clusters"
    assert human[2] == reference[2] == f"Image end offset: {qj['image-end-offset']}"


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_leaks(pimg, qimg, images: Path, mode: str) -> None:  # type: ignore[no-untyped-def]
    p = pimg("check", "-r", mode, "leak.q")
    assert p.rc == 0
    assert p.out.startswith("The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n"
                            "    0 corruptions\n\nDouble checking the fixed image now...\nNo errors were found")
    assert qimg("check", "leak.q").rc == 0


def test_repair_all_fixes_corruption(pimg, qimg, images: Path) -> None:  # type: ignore[no-untyped-def]
    p = pimg("check", "-r", "all", "--output=json", "corrupt.q")
    assert p.rc == 0
    assert json.loads(p.out)["corruptions-fixed"] >= 1
    assert qimg("check", "corrupt.q").rc == 0
