"""``convert`` against qemu-img 7.2: identical contents (qemu-img compare), the same allocation map (holes
stay holes, -S, -c), backing chains flattened, -B copying only differences, -n into existing images,
several sources concatenated, out-of-order workers, progress output."""

from __future__ import annotations

from pathlib import Path

import pytest

from img_marks import needs_qemu_img  # type: ignore[import-not-found]

pytestmark = needs_qemu_img

MiB = 1 << 20


@pytest.fixture
def sources(qimg, qio, workdir: Path) -> Path:  # type: ignore[no-untyped-def]
    # A raw file with data, zero runs inside the data and a hole: tests -S.
    with open("src.raw", "wb") as f:
        f.write(b"\1" * 4096 + bytes(8192) + b"\2" * 100 + bytes(4096 - 100) + bytes(2048) + b"\3" * 2048
                + bytes(MiB))
        f.truncate(2 * MiB)
    qimg("create", "-q", "-f", "qcow2", "base.q", "8M")
    qio("base.q", "write -P 0xab 0 1M", "write -z 2M 1M", "write -c -P 7 4M 64k", "write -P 9 6M 100k")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.q", "-F", "qcow2", "ov.q")
    qio("ov.q", "write -P 1 512k 128k", "write -z 6M 64k", "write -P 2 7M 4k")
    return workdir


def _map(qimg, name: str) -> str:  # type: ignore[no-untyped-def]
    result = qimg("map", "--output=json", name)
    assert result.rc == 0, result.err
    return result.out


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "src.raw"],
    ["-O", "raw", "src.raw"],
    ["-S", "0", "-O", "qcow2", "src.raw"],
    ["-O", "qcow2", "-S", "8k", "-o", "cluster_size=4k", "src.raw"],
    ["-O", "qcow2", "-c", "src.raw"],
    ["-O", "qcow2", "ov.q"],
    ["-O", "raw", "ov.q"],
    ["-O", "qcow2", "-c", "ov.q"],
    ["-O", "qcow2", "-o", "compat=0.10", "ov.q"],
    ["-O", "qcow2", "-B", "base.q", "-F", "qcow2", "ov.q"],
    ["-O", "qcow2", "ov.q", "src.raw", "base.q"],
])
def test_convert_same_content_and_map(pimg, qimg, sources: Path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    q = qimg("convert", *args, "q.img")
    p = pimg("convert", *args, "p.img")
    assert p.rc == q.rc == 0, p.err
    assert p.out == q.out == ""
    assert qimg("compare", "p.img", "q.img").rc == 0
    assert _map(qimg, "p.img") == _map(qimg, "q.img")
    if "qcow2" in args:
        assert qimg("check", "p.img").rc == 0
        # pyemu-img reads what it wrote the same way qemu-img does.
        assert pimg("compare", "p.img", "q.img").rc == 0


def test_backing_flag_copies_only_differences(pimg, qimg, qio, sources: Path) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "raw", "other.raw", "8M")
    qio("other.raw", "write -P 0xab 0 512k", "write -P 5 1M 1M", fmt="raw")
    p = pimg("convert", "-O", "qcow2", "-B", "other.raw", "-F", "raw", "ov.q", "p.q")
    assert p.rc == 0
    # Unlike qemu-img (which assumes the new backing file matches the source's), the result reads exactly
    # as the source, and what the backing file already holds was not copied.
    assert qimg("compare", "p.q", "ov.q").rc == 0
    first = _map(qimg, "p.q").splitlines()[0]
    assert '"depth": 1' in first and '"start": 0, "length": 524288' in first
    info = pimg("info", "p.q").out
    assert "backing file: other.raw\nbacking file format: raw" in info


def test_existing_target_and_errors(pimg, qimg, qio, sources: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "raw", "big.raw", "8M")
    qio("big.raw", "write -P 3 0 8M", fmt="raw")
    assert pimg("convert", "-n", "-O", "raw", "ov.q", "big.raw").rc == 0
    assert qimg("compare", "-f", "raw", "big.raw", "ov.q").rc == 0
    qimg("create", "-q", "-f", "raw", "small.raw", "1M")
    for args, message in [
        (["-n", "-O", "raw", "ov.q", "small.raw"], "output file is smaller than input file"),
        (["-n", "-o", "cluster_size=4k", "ov.q", "big.raw"], "-o has no effect when skipping image creation"),
        (["--target-is-zero", "ov.q", "x.raw"], "--target-is-zero requires use of -n flag"),
        (["-O", "qcow2", "-B", "base.q", "ov.q", "x.q"], "Use of backing file requires explicit backing format"),
        (["-O", "raw", "-c", "ov.q", "x.raw"], "Compression not supported for this file format"),
        (["-O", "raw", "-B", "base.q", "-F", "qcow2", "ov.q", "x.raw"], "Backing file not supported"),
        (["ov.q"], "Must specify image file name"),
    ]:
        q, p = qimg("convert", *args), pimg("convert", *args)
        assert p.rc == q.rc == 1, args
        assert message in error_line(p)


def test_parallel_and_progress(pimg, qimg, sources: Path) -> None:  # type: ignore[no-untyped-def]
    p = pimg("convert", "-p", "-W", "-m", "4", "-O", "qcow2", "ov.q", "src.raw", "p.q")
    assert p.rc == 0
    assert p.out.startswith("    (0.00/100%)\r") and p.out.endswith("    (100.00/100%)\r\n")
    assert qimg("info", "p.q").out.count("virtual size: 10 MiB (10485760 bytes)") == 1
    assert qimg("check", "p.q").rc == 0
    qimg("convert", "-O", "raw", "ov.q", "src.raw", "q.raw")
    assert qimg("compare", "p.q", "q.raw").rc == 0
