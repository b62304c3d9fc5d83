"""``map`` and ``compare`` against qemu-img 7.2: identical output and exit codes on raw files, qcow2 images
with zero and compressed clusters, backing chains (depth), windows (--start-offset/--max-length), size
mismatches and strict mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from img_marks import needs_qemu_img  # type: ignore[import-not-found]

pytestmark = needs_qemu_img


@pytest.fixture
def chain(qimg, qio, workdir: Path) -> Path:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "base.qcow2", "4M")
    qio("base.qcow2", "write -P 0xab 0 128k", "write -z 1M 64k", "write -c -P 5 2M 64k")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")
    qio("ov.qcow2", "write -P 1 64k 128k", "write -z 2M 64k")
    qimg("create", "-q", "-f", "raw", "r.raw", "4M")
    qio("r.raw", "write -P 1 64k 64k", "write -P 1 1M 4k", fmt="raw")
    qimg("create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", "big-over-raw.q", "8M")
    os.mkdir("d")
    qimg("create", "-q", "-f", "qcow2", "-b", "../ov.qcow2", "-F", "qcow2", "d/top.q")
    return workdir


@pytest.mark.parametrize("args", [
    ["ov.qcow2"], ["base.qcow2"], ["r.raw"], ["big-over-raw.q"], ["d/top.q"], ["-f", "raw", "ov.qcow2"],
    ["--start-offset=70000", "--max-length=1000000", "ov.qcow2"], ["--start-offset=4M", "ov.qcow2"],
    ["--start-offset=5M", "ov.qcow2"], ["--max-length=0", "ov.qcow2"], ["--start-offset=x", "ov.qcow2"],
])
def test_map_matches_qemu_img(pimg, qimg, chain: Path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    for fmt in ("json", "human"):
        p = pimg("map", f"--output={fmt}", *args)
        q = qimg("map", f"--output={fmt}", *args)
        assert (p.rc, p.out) == (q.rc, q.out), (fmt, args, p.err)
        if q.rc:
            assert p.err.strip().startswith("pyemu-img: ")


def test_map_human_refuses_compressed(pimg, chain: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    p = pimg("map", "base.qcow2")
    assert p.rc == 1
    assert error_line(p) == "File contains external, encrypted or compressed clusters."


def test_compare_matches_qemu_img(pimg, qimg, qio, chain: Path) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "raw", "a", "1M")
    qimg("create", "-q", "-f", "raw", "b", "2M")
    qimg("create", "-q", "-f", "qcow2", "a.q", "1M")
    qimg("create", "-q", "-f", "qcow2", "b.q", "1M")
    qio("a.q", "write -P 0 64k 64k")
    qio("b.q", "write -z 128k 64k")
    qimg("convert", "-O", "raw", "ov.qcow2", "flat.raw")
    steps = [
        ["a", "b"], ["-s", "a", "b"], ["-p", "a", "a"], ["a.q", "b.q"], ["-s", "a.q", "b.q"], ["-s", "b.q", "a.q"],
        ["ov.qcow2", "flat.raw"], ["-s", "ov.qcow2", "flat.raw"], ["d/top.q", "flat.raw"], ["ov.qcow2", "base.qcow2"],
        ["-f", "qcow2", "-F", "raw", "ov.qcow2", "flat.raw"], ["a", "missing"], ["a"],
    ]
    for args in steps:
        p, q = pimg("compare", *args), qimg("compare", *args)
        assert (p.rc, p.out) == (q.rc, q.out), (args, p.err)
    qio("b", "write -P 1 1536k 512", fmt="raw")
    qio("a", "write -P 1 4097 1", fmt="raw")
    for args in (["b", "a"], ["a", "b"], ["-q", "a", "b"]):
        p, q = pimg("compare", *args), qimg("compare", *args)
        assert (p.rc, p.out) == (q.rc, q.out), args
    assert pimg("compare", "a", "b").out == "Content mismatch at offset 4096!\n"
