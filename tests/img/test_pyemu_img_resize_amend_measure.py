"""``resize``, ``amend``, ``measure`` and ``bench`` against qemu-img 7.2: same messages and exit codes, the
same virtual sizes and header fields afterwards, identical ``measure`` figures for many sizes and options."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from img_marks import needs_qemu_img  # type: ignore[import-not-found]

pytestmark = needs_qemu_img


def _virtual(qimg, name: str) -> int:  # type: ignore[no-untyped-def]
    return int(json.loads(qimg("info", "--output=json", name).out)["virtual-size"])


@pytest.mark.parametrize("args, size, rc", [
    (["2M"], 2 << 20, 0), (["+1M"], 2 << 20, 0), (["--", "-512k"], 1 << 20, 1), (["--shrink", "--", "-512k"], 512 << 10, 0),
    (["--shrink", "512k"], 512 << 10, 0), (["1M"], 1 << 20, 0), (["--shrink", "1000"], 1 << 20, 1), (["x"], 1 << 20, 1),
    (["0"], 1 << 20, 1), (["-2M"], 1 << 20, 1),
])
def test_resize_qcow2(pimg, qimg, qio, workdir: Path, args: list[str], size: int, rc: int) -> None:  # type: ignore[no-untyped-def]
    for tool, name in ((qimg, "q.q"), (pimg, "p.q")):
        qimg("create", "-q", "-f", "qcow2", name, "1M")
        qio(name, "write -P 1 0 1M")
        *opts, size_arg = args
        result = tool("resize", *opts, name, size_arg)
        assert result.rc == rc, (tool, result.err)
        assert result.out == ("Image resized.\n" if rc == 0 else "")
        assert _virtual(qimg, name) == size
        assert qimg("check", name).rc == 0
    if rc:
        p = pimg("resize", *args[:-1], "p.q", args[-1])
        q = qimg("resize", *args[:-1], "q.q", args[-1])
        assert q.err.splitlines()[0].removeprefix("qemu-img: ") in p.err


def test_resize_raw(pimg, qimg, workdir: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "raw", "r", "1M")
    assert error_line(pimg("resize", "-f", "raw", "r", "512k")) == \
        "Use the --shrink option to perform a shrink operation."
    assert pimg("resize", "--shrink", "-f", "raw", "r", "512k").out == "Image resized.\n"
    assert os.path.getsize("r") == 512 << 10
    assert pimg("resize", "-f", "raw", "r", "1.5M").rc == 0
    assert os.path.getsize("r") == 1536 << 10
    assert pimg("resize", "--preallocation=full", "-f", "raw", "r", "2M").rc == 0
    assert os.stat("r").st_blocks * 512 >= 512 << 10


@pytest.mark.parametrize("opts", ["compat=0.10", "compat=1.1,lazy_refcounts=on", "size=2M", "size=512k",
                                  "refcount_bits=16"])
def test_amend_matches_qemu_img(pimg, qimg, qio, workdir: Path, opts: str) -> None:  # type: ignore[no-untyped-def]
    infos = []
    for tool, name in ((qimg, "q.q"), (pimg, "p.q")):
        qimg("create", "-q", "-f", "qcow2", name, "1M")
        qio(name, "write -P 1 0 64k", "write -z 64k 64k")
        result = tool("amend", "-o", opts, name)
        assert (result.rc, result.out) == (0, ""), result.err
        assert qimg("check", name).rc == 0
        info = json.loads(qimg("info", "--output=json", name).out)
        for key in ("filename", "actual-size"):
            info.pop(key)
        infos.append(info)
    assert infos[0] == infos[1]
    assert qimg("compare", "p.q", "q.q").rc == 0


def test_amend_errors(pimg, qimg, workdir: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "a.q", "1M")
    qimg("create", "-q", "-f", "raw", "r", "1M")
    for args, message in [
        (["a.q"], "Must specify options (-o)"),
        (["-o", "cluster_size=4k", "a.q"], "Invalid parameter 'cluster_size'"),
        (["-o", "foo=1", "a.q"], "Invalid parameter 'foo'"),
        (["-o", "lazy_refcounts=on,compat=0.10", "a.q"], "Lazy refcounts only supported with compatibility level 1.1"),
        (["-o", "backing_file=x,backing_fmt=raw", "a.q"], "Cannot amend the backing file"),
        (["-f", "raw", "-o", "size=2M", "r"], "Format driver 'raw' does not support option amendment"),
    ]:
        p, q = pimg("amend", *args), qimg("amend", *args)
        assert p.rc == q.rc == 1, args
        assert error_line(p).startswith(message)


def test_measure_matches_qemu_img(pimg, qimg, qio, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    cases = []
    for size in ("0", "1", "64k", "10M", "1G", "100G", "2T"):
        for opts in ([], ["-o", "cluster_size=512"], ["-o", "cluster_size=4k,refcount_bits=1"],
                     ["-o", "cluster_size=2M"], ["-o", "extended_l2=on,cluster_size=16k,refcount_bits=64"],
                     ["-o", "preallocation=metadata"], ["-o", "preallocation=full"]):
            cases.append(["-O", "qcow2", *opts, "--size", size])
    cases.append(["-O", "raw", "--size", "1G"])
    for args in cases:
        p = pimg("measure", "--output=json", *args)
        q = qimg("measure", "--output=json", *args)
        assert (p.rc, p.out) == (q.rc, q.out), args
    qimg("create", "-q", "-f", "qcow2", "base.q", "8M")
    qio("base.q", "write -P 0xab 0 1M", "write -z 2M 1M", "write -c -P 7 4M 64k", "write -P 9 6M 100k")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.q", "-F", "qcow2", "ov.q")
    qio("ov.q", "write -P 1 512k 128k", "write -P 2 7M 4k")
    qimg("create", "-q", "-f", "raw", "r", "3M")
    qio("r", "write -P 5 1M 1M", "write -P 5 2500k 1k", fmt="raw")
    for name in ("base.q", "ov.q", "r"):
        for opts in ([], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"], ["--output=json", "-O", "qcow2"]):
            p, q = pimg("measure", *opts, name), qimg("measure", *opts, name)
            assert (p.rc, p.out) == (q.rc, q.out), (name, opts)


def test_bench(pimg, qimg, workdir: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "b.q", "8M")
    p = pimg("bench", "-c", "500", "-d", "4", "-w", "--pattern=5", "--flush-interval=100", "b.q")
    lines = p.out.splitlines()
    assert p.rc == 0
    assert lines[0] == "Sending 500 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)"
    assert lines[1] == "Sending flush every 100 requests"
    assert re.fullmatch(r"Run completed in \d+\.\d{3} seconds\.", lines[2])
    assert qimg("check", "b.q").rc == 0
    assert qimg("compare", "b.q", "b.q").rc == 0
    p = pimg("bench", "-c", "200", "-s", "64k", "-S", "128k", "-o", "64k", "b.q")
    assert p.out.startswith("Sending 200 read requests, 65536 bytes each, 64 in parallel (starting at offset 65536, "
                            "step size 131072)\n")
    for args, message in [(["-c", "x", "b.q"], "Invalid request count specified"),
                          (["--flush-interval=10", "b.q"], "--flush-interval is only available in write tests"),
                          (["-w", "--flush-interval=10", "b.q"], "Flush interval can't be smaller than depth"),
                          (["-c", "1", "-o", "8M", "b.q"], "Failed request: ")]:
        p = pimg("bench", *args)
        assert p.rc == 1
        assert message in p.err and "Traceback" not in p.err
