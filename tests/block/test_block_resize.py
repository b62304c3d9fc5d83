"""block_resize: drivers (file, raw, qcow2, filters), QEMU 7.2's refusals and the virtio-blk config change.

The refusal messages were recorded from qemu-storage-daemon 7.2 (block_resize on file, raw and qcow2 nodes);
the VM tests use a spinning stub kernel with -S, so the device's side is checked on its transport: the
capacity field of the configuration space, the config generation and the config-change interrupt bit."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import pyemu
from pyemu.api.errors import CommandError
from pyemu.block.file import FileProtocol
from pyemu.block.qcow2.driver import Qcow2Format
from pyemu.block.raw import RawFormat
from pyemu.block.resize import ResizeError, resize_node
from pyemu.hw.virtio.mmio import INT_CONFIG_CHANGE, REG_CONFIG
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.block.errors import BlockError

MiB = 1 << 20


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def qemu_img_info(path: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "--output=json", "-U", str(path)))


# -- drivers ----------------------------------------------------------------------------------------------

def test_file_and_raw_follow_each_other(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(b"\x11" * MiB)
    file = FileProtocol.open(str(path))
    raw = RawFormat(file)
    try:
        resize_node(raw, 3 * MiB)
        assert (raw.size(), file.size(), os.path.getsize(path)) == (3 * MiB, 3 * MiB, 3 * MiB)
        buf = bytearray(2 * MiB)
        raw.preadv(MiB, [memoryview(buf)])
        assert buf == bytes(2 * MiB)  # the grown part reads zeros
        raw.pwritev(3 * MiB - 512, [b"\x22" * 512])
        resize_node(file, 4 * MiB)  # the file below: raw (no window) follows it, as QEMU's raw
        assert raw.size() == 4 * MiB
        resize_node(raw, MiB // 2)  # QMP may shrink a raw disk
        assert os.path.getsize(path) == MiB // 2
    finally:
        raw.close()


def test_raw_window_and_read_only_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(MiB))
    raw = RawFormat(FileProtocol.open(str(path)), size=MiB // 2)
    try:
        with pytest.raises(BlockError, match="^Cannot resize fixed-size raw disks$"):
            resize_node(raw, MiB)
    finally:
        raw.close()
    ro = FileProtocol.open(str(path), read_only=True)
    try:
        with pytest.raises(ResizeError, match="^Image is read-only$"):
            resize_node(ro, 2 * MiB)
        with pytest.raises(ResizeError, match="^Image size cannot be negative$"):
            resize_node(ro, -1)
    finally:
        ro.close()


def test_qcow2_grows_and_shrinks_clean(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(path), "1M")
    image = Qcow2Format.open(FileProtocol.open(str(path), growable=True), read_only=False)
    try:
        image.pwritev(MiB - 4096, [b"\x33" * 4096])
        resize_node(image, 64 * MiB + 512)
        image.pwritev(64 * MiB - 4096, [b"\x44" * 4096])
        buf = bytearray(8192)
        image.preadv(MiB - 4096, [memoryview(buf)])
        assert buf == b"\x33" * 4096 + bytes(4096)
        with pytest.raises(BlockError, match="^The new size must be a multiple of 512$"):
            resize_node(image, 1000)
        image.flush()
    finally:
        image.close()
    assert qemu_img_info(path)["virtual-size"] == 64 * MiB + 512
    run("qemu-img", "check", str(path))
    image = Qcow2Format.open(FileProtocol.open(str(path), growable=True), read_only=False)
    try:
        resize_node(image, MiB)  # block_resize may shrink a qcow2 image (no --shrink in QMP)
        image.flush()
    finally:
        image.close()
    assert qemu_img_info(path)["virtual-size"] == MiB
    run("qemu-img", "check", str(path))
    run("qemu-io", "-f", "qcow2", "-c", f"read -P 0x33 {MiB - 4096} 4096", str(path))


# -- QMP on a VM ------------------------------------------------------------------------------------------

@pytest.fixture
def vm(tmp_path: Path) -> Any:
    kernel = tmp_path / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    disk, raw, ro, raw2 = tmp_path / "d.qcow2", tmp_path / "r.raw", tmp_path / "ro.raw", tmp_path / "r2.raw"
    raw2.write_bytes(bytes(2 * MiB))
    run("qemu-img", "create", "-f", "qcow2", str(disk), "4M")
    raw.write_bytes(bytes(2 * MiB))
    ro.write_bytes(bytes(MiB))
    machine = pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S",
                       "-blockdev", f"driver=qcow2,node-name=d0,file.driver=file,file.filename={disk},"
                                    "file.node-name=d0f",
                       "-device", "virtio-blk-device,drive=d0,id=vblk0",
                       "-drive", f"if=none,id=drive1,format=raw,file={raw}",
                       "-device", "virtio-blk-device,drive=drive1,id=vblk1",
                       "-blockdev", f"driver=raw,node-name=ro0,read-only=on,file.driver=file,file.filename={ro}",
                       "-blockdev", f"driver=raw,node-name=r2,file.driver=file,file.filename={raw2},"
                                    "file.node-name=r2f",
                       "-device", "virtio-blk-device,drive=r2,id=vblk2")
    with machine:
        machine.start()
        yield machine


def refused(vm: Any, args: dict[str, Any], message: str) -> None:
    with pytest.raises(CommandError) as info:
        vm.execute("block_resize", args)
    assert (info.value.error_class, info.value.desc) == ("GenericError", message)


def transport(vm: Any, index: int) -> Any:
    return vm._instance.machine.virtio.transports[index]


def capacity(vm: Any, index: int) -> int:
    return transport(vm, index).read(REG_CONFIG, 8)


def sizes(vm: Any) -> dict[str, int]:
    return {n["node-name"]: n["image"]["virtual-size"] for n in vm.execute("query-named-block-nodes")}


def test_block_resize_grows_the_device(vm: Any) -> None:
    mmio = transport(vm, 0)
    generation, interrupts = mmio.config_generation, mmio.interrupts
    assert capacity(vm, 0) == 4 * MiB // 512
    assert vm.execute("block_resize", {"node-name": "d0", "size": 16 * MiB}) == {}
    assert capacity(vm, 0) == 16 * MiB // 512
    assert mmio.config_generation == generation + 1 and mmio.interrupts == interrupts + 1
    assert mmio.interrupt_status & INT_CONFIG_CHANGE
    assert sizes(vm)["d0"] == 16 * MiB
    # The same size again changes nothing, so the guest is not told.
    vm.execute("block_resize", {"node-name": "d0", "size": 16 * MiB})
    assert mmio.config_generation == generation + 1
    # By drive id (QEMU's 'device' is looked up first; a missing one falls back to node-name).
    vm.execute("block_resize", {"device": "drive1", "size": 8 * MiB})
    assert capacity(vm, 1) == 8 * MiB // 512
    vm.execute("block_resize", {"device": "nope", "node-name": "d0", "size": 20 * MiB})
    assert capacity(vm, 0) == 20 * MiB // 512


def test_block_resize_refusals_as_qemu(vm: Any) -> None:
    refused(vm, {"node-name": "d0", "size": -1}, "Parameter 'size' expects a >0 size")
    refused(vm, {"node-name": "d0", "size": 1 << 63}, "Invalid parameter type for 'size', expected: integer")
    refused(vm, {"node-name": "nope", "size": MiB}, "Cannot find device='' nor node-name='nope'")
    refused(vm, {"device": "nope", "size": MiB}, "Cannot find device='nope' nor node-name=''")
    refused(vm, {"size": MiB}, "Cannot find device='' nor node-name=''")
    refused(vm, {"node-name": "ro0", "size": 2 * MiB}, "Image is read-only")
    refused(vm, {"node-name": "d0", "size": 1000}, "The new size must be a multiple of 512")
    refused(vm, {"node-name": "d0f", "size": 8 * MiB},
            "Permission conflict on node 'd0f': permissions 'resize' are both required by an unnamed block "
            "device (uses node 'd0f' as 'root' child) and unshared by node 'd0' (uses node 'd0f' as 'file' "
            "child).")
    # Too large: recorded from qemu-storage-daemon 7.2 (the block layer's limit, qcow2's L1 table, the file's
    # ftruncate).
    refused(vm, {"node-name": "d0", "size": (1 << 63) - 512},
            "offset(9223372036854775296) exceeds maximum(9223372035781033984)")
    refused(vm, {"node-name": "d0", "size": 1 << 60}, "Failed to grow the L1 table: File too large")
    refused(vm, {"node-name": "d0", "size": 1 << 62}, "Failed to grow the L1 table: File too large")
    refused(vm, {"node-name": "r2f", "size": 1 << 62}, "Could not resize file: File too large")
    with pytest.raises(CommandError, match="size"):
        vm.execute("block_resize", {"node-name": "d0"})
    assert sizes(vm)["d0"] == 4 * MiB and capacity(vm, 0) == 4 * MiB // 512


def test_block_resize_of_a_file_reaches_the_device_above_raw(vm: Any) -> None:
    """QEMU's raw without a window passes its file's size through: resizing the file node grows the drive."""
    generation = transport(vm, 2).config_generation
    vm.execute("block_resize", {"node-name": "r2f", "size": 6 * MiB})
    assert sizes(vm)["r2"] == 6 * MiB and capacity(vm, 2) == 6 * MiB // 512
    assert transport(vm, 2).config_generation == generation + 1


def test_block_resize_refused_under_a_running_backup(vm: Any, tmp_path: Path) -> None:
    """Recorded from qemu-storage-daemon 7.2 with a backup running: the source is refused by the job's
    copy-before-write filter (also through a raw node), the target by the job's op blocker."""
    target = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(target), "2M")
    vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "t2",
                                "file": {"driver": "file", "filename": str(target)}})
    vm.execute("blockdev-backup", {"job-id": "j", "device": "r2", "target": "t2", "sync": "full",
                                   "speed": 64 * 1024, "filter-node-name": "bf2"})
    try:
        refused(vm, {"node-name": "r2", "size": 8 * MiB},
                "Permission conflict on node 'r2': permissions 'resize' are both required by an unnamed block "
                "device (uses node 'r2' as 'root' child) and unshared by node 'bf2' (uses node 'r2' as 'file' "
                "child).")
        refused(vm, {"node-name": "r2f", "size": 8 * MiB},
                "Permission conflict on node 'r2f': permissions 'resize' are both required by an unnamed block "
                "device (uses node 'r2f' as 'root' child) and unshared by node 'r2' (uses node 'r2f' as 'file' "
                "child).")
        refused(vm, {"node-name": "t2", "size": 8 * MiB}, "Device '(null)' is in use")
        refused(vm, {"device": "x", "node-name": "t2", "size": 8 * MiB}, "Device 'x' is in use")
        assert sizes(vm)["r2"] == 2 * MiB
    finally:
        vm.execute("block-job-cancel", {"device": "j"})
        vm.events.wait_for("BLOCK_JOB_CANCELLED", 60)


def test_block_resize_through_a_copy_on_read_filter(vm: Any) -> None:
    """A copy-on-read filter has no size of its own: resizing it resizes the image below, and the filter and
    the device above both see the new size (the filter used to keep the size it was created with)."""
    vm.execute("blockdev-add", {"driver": "copy-on-read", "node-name": "cor0", "file": "d0"})
    vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "cor0"})
    vm.execute("block_resize", {"node-name": "cor0", "size": 12 * MiB})
    assert sizes(vm)["d0"] == 12 * MiB and sizes(vm)["cor0"] == 12 * MiB
    assert capacity(vm, 0) == 12 * MiB // 512
