"""QMP dirty bitmap commands through ``pyemu.VM`` (in-process): add/remove/clear/enable/disable/merge,
``query-block``'s ``dirty-bitmaps``, QEMU 7.2's error messages, and persistence across a restart checked
with ``qemu-img info`` and ``qemu-nbd -B`` + ``nbdinfo``.

The guest here only spins; the writes go through the drive's BlockBackend, the object the virtio-blk
device writes through, so they take the device's path to the bitmaps. A Linux guest writing with ``dd``
is in tests/boot/test_bitmap_linux.py (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import pyemu
from pyemu.api.errors import CommandError
from pyemu.target.x86.boot.synthetic import make_multiboot_binary

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

MiB = 1 << 20


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture
def disks(short_dir: Path) -> tuple[Path, Path]:
    qcow2 = short_dir / "d.qcow2"
    raw = short_dir / "r.raw"
    run("qemu-img", "create", "-f", "qcow2", str(qcow2), str(16 * MiB))
    run("qemu-img", "create", "-f", "raw", str(raw), str(4 * MiB))
    return qcow2, raw


def make_vm(short_dir: Path, qcow2: Path, raw: Path, *extra: str, raw_read_only: bool = False) -> pyemu.VM:
    kernel = short_dir / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    ro = ",readonly=on" if raw_read_only else ""
    return pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S",
                    "-drive", f"file={qcow2},format=qcow2,if=virtio,id=disk0",
                    "-drive", f"file={raw},format=raw,if=virtio,id=disk1{ro}", *extra)


def backend(vm: pyemu.VM, drive_id: str):  # type: ignore[no-untyped-def]
    for use in vm._instance.machine.drives():
        if use.drive_id == drive_id:
            return use.backend
    raise AssertionError(drive_id)


def bitmaps(vm: pyemu.VM, drive_id: str) -> dict[str, dict]:
    for info in vm.execute("query-block"):
        if info["device"] == drive_id:
            return {b["name"]: b for b in info["inserted"].get("dirty-bitmaps", [])}
    raise AssertionError(drive_id)


def refused(vm: pyemu.VM, command: str, args: dict, message: str) -> None:
    with pytest.raises(CommandError) as info:
        vm.execute(command, args)
    assert info.value.error_class == "GenericError"
    assert info.value.desc == message, info.value.desc


def test_commands_and_query_block(short_dir: Path, disks: tuple[Path, Path]) -> None:
    qcow2, raw = disks
    with make_vm(short_dir, qcow2, raw) as vm:
        vm.start()
        vm.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "a"})
        vm.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b", "granularity": 4096,
                                              "disabled": True})
        vm.execute("block-dirty-bitmap-add", {"node": "disk1", "name": "r", "granularity": 512})
        got = bitmaps(vm, "disk0")
        assert got["a"] == {"name": "a", "recording": True, "persistent": False, "busy": False,
                            "granularity": 65536, "count": 0}
        assert got["b"]["recording"] is False and got["b"]["granularity"] == 4096
        backend(vm, "disk0").pwritev(MiB + 10, [b"x" * 100])
        backend(vm, "disk1").write_zeroes(0, 1024, may_unmap=False)
        got = bitmaps(vm, "disk0")
        assert got["a"]["count"] == 65536 and got["b"]["count"] == 0
        assert bitmaps(vm, "disk1")["r"]["count"] == 1024
        vm.execute("block-dirty-bitmap-enable", {"node": "disk0", "name": "b"})
        vm.execute("block-dirty-bitmap-disable", {"node": "disk0", "name": "a"})
        backend(vm, "disk0").pwritev(2 * MiB, [b"y" * 4096])
        got = bitmaps(vm, "disk0")
        assert got["a"]["count"] == 65536 and got["b"]["count"] == 4096
        vm.execute("block-dirty-bitmap-merge", {"node": "disk0", "target": "b", "bitmaps": ["a"]})
        assert bitmaps(vm, "disk0")["b"]["count"] == 65536 + 4096
        vm.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "c", "granularity": 512})
        vm.execute("block-dirty-bitmap-merge", {"node": "disk0", "target": "c",
                                                "bitmaps": ["b", {"node": "disk0", "name": "a"}]})
        assert bitmaps(vm, "disk0")["c"]["count"] == 65536 + 4096
        vm.execute("block-dirty-bitmap-clear", {"node": "disk0", "name": "c"})
        assert bitmaps(vm, "disk0")["c"]["count"] == 0
        vm.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "c"})
        assert set(bitmaps(vm, "disk0")) == {"a", "b"}
        info = [i for i in vm.execute("query-block") if i["device"] == "disk0"][0]
        assert info["dirty-bitmaps"] == info["inserted"]["dirty-bitmaps"]


def test_errors_are_qemus_and_change_nothing(short_dir: Path, disks: tuple[Path, Path]) -> None:
    qcow2, raw = disks
    with make_vm(short_dir, qcow2, raw, raw_read_only=True) as vm:
        vm.start()
        vm.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "a"})
        before = vm.execute("query-block")
        add = "block-dirty-bitmap-add"
        refused(vm, add, {"node": "disk0", "name": "a"}, "Bitmap already exists: a")
        refused(vm, add, {"node": "nope", "name": "x"}, "Cannot find device='nope' nor node-name='nope'")
        refused(vm, add, {"node": "disk0", "name": "x", "granularity": 100},
                "Granularity must be power of 2 and at least 512")
        refused(vm, add, {"node": "disk0", "name": "x", "granularity": 1 << 32},
                "Parameter 'granularity' expects uint32_t")
        refused(vm, add, {"node": "disk0", "name": ""}, "Bitmap name cannot be empty")
        refused(vm, add, {"node": "disk0", "name": "n" * 1024}, "Bitmap name too long: " + "n" * 1024)
        refused(vm, add, {"node": "disk1", "name": "p", "persistent": True},
                "Can't store persistent bitmaps to disk1: Operation not supported")
        refused(vm, "block-dirty-bitmap-remove", {"node": "disk0", "name": "zz"}, "Dirty bitmap 'zz' not found")
        refused(vm, "block-dirty-bitmap-clear", {"node": "disk0", "name": "zz"}, "Dirty bitmap 'zz' not found")
        refused(vm, "block-dirty-bitmap-merge", {"node": "disk0", "target": "a", "bitmaps": ["zz"]},
                "Dirty bitmap 'zz' not found")
        refused(vm, "block-dirty-bitmap-merge", {"node": "disk0", "target": "a",
                                                 "bitmaps": [{"node": "nope", "name": "a"}]}, "Node 'nope' not found")
        refused(vm, "block-dirty-bitmap-merge", {"node": "disk0", "target": "a", "bitmaps": [5]},
                "Invalid parameter type for 'bitmaps[0]', expected: BlockDirtyBitmapOrStr")
        vm.execute(add, {"node": "disk1", "name": "r"})  # a bitmap on a different-sized node
        refused(vm, "block-dirty-bitmap-merge", {"node": "disk0", "target": "a",
                                                 "bitmaps": [{"node": "disk1", "name": "r"}]},
                "Bitmaps are incompatible and can't be merged")
        vm.execute("block-dirty-bitmap-remove", {"node": "disk1", "name": "r"})
        assert vm.execute("query-block") == before
        with pytest.raises(CommandError) as info:
            vm.execute(add, {"node": "disk0"})
        assert info.value.desc == "Parameter 'name' is missing"


def test_persistent_bitmap_survives_a_restart(short_dir: Path, disks: tuple[Path, Path]) -> None:
    qcow2, raw = disks
    with make_vm(short_dir, qcow2, raw) as vm:
        vm.start()
        vm.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "inc", "granularity": 4096,
                                              "persistent": True})
        vm.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "temp"})
        backend(vm, "disk0").pwritev(3 * MiB, [b"z" * 10000])
        vm.quit()
        assert vm.wait(60) == 0
    info = json.loads(run("qemu-img", "info", "--output=json", str(qcow2)))
    assert info["format-specific"]["data"]["bitmaps"] == [{"flags": ["auto"], "name": "inc", "granularity": 4096}]
    check = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "No errors were found" in check.stdout
    with make_vm(short_dir, qcow2, raw) as vm:
        vm.start()
        got = bitmaps(vm, "disk0")
        assert set(got) == {"inc"}
        assert got["inc"] == {"name": "inc", "recording": True, "persistent": True, "busy": False,
                              "granularity": 4096, "count": 12288}
        vm.execute("block-dirty-bitmap-remove", {"node": "disk0", "name": "inc"})
    info = json.loads(run("qemu-img", "info", "--output=json", str(qcow2)))
    assert "bitmaps" not in info["format-specific"]["data"]


def test_bitmaps_of_a_read_only_drive(short_dir: Path, disks: tuple[Path, Path]) -> None:
    qcow2, raw = disks
    other = short_dir / "ro.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(other), str(MiB))
    run("qemu-img", "bitmap", "--add", str(other), "stored")
    with make_vm(short_dir, qcow2, raw, "-drive", f"file={other},format=qcow2,if=virtio,id=disk2,readonly=on") as vm:
        vm.start()
        assert bitmaps(vm, "disk2")["stored"]["persistent"] is True
        refused(vm, "block-dirty-bitmap-add", {"node": "disk2", "name": "p", "persistent": True},
                "Can't make bitmap 'p' persistent in 'disk2': the image is opened read-only")
        for command in ("block-dirty-bitmap-clear", "block-dirty-bitmap-remove"):
            refused(vm, command, {"node": "disk2", "name": "stored"},
                    "Bitmap 'stored' is readonly and cannot be modified")
        # QEMU 7.2 lets enable/disable through on a read-only image (BDRV_BITMAP_ALLOW_RO): only the
        # in-memory recording flag changes.
        vm.execute("block-dirty-bitmap-disable", {"node": "disk2", "name": "stored"})
        assert bitmaps(vm, "disk2")["stored"]["recording"] is False
        vm.execute("block-dirty-bitmap-add", {"node": "disk2", "name": "mem"})  # in memory only: allowed
    assert json.loads(run("qemu-img", "info", "--output=json", str(other)))["format-specific"]["data"][
        "bitmaps"] == [{"flags": ["auto"], "name": "stored", "granularity": 65536}]


def test_bitmaps_on_a_blockdev_node_name(short_dir: Path, disks: tuple[Path, Path]) -> None:
    """``node`` may be a -blockdev node-name (resolved through the node registry); the bitmap persists in
    that node's image."""
    qcow2, raw = disks
    other = short_dir / "n.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(other), str(4 * MiB))
    with make_vm(short_dir, qcow2, raw, "-blockdev",
                 f"driver=qcow2,node-name=n0,file.driver=file,file.filename={other}",
                 "-device", "virtio-blk-device,drive=n0") as vm:
        vm.start()
        vm.execute("block-dirty-bitmap-add", {"node": "n0", "name": "nb", "granularity": 4096,
                                              "persistent": True})
        node = [use for use in vm._instance.machine.drives() if use.backend.root.filename == str(other)][0]
        node.backend.pwritev(MiB, [b"q" * 4096])
        nodes = {n["node-name"]: n for n in vm.execute("query-named-block-nodes")}
        assert nodes["n0"]["dirty-bitmaps"] == [{"name": "nb", "recording": True, "persistent": True,
                                                 "busy": False, "granularity": 4096, "count": 4096}]
        with pytest.raises(CommandError) as info:
            vm.execute("block-dirty-bitmap-add", {"node": "n1", "name": "x"})
        assert info.value.desc == "Cannot find device='n1' nor node-name='n1'"
    info = json.loads(run("qemu-img", "info", "--output=json", str(other)))
    assert info["format-specific"]["data"]["bitmaps"] == [{"flags": ["auto"], "name": "nb", "granularity": 4096}]
