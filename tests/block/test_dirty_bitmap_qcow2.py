"""Persistent dirty bitmaps in qcow2, checked against QEMU 7.2's own tools both ways: bitmaps made and
dirtied by qemu-img/qemu-io are loaded by pyemu with the same bits; bitmaps pyemu stores are listed by
``qemu-img info``, pass ``qemu-img check`` and are served with the same bits by ``qemu-nbd -B`` to
``nbdinfo --map``. Plus the crash rule (IN_USE -> inconsistent) and hostile directories."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from pyemu.block.backend import BlockBackend
from pyemu.block.dirty_bitmap import BitmapError, bitmaps_of
from pyemu.block.errors import BlockConfigError
from pyemu.block.image import open_image

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed")

MiB = 1 << 20


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


def qemu_bitmaps(path: Path) -> list[dict]:
    info = json.loads(run("qemu-img", "info", "--output=json", str(path)))
    return info["format-specific"]["data"].get("bitmaps", [])


def qemu_check_clean(path: Path) -> None:
    out = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "No errors were found" in out.stdout, out.stdout + out.stderr
    assert "leak" not in out.stdout.lower()


def qemu_extents(path: Path, name: str, tmp: Path) -> list[tuple[int, int]]:
    """Dirty extents as QEMU reads them: qemu-nbd -B NAME, nbdinfo --map=qemu:dirty-bitmap:NAME."""
    if shutil.which("qemu-nbd") is None or shutil.which("nbdinfo") is None:
        pytest.skip("qemu-nbd/nbdinfo not installed")
    sock = tmp / f"nbd-{name}.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", str(sock), "-t", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}", f"nbd+unix:///?socket={sock}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def merged(extents) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in extents:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(path), str(16 * MiB))
    return path


def test_pyemu_loads_bitmaps_qemu_made_and_dirtied(image: Path) -> None:
    run("qemu-img", "bitmap", "--add", str(image), "b1")
    run("qemu-img", "bitmap", "--add", "-g", "4096", "--disable", str(image), "b2")
    run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "write 5M 4k", "-c", "write 9000k 1k", str(image))
    node = open_image(str(image), read_only=True)
    try:
        bitmaps = {b.name: b for b in bitmaps_of(node)}
        assert set(bitmaps) == {"b1", "b2"}
        b1, b2 = bitmaps["b1"], bitmaps["b2"]
        assert (b1.granularity, b1.enabled, b1.persistent, b1.readonly) == (65536, True, True, True)
        assert (b2.granularity, b2.enabled) == (4096, False)
        expected = [(0, 65536), (5 * MiB, 65536), (9000 * 1024 // 65536 * 65536, 65536)]
        assert list(b1.dirty_extents()) == expected
        assert list(b2.dirty_extents()) == []
    finally:
        node.close()


def test_bitmaps_pyemu_writes_are_qemus(image: Path, tmp_path: Path) -> None:
    run("qemu-img", "bitmap", "--add", str(image), "old")
    node = open_image(str(image), read_only=False)
    bitmaps = bitmaps_of(node)
    bitmaps.create("fine", granularity=512, persistent=True)
    bitmaps.create("off", granularity=1 << 20, persistent=True, enabled=False)
    bitmaps.create("temp", granularity=4096)  # not persistent: gone after close
    backend = BlockBackend(node, read_only=False, id="d0")
    backend.pwritev(3 * MiB + 100, [b"a" * 1000])
    backend.write_zeroes(10 * MiB, 128 * 1024, may_unmap=False)
    backend.close()
    listed = {b["name"]: b for b in qemu_bitmaps(image)}
    assert listed == {"old": {"flags": ["auto"], "name": "old", "granularity": 65536},
                      "fine": {"flags": ["auto"], "name": "fine", "granularity": 512},
                      "off": {"flags": [], "name": "off", "granularity": 1 << 20}}
    qemu_check_clean(image)
    assert qemu_extents(image, "fine", tmp_path) == [(3 * MiB, 1536), (10 * MiB, 128 * 1024)]
    assert merged(qemu_extents(image, "old", tmp_path)) == [(3 * MiB, 65536), (10 * MiB, 128 * 1024)]
    assert qemu_extents(image, "off", tmp_path) == []
    # and back: QEMU changes them, pyemu sees the change
    run("qemu-img", "bitmap", "--clear", str(image), "fine")
    run("qemu-img", "bitmap", "--enable", str(image), "off")
    run("qemu-img", "bitmap", "--merge", "old", str(image), "off")
    run("qemu-img", "bitmap", "--remove", str(image), "old")
    node = open_image(str(image), read_only=True)
    try:
        got = {b.name: b for b in bitmaps_of(node)}
        assert set(got) == {"fine", "off"}
        assert got["fine"].count() == 0 and got["off"].enabled
        assert list(got["off"].dirty_extents()) == [(3 * MiB, MiB), (10 * MiB, MiB)]
    finally:
        node.close()


def test_removal_and_reopen_keep_the_image_clean(image: Path) -> None:
    node = open_image(str(image), read_only=False)
    bitmaps = bitmaps_of(node)
    for i in range(5):
        bitmaps.create(f"b{i}", granularity=65536, persistent=True)
    node.close()
    for round_ in range(3):  # repeated open/close does not leak clusters
        node = open_image(str(image), read_only=False)
        BlockBackend(node, read_only=False).pwritev(round_ * MiB, [b"x" * 512])
        node.close()
        qemu_check_clean(image)
    node = open_image(str(image), read_only=False)
    bitmaps_of(node).remove("b2")  # removed from the file at once
    assert "b2" not in [b["name"] for b in qemu_bitmaps_unlocked(image)]
    node.close()
    assert [b["name"] for b in qemu_bitmaps(image)] == ["b0", "b1", "b3", "b4"]
    qemu_check_clean(image)
    node = open_image(str(image), read_only=False)
    for name in ("b0", "b1", "b3", "b4"):
        bitmaps_of(node).remove(name)
    node.close()
    assert qemu_bitmaps(image) == []
    qemu_check_clean(image)


def qemu_bitmaps_unlocked(path: Path) -> list[dict]:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(path)))
    return info["format-specific"]["data"].get("bitmaps", [])


def test_a_crashed_writer_leaves_bitmaps_inconsistent(image: Path, tmp_path: Path) -> None:
    run("qemu-img", "bitmap", "--add", str(image), "b")
    node = open_image(str(image), read_only=False)
    crashed = tmp_path / "crashed.qcow2"
    shutil.copyfile(image, crashed)  # the file as a crash would leave it: bitmaps flagged in use
    node.close()
    assert qemu_bitmaps(image)[0]["flags"] == ["auto"]
    assert qemu_bitmaps(crashed)[0]["flags"] == ["in-use", "auto"]
    node = open_image(str(crashed), read_only=False)
    bitmap = bitmaps_of(node).get("b")
    assert bitmap is not None and bitmap.inconsistent
    assert bitmap.info()["inconsistent"] is True and bitmap.info()["recording"] is False
    with pytest.raises(BitmapError, match="inconsistent"):
        bitmaps_of(node).clear("b")
    node.close()
    assert qemu_bitmaps(crashed)[0]["flags"] == ["in-use", "auto"]  # still untrusted after a clean close
    qemu_check_clean(crashed)
    node = open_image(str(crashed), read_only=False)
    bitmaps_of(node).remove("b")
    node.close()
    assert qemu_bitmaps(crashed) == []
    qemu_check_clean(crashed)


def test_read_only_open_loads_read_only_bitmaps(image: Path) -> None:
    run("qemu-img", "bitmap", "--add", str(image), "b")
    node = open_image(str(image), read_only=True)
    try:
        with pytest.raises(BitmapError, match="Bitmap 'b' is readonly and cannot be modified"):
            bitmaps_of(node).clear("b")
        with pytest.raises(BitmapError, match="read-only"):
            bitmaps_of(node).create("p", granularity=65536, persistent=True)
    finally:
        node.close()
    assert qemu_bitmaps(image)[0]["flags"] == ["auto"]


def test_v2_images_cannot_store_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10", str(path), "1M")
    node = open_image(str(path), read_only=False)
    try:
        with pytest.raises(BitmapError, match="Cannot store dirty bitmaps in qcow2 v2 files"):
            bitmaps_of(node).create("p", granularity=65536, persistent=True)
    finally:
        node.close()


def _extension(path: Path) -> tuple[int, int, int, int]:
    """(offset of the extension data, nb_bitmaps, directory size, directory offset)."""
    data = path.read_bytes()[:65536]
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == 0x23852875:
            nb, _, size, offset = struct.unpack_from(">IIQQ", data, pos + 8)
            return pos + 8, nb, size, offset
        assert kind != 0
        pos += 8 + (length + 7) // 8 * 8


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage", ["dir-offset", "dir-size", "count", "name-size", "type", "gbits",
                                    "table-size", "table-offset", "table-entry", "flags", "table-at-l1",
                                    "data-at-reftable", "data-twice"])
def test_hostile_bitmap_directory_is_refused_by_name(image: Path, damage: str) -> None:
    run("qemu-img", "bitmap", "--add", str(image), "b")
    run("qemu-img", "bitmap", "--add", str(image), "c")
    run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", str(image))
    ext, nb, size, offset = _extension(image)
    entry = offset
    table_offset = struct.unpack_from(">Q", image.read_bytes(), entry)[0]
    patches = {
        "dir-offset": (ext + 16, struct.pack(">Q", 1 << 50)),
        "dir-size": (ext + 8, struct.pack(">Q", 1 << 40)),
        "count": (ext, struct.pack(">I", 70000)),
        "name-size": (entry + 18, struct.pack(">H", 0)),
        "type": (entry + 16, bytes([7])),
        "gbits": (entry + 17, bytes([40])),
        "table-size": (entry + 8, struct.pack(">I", 1 << 30)),
        "table-offset": (entry, struct.pack(">Q", 12345)),
        "table-entry": (table_offset, struct.pack(">Q", (1 << 60) | 0x10000)),
        "flags": (entry + 12, struct.pack(">I", 0x80)),
        "table-at-l1": (entry, struct.pack(">Q", struct.unpack_from(">Q", image.read_bytes(), 40)[0])),
        # bitmap c's data cluster (its entry follows b's 32-byte entry) is b's data cluster
        "data-twice": (struct.unpack_from(">Q", image.read_bytes(), entry + 32)[0],
                       struct.pack(">Q", struct.unpack_from(">Q", image.read_bytes(), table_offset)[0])),
        "data-at-reftable": (table_offset, struct.pack(">Q", struct.unpack_from(">Q", image.read_bytes(), 48)[0])),
    }
    _patch(image, *patches[damage])
    for read_only in (True, False):
        with pytest.raises(BlockConfigError) as info:
            open_image(str(image), read_only=read_only)
        assert "bitmap" in str(info.value).lower()


def test_stale_extension_after_a_bitmap_unaware_writer_is_ignored(image: Path) -> None:
    run("qemu-img", "bitmap", "--add", str(image), "b")
    with open(image, "r+b") as f:  # clear autoclear bit 0, as a program without bitmap support does
        f.seek(88)
        autoclear = struct.unpack(">Q", f.read(8))[0]
        f.seek(88)
        f.write(struct.pack(">Q", autoclear & ~1))
    node = open_image(str(image), read_only=False)
    assert len(bitmaps_of(node)) == 0
    node.close()
    assert qemu_bitmaps(image) == []


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed")
def test_bitmap_qemu_system_added_over_qmp_and_dirtied(image: Path, tmp_path: Path) -> None:
    """A running QEMU adds a persistent bitmap over QMP, its block layer writes (HMP qemu-io), it quits:
    pyemu reads exactly the granules QEMU marked."""
    import asyncio

    from qemu.qmp import QMPClient

    sock = tmp_path / "qmp.sock"

    async def scenario() -> None:
        proc = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-M", "none", "-S", "-nodefaults", "-display", "none",
            "-drive", f"file={image},format=qcow2,if=none,id=drive0",
            "-qmp", f"unix:{sock},server=on,wait=off",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            for _ in range(600):
                if sock.exists():
                    break
                await asyncio.sleep(0.1)
            client = QMPClient("pyemu-test")
            await client.connect(str(sock))
            await client.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "q", "granularity": 4096,
                                                            "persistent": True})
            for command in ('qemu-io drive0 "write 0 64k"', 'qemu-io drive0 "write 7M 100"',
                            'qemu-io drive0 "write -z 12M 1M"'):
                out = await client.execute("human-monitor-command", {"command-line": command})
                assert "error" not in str(out).lower(), out
            await client.execute("quit")
            try:
                await client.disconnect()
            except EOFError:
                pass  # QEMU hung up after quit and qemu.qmp's reader saw it first (the client's documented way)
        finally:
            await asyncio.wait_for(proc.wait(), 60)

    asyncio.run(scenario())
    assert qemu_bitmaps(image) == [{"flags": ["auto"], "name": "q", "granularity": 4096}]
    node = open_image(str(image), read_only=True)
    try:
        bitmap = bitmaps_of(node).find("q")
        assert list(bitmap.dirty_extents()) == [(0, 65536), (7 * MiB, 4096), (12 * MiB, MiB)]
    finally:
        node.close()


@pytest.mark.parametrize("new_size", [40 * MiB, 8 * MiB])
def test_resize_resizes_the_bitmaps_as_qemu_does(tmp_path: Path, new_size: int) -> None:
    from pyemu.img.cli import main as pyemu_img

    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", str(ours), str(16 * MiB))
    run("qemu-img", "bitmap", "--add", "-g", "512", str(ours), "b")
    run("qemu-io", "-f", "qcow2", "-c", "write 1M 4k", "-c", "write 15M 1M", str(ours))
    shutil.copyfile(ours, theirs)
    shrink = ["--shrink"] if new_size < 16 * MiB else []
    run("qemu-img", "resize", *shrink, str(theirs), str(new_size))
    assert pyemu_img(["resize", *shrink, str(ours), str(new_size)]) == 0
    for path in (ours, theirs):
        qemu_check_clean(path)
        run("qemu-io", "-f", "qcow2", "-c", f"write {new_size - 4096} 4k", str(path))  # QEMU can use it
        node = open_image(str(path), read_only=True)
        try:
            extents = list(bitmaps_of(node).find("b").dirty_extents())
        finally:
            node.close()
        expected = [(MiB, 4096)] + ([(15 * MiB, MiB)] if new_size > 16 * MiB else []) + [(new_size - 4096, 4096)]
        assert extents == expected, path


def test_resize_is_refused_with_an_inconsistent_bitmap(image: Path, tmp_path: Path) -> None:
    run("qemu-img", "bitmap", "--add", str(image), "b")
    node = open_image(str(image), read_only=False)
    crashed = tmp_path / "crashed.qcow2"
    shutil.copyfile(image, crashed)
    node.close()
    node = open_image(str(crashed), read_only=False)
    try:
        with pytest.raises(Exception, match="Failed to resize bitmaps: Bitmap 'b' is inconsistent"):
            node.truncate(32 * MiB)  # type: ignore[attr-defined]
        assert node.size() == 16 * MiB
    finally:
        node.close()
    qemu_check_clean(crashed)


def test_downgrade_to_v2_is_refused_while_bitmaps_exist(image: Path) -> None:
    from pyemu.img.cli import main as pyemu_img

    run("qemu-img", "bitmap", "--add", str(image), "b")
    before = image.read_bytes()
    assert pyemu_img(["amend", "-o", "compat=0.10", str(image)]) == 1
    assert qemu_bitmaps(image) == [{"flags": ["auto"], "name": "b", "granularity": 65536}]
    qemu_check_clean(image)
    run("qemu-img", "bitmap", "--remove", str(image), "b")
    assert pyemu_img(["amend", "-o", "compat=0.10", str(image)]) == 0
    qemu_check_clean(image)
    assert before != image.read_bytes()


def test_random_damage_to_the_bitmap_metadata_never_escapes_as_a_traceback(image: Path, tmp_path: Path) -> None:
    """Flip random bytes of the extension, the directory and the bitmap table: opening either works (and
    then reading every extent works) or fails with BlockConfigError naming the image -- nothing else."""
    import random

    run("qemu-img", "bitmap", "--add", "-g", "4096", str(image), "first")
    run("qemu-img", "bitmap", "--add", str(image), "second")
    run("qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "write 8M 1M", str(image))
    pristine = image.read_bytes()
    ext, _nb, size, offset = _extension(image)
    table = struct.unpack_from(">Q", pristine, offset)[0]
    regions = [(ext, 24), (offset, size), (table, 8)]
    rng = random.Random(11)
    victim = tmp_path / "victim.qcow2"
    outcomes = {"opened": 0, "refused": 0}
    for _ in range(150):
        data = bytearray(pristine)
        for _ in range(rng.randint(1, 4)):
            start, length = rng.choice(regions)
            data[start + rng.randrange(length)] = rng.randrange(256)
        victim.write_bytes(bytes(data))
        try:
            node = open_image(str(victim), read_only=rng.random() < 0.5)
        except BlockConfigError as exc:
            assert "victim.qcow2" in str(exc)
            outcomes["refused"] += 1
            continue
        try:
            for bitmap in bitmaps_of(node):
                list(bitmap.dirty_extents())
        finally:
            node.close()
        outcomes["opened"] += 1
    assert outcomes["refused"] > 0
