"""``pyemu-img bitmap`` and the ``bitmaps`` of ``pyemu-img info``, side by side with qemu-img 7.2: the same
command lines give the same images (read back by the other tool), the same info output byte for byte
(human and JSON) and the same error messages."""

from __future__ import annotations

import json

import pytest

from img_marks import needs_qemu_img

pytestmark = needs_qemu_img
MiB = 1 << 20


def _bitmaps(result) -> list[dict]:  # type: ignore[no-untyped-def]
    return json.loads(result.out)["format-specific"]["data"].get("bitmaps", [])


@pytest.mark.parametrize("maker", ["pyemu", "qemu"])
def test_same_commands_same_image(maker, pimg, qimg, qio) -> None:  # type: ignore[no-untyped-def]
    run = pimg if maker == "pyemu" else qimg
    assert qimg("create", "-q", "-f", "qcow2", "a.qcow2", "16M").rc == 0
    steps = [("--add", "a.qcow2", "b0"),
             ("--add", "-g", "4k", "--disable", "a.qcow2", "b1"),
             ("--add", "-g", "512", "a.qcow2", "b2")]
    for step in steps:
        result = run("bitmap", *step)
        assert result.rc == 0, result.err
    qio("a.qcow2", "write 0 64k", "write 5M 4k")  # dirties the enabled bitmaps (QEMU opens them)
    for step in [("--merge", "b0", "a.qcow2", "b1"), ("--clear", "a.qcow2", "b2"), ("--enable", "a.qcow2", "b1"),
                 ("--remove", "a.qcow2", "b0")]:
        result = run("bitmap", *step)
        assert result.rc == 0, result.err
    for args in (("info", "a.qcow2"), ("info", "--output=json", "a.qcow2")):
        ours, theirs = pimg(*args), qimg(*args)
        assert ours.rc == theirs.rc == 0
        assert ours.out == theirs.out
    assert _bitmaps(qimg("info", "--output=json", "a.qcow2")) == [
        {"flags": ["auto"], "name": "b1", "granularity": 4096},
        {"flags": ["auto"], "name": "b2", "granularity": 512}]
    check = qimg("check", "a.qcow2")
    assert check.rc == 0 and "No errors were found" in check.out, check.out
    for args in (("check", "a.qcow2"), ("check", "--output=json", "a.qcow2")):  # bitmap clusters are no leaks
        ours, theirs = pimg(*args), qimg(*args)
        assert (ours.rc, ours.out) == (theirs.rc, theirs.out)


def test_info_shows_in_use_flags_like_qemu_img(pimg, qimg, qio) -> None:  # type: ignore[no-untyped-def]
    assert qimg("create", "-q", "-f", "qcow2", "a.qcow2", "1M").rc == 0
    assert qimg("bitmap", "--add", "a.qcow2", "b").rc == 0
    with open("a.qcow2", "r+b") as f:  # set IN_USE by hand, as a writer that crashed leaves it
        data = f.read(65536 * 8)
        pos = data.find(b"\x23\x85\x28\x75")
        directory = int.from_bytes(data[pos + 8 + 16:pos + 8 + 24], "big")
        f.seek(directory + 12)
        f.write((3).to_bytes(4, "big"))
    for args in (("info", "a.qcow2"), ("info", "--output=json", "a.qcow2")):
        assert pimg(*args).out == qimg(*args).out
    assert _bitmaps(pimg("info", "--output=json", "a.qcow2"))[0]["flags"] == ["in-use", "auto"]
    ours = pimg("bitmap", "--clear", "a.qcow2", "b")
    theirs = qimg("bitmap", "--clear", "a.qcow2", "b")
    assert ours.rc == theirs.rc == 1
    assert "inconsistent" in ours.err and "inconsistent" in theirs.err
    assert pimg("bitmap", "--remove", "a.qcow2", "b").rc == 0
    assert _bitmaps(qimg("info", "--output=json", "a.qcow2")) == []


def test_merge_from_another_image(pimg, qimg, qio) -> None:  # type: ignore[no-untyped-def]
    for name in ("a.qcow2", "src.qcow2"):
        assert qimg("create", "-q", "-f", "qcow2", name, "4M").rc == 0
    assert qimg("bitmap", "--add", "src.qcow2", "s").rc == 0
    qio("src.qcow2", "write 1M 1k")
    assert pimg("bitmap", "--add", "--disable", "a.qcow2", "t").rc == 0
    result = pimg("bitmap", "--merge", "s", "-b", "src.qcow2", "-F", "qcow2", "a.qcow2", "t")
    assert result.rc == 0, result.err
    from pyemu.block.dirty_bitmap import bitmaps_of
    from pyemu.block.image import open_image
    node = open_image("a.qcow2", read_only=True)
    try:
        assert list(bitmaps_of(node).find("t").dirty_extents()) == [(MiB, 65536)]
    finally:
        node.close()


@pytest.mark.parametrize("args", [
    (),
    ("a.qcow2", "b"),
    ("-g", "4096", "--remove", "a.qcow2", "b"),
    ("-b", "x.qcow2", "--add", "a.qcow2", "b"),
    ("--add", "-g", "100", "a.qcow2", "b"),
    ("--add", "a.qcow2"),
    ("--add", "a.qcow2", "b", "extra"),
    ("--remove", "a.qcow2", "nope"),
    ("--add", "a.qcow2", "dup"),
    ("--merge", "nope", "a.qcow2", "dup"),
    ("--enable", "a.qcow2", "nope"),
])
def test_errors_match_qemu_img(args, pimg, qimg, error_line) -> None:  # type: ignore[no-untyped-def]
    assert qimg("create", "-q", "-f", "qcow2", "a.qcow2", "1M").rc == 0
    assert qimg("bitmap", "--add", "a.qcow2", "dup").rc == 0
    theirs = qimg("bitmap", *args)
    ours = pimg("bitmap", *args)
    assert ours.rc == theirs.rc == 1
    assert error_line(ours) == theirs.err.strip().removeprefix("qemu-img: ")


def test_raw_images_cannot_store_bitmaps(pimg, qimg, error_line) -> None:  # type: ignore[no-untyped-def]
    assert qimg("create", "-q", "-f", "raw", "r.img", "1M").rc == 0
    result = pimg("bitmap", "-f", "raw", "--add", "r.img", "x")
    assert result.rc == 1
    assert error_line(result) == "Operation add on bitmap x failed: Can't store persistent bitmaps to r.img: " \
                                 "Operation not supported"


@pytest.mark.parametrize("tool", ["pyemu", "qemu"])
def test_commit_marks_the_bitmaps_of_the_base(tool, pimg, qimg, qio) -> None:  # type: ignore[no-untyped-def]
    """Data committed into a base is a write to it: its enabled bitmaps record it (QEMU does the same)."""
    assert qimg("create", "-q", "-f", "qcow2", "base.qcow2", "16M").rc == 0
    assert qimg("bitmap", "--add", "base.qcow2", "b").rc == 0
    assert qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2").rc == 0
    qio("top.qcow2", "write 2M 64k", "write -z 5M 128k")
    result = (pimg if tool == "pyemu" else qimg)("commit", "top.qcow2")
    assert result.rc == 0, result.err
    from pyemu.block.dirty_bitmap import bitmaps_of
    from pyemu.block.image import open_image
    node = open_image("base.qcow2", read_only=True)
    try:
        assert list(bitmaps_of(node).find("b").dirty_extents()) == [(2 * MiB, 65536), (5 * MiB, 128 * 1024)]
    finally:
        node.close()
