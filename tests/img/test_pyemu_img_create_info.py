"""``create`` and ``info`` against qemu-img 7.2: the same "Formatting ..." lines, images qemu-img accepts as
clean, and ``info`` output (human and JSON) identical for images made by either tool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from img_marks import needs_qemu_img  # type: ignore[import-not-found]

pytestmark = needs_qemu_img


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "{f}", "1G"],
    ["-f", "raw", "{f}", "1.5M"],
    ["-f", "raw", "-o", "preallocation=falloc", "{f}", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on,lazy_refcounts=on,refcount_bits=8", "{f}", "10M"],
    ["-f", "qcow2", "-o", "compat=0.10", "{f}", "10M"],
    ["-f", "qcow2", "-o", "compat=v3,preallocation=metadata,cluster_size=4k", "{f}", "1M"],
    ["-f", "qcow2", "-o", "lazy_refcounts=yes", "-o", "compat=1.1", "{f}", "1000"],
    ["-f", "qcow2", "-o", "size=2M", "{f}"],
])
def test_create_matches_qemu_img(pimg, qimg, workdir: Path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    q = qimg("create", *[a.replace("{f}", "q.img") for a in args])
    p = pimg("create", *[a.replace("{f}", "p.img") for a in args])
    assert (p.rc, p.out.replace("p.img", "X")) == (q.rc, q.out.replace("q.img", "X"))
    qi = json.loads(qimg("info", "--output=json", "q.img").out)
    pi = json.loads(qimg("info", "--output=json", "p.img").out)
    for info in (qi, pi):
        info.pop("filename")
        info.pop("actual-size")
    assert pi == qi
    if qi["format"] == "qcow2":
        check = qimg("check", "p.img")
        assert check.rc == 0, check.out + check.err


def test_create_with_backing_takes_its_size(pimg, qimg, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "base.q", "3M")
    os.mkdir("d")
    p = pimg("create", "-f", "qcow2", "-b", "../base.q", "-F", "qcow2", "d/p.q")
    q = qimg("create", "-f", "qcow2", "-b", "../base.q", "-F", "qcow2", "d/q.q")
    assert p.rc == q.rc == 0
    assert p.out.replace("p.q", "X") == q.out.replace("q.q", "X")
    for tool in (pimg, qimg):
        for name in ("d/p.q", "d/q.q"):
            for fmt in ("human", "json"):
                text = tool("info", f"--output={fmt}", name).out
                assert "base.q (actual path: d/../base.q)" in text or '"full-backing-filename": "d/../base.q"' in text
    chains = [json.loads(tool("info", "--backing-chain", "--output=json", name).out.replace(name, "X"))
              for tool, name in ((pimg, "d/p.q"), (qimg, "d/q.q"))]
    for chain in chains:
        for info in chain:
            info.pop("actual-size")  # how many blocks the file occupies depends on how it was written
    assert chains[0] == chains[1] and len(chains[0]) == 2


def test_create_errors(pimg, qimg, error_line) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "a.q", "1M")
    cases = [
        (["-f", "qcow2", "-b", "a.q", "o.q"], "o.q: Backing file specified without backing format"),
        (["-f", "raw", "-b", "a.q", "-F", "qcow2", "o.r"], "o.r: Backing file not supported for file format 'raw'"),
        (["-f", "qcow2", "-o", "lazy_refcounts=foo", "o.q", "1M"], "o.q: Parameter 'lazy_refcounts' expects 'on' or 'off'"),
        (["-f", "qcow2", "-o", "foo=bar", "o.q", "1M"], "o.q: Invalid parameter 'foo'"),
        (["-f", "qcow2", "-o", "size=2M", "o.q", "1M"], "o.q: The image size must be specified only once"),
        (["-f", "raw", "o.r"], "o.r: Image creation needs a size parameter"),
        (["-f", "qcow2", "-F", "qcow2", "o.q", "1M"], "o.q: Backing format cannot be used without backing file"),
        (["-f", "qcow2", "-o", "cluster_size=1000", "o.q", "1M"], "o.q: Cluster size must be a power of two"),
    ]
    for args, message in cases:
        p = pimg("create", *args)
        q = qimg("create", *args)
        assert p.rc == q.rc == 1, args
        assert error_line(p).startswith(message), (args, p.err)


def test_info_matches_qemu_img(pimg, qimg, qio, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "base.qcow2", "64M")
    qio("base.qcow2", "write -P 0xab 0 1M", "write -z 2M 1M", "write -c 4M 64k")
    qimg("snapshot", "-c", "snap1", "base.qcow2")
    qimg("snapshot", "-c", "a longer snapshot name", "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ov.qcow2")
    qimg("create", "-q", "-f", "raw", "r.raw", "10M")
    qimg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M")
    qimg("create", "-q", "-f", "qcow2", "-u", "-b", "missing", "-F", "raw", "orphan.qcow2", "1M")
    for args in (["ov.qcow2"], ["base.qcow2"], ["r.raw"], ["v2.qcow2"], ["orphan.qcow2"], ["-U", "base.qcow2"],
                 ["--backing-chain", "ov.qcow2"], ["-f", "raw", "ov.qcow2"]):
        for fmt in ("human", "json"):
            p = pimg("info", f"--output={fmt}", *args)
            q = qimg("info", f"--output={fmt}", *args)
            assert (p.rc, p.out) == (q.rc, q.out), args
    p, q = pimg("snapshot", "-l", "base.qcow2"), qimg("snapshot", "-l", "base.qcow2")
    assert (p.rc, p.out) == (q.rc, q.out)
