"""The block graph over QMP and the command line, through ``pyemu.VM`` (in-process): ``-blockdev`` in both
syntaxes, ``-device virtio-blk-device,drive=<node-name>``, blockdev-add/-del, query-named-block-nodes,
query-block, qom-list/-get/-set swapping a device's node, and transaction. Error messages are QEMU 7.2's,
measured with ``qemu-system-x86_64 -M microvm -S -qmp`` running the same commands.

The guest only spins; the writes go through the device's BlockBackend, the object virtio-blk writes
through. A Linux guest writing its disk while the node is swapped is tests/boot/test_blockdev_linux.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import pyemu
from pyemu.api.errors import CommandError, VmError
from pyemu.target.x86.boot.synthetic import make_multiboot_binary

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")

MiB = 1 << 20


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture
def images(short_dir: Path) -> tuple[Path, Path]:
    raw = short_dir / "base.raw"
    run("qemu-img", "create", "-f", "raw", str(raw), str(4 * MiB))
    top = short_dir / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(top))
    return raw, top


def make_vm(short_dir: Path, *args: str) -> pyemu.VM:
    kernel = short_dir / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    return pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S", *args)


def blockdev_vm(short_dir: Path, raw: Path, *extra: str) -> pyemu.VM:
    return make_vm(short_dir, "-blockdev", f"driver=file,node-name=f0,filename={raw}",
                   "-blockdev", '{"driver": "raw", "node-name": "d0", "file": "f0"}',
                   "-device", "virtio-blk-device,drive=d0,id=vblk0", *extra)


def backend(vm: pyemu.VM, device_id: str):  # type: ignore[no-untyped-def]
    for use in vm._instance.machine.drives():
        if use.device_id == device_id:
            return use.backend
    raise AssertionError(device_id)


def refused(vm: pyemu.VM, command: str, args: dict, message: str) -> None:
    with pytest.raises(CommandError) as info:
        vm.execute(command, args)
    assert info.value.error_class == "GenericError", info.value
    assert info.value.desc == message, info.value.desc


def test_blockdev_device_and_queries(short_dir: Path, images: tuple[Path, Path]) -> None:
    raw, _ = images
    with blockdev_vm(short_dir, raw) as vm:
        vm.start()
        (block,) = vm.execute("query-block")
        # QEMU: a device on a -blockdev node has an anonymous BlockBackend: device "" and qdev the id.
        assert (block["device"], block["qdev"]) == ("", "vblk0")
        assert (block["inserted"]["node-name"], block["inserted"]["drv"]) == ("d0", "raw")
        nodes = {n["node-name"]: n for n in vm.execute("query-named-block-nodes")}
        assert set(nodes) == {"f0", "d0"}
        assert (nodes["f0"]["drv"], nodes["f0"]["file"], nodes["f0"]["ro"]) == ("file", str(raw), False)
        assert nodes["d0"]["image"]["virtual-size"] == 4 * MiB
        backend(vm, "vblk0").pwritev(0, [b"through d0"])
        assert raw.read_bytes()[:10] == b"through d0"


def test_blockdev_add_del_and_qemu_messages(short_dir: Path, images: tuple[Path, Path]) -> None:
    raw, top = images
    with blockdev_vm(short_dir, raw) as vm:
        vm.start()
        refused(vm, "blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(raw)},
                "Duplicate nodes with node-name='f0'")
        refused(vm, "blockdev-add", {"driver": "raw", "file": "f0"}, "'node-name' must be specified for the root node")
        refused(vm, "blockdev-add", {"driver": "raw", "node-name": "1bad", "file": "f0"}, "Invalid node-name: '1bad'")
        refused(vm, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f0", "bogus": 1},
                "Parameter 'bogus' is unexpected")
        refused(vm, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "zz"},
                "Cannot find device='zz' nor node-name='zz'")
        refused(vm, "blockdev-add", {"driver": "file", "node-name": "r", "filename": "/nonexist"},
                "Could not open '/nonexist': No such file or directory")
        refused(vm, "blockdev-add", {"driver": "foo", "node-name": "r"}, "Parameter 'driver' does not accept value 'foo'")
        refused(vm, "blockdev-add", {"driver": "raw", "node-name": "r", "file": "f0", "offset": "x"},
                "Invalid parameter type for 'offset', expected: integer")
        refused(vm, "blockdev-add", {"driver": "raw", "node-name": "r", "file": {"driver": "file"}},
                "Parameter 'file.filename' is missing")
        refused(vm, "blockdev-add", {"driver": "raw", "node-name": "a" * 32, "file": "f0"}, "Node name too long")
        refused(vm, "blockdev-del", {"node-name": "f0"}, "Block device f0 is in use")
        refused(vm, "blockdev-del", {"node-name": "d0"}, "Node d0 is in use")
        refused(vm, "blockdev-del", {"node-name": "nope"}, "Failed to find node with node-name='nope'")
        assert {n["node-name"] for n in vm.execute("query-named-block-nodes")} == {"f0", "d0"}

        vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "d0",
                                    "file": {"driver": "file", "filename": str(top)}})
        nodes = {n["node-name"]: n for n in vm.execute("query-named-block-nodes")}
        implicit = [name for name in nodes if name.startswith("#block")]
        assert len(implicit) == 1 and nodes[implicit[0]]["drv"] == "file"
        assert nodes["ov"]["backing_file_depth"] == 1 and nodes["ov"]["backing_file"] == str(raw)
        assert nodes["ov"]["image"]["backing-image"]["virtual-size"] == 4 * MiB
        flat = {n["node-name"]: n for n in vm.execute("query-named-block-nodes", {"flat": True})}
        assert "backing-image" not in flat["ov"]["image"]
        refused(vm, "blockdev-del", {"node-name": implicit[0]}, f"Node {implicit[0]} is not owned by the monitor")
        # QEMU: the overlay itself holds the write lock of top.qcow2, so a second opener is refused.
        with pytest.raises(CommandError) as info:
            vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov2", "backing": None,
                                        "file": {"driver": "file", "filename": str(top)}})
        assert info.value.desc.startswith('Failed to get "write" lock'), info.value.desc
        vm.execute("blockdev-del", {"node-name": "ov"})
        assert {n["node-name"] for n in vm.execute("query-named-block-nodes")} == {"f0", "d0"}
        # The lock went with it: QEMU can open the image now.
        run("qemu-img", "info", str(top))


def test_qom_tree_and_drive_swap(short_dir: Path, images: tuple[Path, Path]) -> None:
    """The fleecing-style swap: the device moves onto an overlay whose backing is its old node and back;
    reads see the same disk throughout, writes made meanwhile land in the overlay."""
    raw, top = images
    with blockdev_vm(short_dir, raw, "-device", "virtio-rng-device") as vm:
        vm.start()
        assert vm.execute("qom-list", {"path": "/machine/peripheral"}) == [
            {"name": "type", "type": "string"}, {"name": "vblk0", "type": "child<virtio-blk-device>"}]
        anon = vm.execute("qom-list", {"path": "/machine/peripheral-anon"})
        assert {"name": "device[0]", "type": "child<virtio-rng-device>"} in anon
        assert {"name": "drive", "type": "str"} in vm.execute("qom-list", {"path": "/machine/peripheral/vblk0"})
        assert vm.execute("qom-get", {"path": "/machine/peripheral/vblk0", "property": "type"}) == "virtio-blk-device"
        assert vm.execute("qom-get", {"path": "/machine/peripheral/vblk0", "property": "drive"}) == "d0"
        with pytest.raises(CommandError) as info:
            vm.execute("qom-list", {"path": "/nope"})
        assert info.value.desc == "Device '/nope' not found"
        refused(vm, "qom-get", {"path": "/machine/peripheral/vblk0", "property": "nope"},
                "Property 'virtio-blk-device.nope' not found")
        refused(vm, "qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "nope"},
                "Cannot find device='' nor node-name='nope'")
        refused(vm, "qom-set", {"path": "/machine/peripheral/vblk0", "property": "serial", "value": "x"},
                "Attempt to set property 'serial' on device 'vblk0' (type 'virtio-blk-device') after it was realized")

        blk = backend(vm, "vblk0")
        blk.pwritev(0, [b"A" * 4096])
        vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "d0",
                                    "file": {"driver": "file", "filename": str(top)}})
        vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "ov"})
        assert vm.execute("qom-get", {"path": "/machine/peripheral/vblk0", "property": "drive"}) == "ov"
        assert vm.execute("query-block")[0]["inserted"]["node-name"] == "ov"
        refused(vm, "blockdev-del", {"node-name": "ov"}, "Node ov is in use")
        refused(vm, "blockdev-del", {"node-name": "d0"}, "Block device d0 is in use")
        buf = bytearray(4096)
        blk.preadv(0, [memoryview(buf)])
        assert bytes(buf) == b"A" * 4096  # through the overlay, from its backing
        blk.pwritev(4096, [b"B" * 4096])
        vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "d0"})
        vm.execute("blockdev-del", {"node-name": "ov"})
        blk.pwritev(8192, [b"C" * 4096])
    data = raw.read_bytes()
    assert data[:4096] == b"A" * 4096 and data[4096:8192] == bytes(4096) and data[8192:12288] == b"C" * 4096
    out = run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x42 4096 4096", str(top))
    assert "read 4096/4096" in out and "Pattern verification failed" not in out
    run("qemu-img", "check", str(top))


def test_qom_set_refusals_leave_the_old_node(short_dir: Path, images: tuple[Path, Path]) -> None:
    raw, _ = images
    with blockdev_vm(short_dir, raw) as vm:
        vm.start()
        vm.execute("blockdev-add", {"driver": "raw", "node-name": "ro", "read-only": True, "file": "f0"})
        refused(vm, "qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "ro"},
                "Block node is read-only")
        vm.execute("blockdev-add", {"driver": "raw", "node-name": "small", "file": "f0", "size": MiB})
        with pytest.raises(CommandError):
            vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "small"})
        assert vm.execute("qom-get", {"path": "/machine/peripheral/vblk0", "property": "drive"}) == "d0"
        backend(vm, "vblk0").pwritev(0, [b"ok"])
        # As in QEMU: the file node itself can take the device once d0 no longer writes through it.
        vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "f0"})
        backend(vm, "vblk0").pwritev(2, [b"!!"])
        vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "d0"})
    assert raw.read_bytes()[:4] == b"ok!!"


def test_drive_nodes_are_named_and_found_by_drive_id(short_dir: Path, images: tuple[Path, Path]) -> None:
    raw, top = images
    with make_vm(short_dir, "-drive", f"file={top},format=qcow2,if=virtio,id=disk0") as vm:
        vm.start()
        nodes = vm.execute("query-named-block-nodes")
        drvs = sorted(n["drv"] for n in nodes)
        assert drvs == ["file", "file", "qcow2", "raw"], drvs  # qcow2 + file, backing raw + file
        (block,) = vm.execute("query-block")
        assert block["device"] == "disk0" and block["inserted"]["node-name"].startswith("#block")
        assert vm.execute("qom-get", {"path": "/machine/peripheral-anon/device[0]", "property": "drive"}) == "disk0"


def test_transaction_is_all_or_nothing(short_dir: Path, images: tuple[Path, Path]) -> None:
    raw, _ = images
    with blockdev_vm(short_dir, raw) as vm:
        vm.start()
        refused(vm, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}},
            {"type": "abort", "data": {}}]}, "Transaction aborted using Abort action")
        assert "dirty-bitmaps" not in vm.execute("query-block")[0]["inserted"] or \
            vm.execute("query-block")[0]["inserted"]["dirty-bitmaps"] == []
        refused(vm, "transaction", {"actions": [{"type": "bogus", "data": {}}]},
                "Parameter 'type' does not accept value 'bogus'")
        refused(vm, "transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "d0"}}]},
                "Parameter 'actions[0].data.name' is missing")
        refused(vm, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "nope", "name": "b1"}}]},
            "Cannot find device='nope' nor node-name='nope'")
        vm.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1", "granularity": 65536}}]})
        backend(vm, "vblk0").pwritev(0, [b"x" * 512])
        # clear + a failing add: the clear is undone, the dirty granule is still recorded.
        refused(vm, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b1"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b1"}}]}, "Bitmap already exists: b1")
        (bitmap,) = vm.execute("query-block")[0]["inserted"]["dirty-bitmaps"]
        assert bitmap["count"] == 65536
        vm.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "d0", "name": "b1"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b2"}}]})
        assert {b["name"]: b["count"] for b in vm.execute("query-block")[0]["inserted"]["dirty-bitmaps"]} == {
            "b1": 0, "b2": 0}


@pytest.mark.parametrize("args, message", [
    (["-blockdev", "driver=raw,file=f0"], "'node-name' must be specified for the root node"),
    (["-blockdev", "driver=nope,node-name=x"], "Parameter 'driver' does not accept value 'nope'"),
    (["-blockdev", "driver=file,node-name=x,filename=/nonexistent"], "Could not open '/nonexistent'"),
    (["-blockdev", "driver=raw,node-name=x,file=missing"], "Cannot find device='missing' nor node-name='missing'"),
    (["-device", "virtio-blk-device,drive=missing"], "can't find value 'missing'"),
])
def test_command_line_errors(short_dir: Path, args: list[str], message: str) -> None:
    with pytest.raises((VmError, pyemu.errors.PyemuError)) as info:  # type: ignore[attr-defined]
        with make_vm(short_dir, *args) as vm:
            vm.start()
    assert message in str(info.value), str(info.value)


def test_qmp_schema_lists_the_commands(short_dir: Path, images: tuple[Path, Path]) -> None:
    raw, _ = images
    with blockdev_vm(short_dir, raw) as vm:
        vm.start()
        names = {c["name"] for c in vm.execute("query-commands")}
        assert {"blockdev-add", "blockdev-del", "query-named-block-nodes", "qom-list", "qom-get", "qom-set",
                "transaction"} <= names
        json.dumps(vm.execute("query-qmp-schema"))
