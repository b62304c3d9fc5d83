"""``snapshot``, ``rebase`` and ``commit`` against qemu-img 7.2: the guest-visible contents stay as qemu-img
leaves them (qemu-img compare), the resulting allocation maps are the same, qemu-img check finds the images
clean, and error messages/exit codes agree."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest

from img_marks import needs_qemu_img  # type: ignore[import-not-found]

pytestmark = needs_qemu_img


def _maps(qimg, *names: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Allocation maps without host offsets (where a cluster lands in the file is the driver's choice)."""
    return [re.sub(r', "offset": \d+', "", qimg("map", "--output=json", name).out) for name in names]


def _chain(qimg, qio) -> None:  # type: ignore[no-untyped-def]
    for name in ("b.q", "m.q", "t.q"):
        Path(name).unlink(missing_ok=True)
    qimg("create", "-q", "-f", "qcow2", "b.q", "4M")
    qio("b.q", "write -P 1 0 1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "b.q", "-F", "qcow2", "m.q")
    qio("m.q", "write -P 7 512k 64k")
    qimg("create", "-q", "-f", "qcow2", "-b", "m.q", "-F", "qcow2", "t.q")
    qio("t.q", "write -P 9 3M 64k", "write -z 0 64k")


def test_snapshots(pimg, qimg, qio, workdir: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    qimg("create", "-q", "-f", "qcow2", "s.q", "1M")
    qio("s.q", "write -P 1 0 64k")
    assert pimg("snapshot", "-c", "first", "s.q").rc == 0
    qio("s.q", "write -P 2 0 64k")
    assert pimg("snapshot", "-c", "a rather long snapshot name", "s.q").rc == 0
    listing = pimg("snapshot", "-l", "s.q")
    assert listing.out == qimg("snapshot", "-l", "s.q").out
    assert listing.out.splitlines()[:2] == [
        "Snapshot list:", "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"]
    assert pimg("info", "--output=json", "s.q").out == qimg("info", "--output=json", "s.q").out
    assert pimg("snapshot", "-a", "first", "s.q").rc == 0
    qio("s.q", "read -P 1 0 64k")
    assert qimg("check", "s.q").rc == 0
    for args, message in [(["-d", "nope", "s.q"], "Could not delete snapshot 'nope': snapshot not found"),
                          (["-a", "nope", "s.q"], "Could not apply snapshot 'nope':"),
                          (["-l", "-c", "x", "s.q"], "Cannot mix '-l', '-a', '-c', '-d'")]:
        p, q = pimg("snapshot", *args), qimg("snapshot", *args)
        assert p.rc == q.rc == 1
        assert error_line(p).startswith(message)
    assert pimg("snapshot", "-d", "first", "s.q").rc == 0
    assert [line.split()[1] for line in qimg("snapshot", "-l", "s.q").out.splitlines()[2:]] == ["a"]
    assert pimg("snapshot", "s.q").out == ""  # no action: nothing happens, as in qemu-img
    qimg("create", "-q", "-f", "raw", "r.raw", "1M")
    assert pimg("snapshot", "-l", "r.raw").out == ""


@pytest.mark.parametrize("args", [["t.q"], ["-b", "b.q", "t.q"], ["-d", "t.q"], ["m.q"]])
def test_commit_matches_qemu_img(pimg, qimg, qio, workdir: Path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    _chain(qimg, qio)
    qimg("convert", "-O", "raw", "t.q", "t.raw")
    assert qimg("commit", "-q", *args).rc == 0
    reference = _maps(qimg, "b.q", "m.q", "t.q")
    _chain(qimg, qio)
    p = pimg("commit", *args)
    assert (p.rc, p.out) == (0, "Image committed.\n")
    assert _maps(qimg, "b.q", "m.q", "t.q") == reference
    assert qimg("compare", "t.q", "t.raw").rc == 0
    for name in ("b.q", "m.q", "t.q"):
        assert qimg("check", name).rc == 0


def test_commit_errors(pimg, qimg, qio, workdir: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    _chain(qimg, qio)
    for args, message in [(["b.q"], "Image does not have a backing file"),
                          (["-b", "nonexist", "t.q"], "Did not find 'nonexist' in the backing chain of 't.q'")]:
        p, q = pimg("commit", *args), qimg("commit", *args)
        assert p.rc == q.rc == 1
        assert error_line(p) == message


def _rebase_setup(qimg: Callable[..., object], qio: Callable[..., None]) -> None:
    for name in ("b1.q", "b2.q", "ov.q"):
        Path(name).unlink(missing_ok=True)
    qimg("create", "-q", "-f", "qcow2", "b1.q", "4M")
    qio("b1.q", "write -P 1 0 1M", "write -P 3 3M 512")
    qimg("create", "-q", "-f", "qcow2", "b2.q", "4M")
    qio("b2.q", "write -P 1 0 512k", "write -P 2 2M 64k")
    qimg("create", "-q", "-f", "qcow2", "-b", "b1.q", "-F", "qcow2", "ov.q")
    qio("ov.q", "write -P 9 3M 64k")
    qimg("convert", "-O", "raw", "ov.q", "flat.raw")


@pytest.mark.parametrize("args", [["-b", "b2.q", "-F", "qcow2"], ["-b", ""], ["-u", "-b", "b2.q", "-F", "qcow2"]])
def test_rebase_matches_qemu_img(pimg, qimg, qio, workdir: Path, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    _rebase_setup(qimg, qio)
    assert qimg("rebase", *args, "ov.q").rc == 0
    reference = (_maps(qimg, "ov.q"), qimg("info", "ov.q").out)
    _rebase_setup(qimg, qio)
    p = pimg("rebase", *args, "ov.q")
    assert (p.rc, p.out) == (0, "")
    assert (_maps(qimg, "ov.q"), qimg("info", "ov.q").out) == reference
    assert qimg("check", "ov.q").rc == 0
    if "-u" not in args:
        assert qimg("compare", "ov.q", "flat.raw").rc == 0


def test_rebase_errors(pimg, qimg, qio, workdir: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    _rebase_setup(qimg, qio)
    for args, message in [
        (["-b", "b2.q", "ov.q"], "Could not change the backing file to 'b2.q': backing format must be specified"),
        (["ov.q"], "Must specify backing file (-b) or use unsafe mode (-u)"),
        (["-b", "nonexist", "-F", "qcow2", "ov.q"], "Could not open new backing file 'nonexist': "),
    ]:
        p, q = pimg("rebase", *args), qimg("rebase", *args)
        assert p.rc == q.rc == 1
        assert error_line(p).startswith(message)
    assert qimg("compare", "ov.q", "flat.raw").rc == 0
