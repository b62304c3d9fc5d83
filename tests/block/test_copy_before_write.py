"""The copy-before-write filter and snapshot-access (pyemu.block.copy_before_write, .snapshot_access): the
point-in-time view stays exact while the guest writes, who waits for whom, EACCES outside the bitmap or after
a break, discard from the reader, on-cbw-error and cbw-timeout, option errors with QEMU 7.2's messages
(measured with qemu-storage-daemon), bitmaps on the disk keep recording, and the fleecing flow over QMP."""

from __future__ import annotations

import errno
import random
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memdisk import KiB, MiB, WAIT, MemDisk, pattern
from pyemu.block.backend import BlockBackend
from pyemu.block.block_copy import BlockCopy, BlockCopyError, BlockCopyTimeout
from pyemu.block.blockdev import BlockdevError, delete_blockdev, open_blockdev
from pyemu.block.copy_before_write import CopyBeforeWrite
from pyemu.block.dirty_bitmap import DirtyBitmap, bitmaps_of
from pyemu.block.errors import BlockConfigError, BlockError, BlockIOError
from pyemu.block.graph import children, users
from pyemu.block.registry import NodeRegistry
from pyemu.block.snapshot_access import SnapshotAccess

C = 64 * KiB


def fleece(size: int = MiB, **kw: Any) -> tuple[MemDisk, MemDisk, CopyBeforeWrite, SnapshotAccess]:
    disk, target = MemDisk(size, data=pattern(size)), MemDisk(size)
    cbw = CopyBeforeWrite(disk, target, **kw)
    return disk, target, cbw, SnapshotAccess(cbw)


def read(node: Any, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    node.preadv(offset, [memoryview(buf)])
    return bytes(buf)


def eacces(node: Any, offset: int, length: int) -> None:
    with pytest.raises(BlockIOError) as info:
        read(node, offset, length)
    assert info.value.errno == errno.EACCES


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Run fn(*args) in a thread; the list gets its result or exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 -- the test inspects it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_view_is_the_disk_at_insertion_while_writes_land() -> None:
    disk, target, cbw, snap = fleece()
    original = bytes(disk.data)
    cbw.pwritev(100, [b"A" * 5000])
    cbw.write_zeroes(3 * C, 2 * C, may_unmap=False)
    cbw.discard(8 * C, C)
    assert read(cbw, 100, 5000) == b"A" * 5000 and read(cbw, 3 * C, 2 * C) == bytes(2 * C)
    assert read(snap, 0, MiB) == original
    parts = [memoryview(bytearray(100)), memoryview(bytearray(C))]  # scattered buffers across a copied edge
    snap.preadv(C - 100, parts)
    assert bytes(parts[0]) + bytes(parts[1]) == original[C - 100:2 * C]
    assert target.data[:C] == original[:C] and target.data[3 * C:5 * C] == original[3 * C:5 * C]
    assert not any(target.data[C:3 * C])  # untouched clusters were not copied
    # A second write to a copied cluster copies nothing.
    count = len(target.log)
    cbw.pwritev(0, [b"B"])
    assert len(target.log) == count and read(snap, 0, 1) == original[:1]
    st_copied = snap.block_status(0, MiB)
    assert (st_copied.offset, st_copied.length, st_copied.allocated) == (0, C, True)
    st_disk = snap.block_status(C, MiB - C)
    assert (st_disk.offset, st_disk.allocated) == (C, True) and st_disk.length <= 2 * C
    assert cbw.filtered_child is disk and snap.filtered_child is cbw and cbw.size() == snap.size() == MiB
    assert dict(children(cbw)) == {"file": disk, "target": target}
    cbw.flush()
    assert disk.flushed == 1 and target.flushed == 1


def test_concurrent_writers_and_readers_see_one_point_in_time() -> None:
    size = 2 * MiB
    disk, target, cbw, snap = fleece(size)
    original = bytes(disk.data)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                offset = rng.randrange(0, size - 1)
                length = rng.randrange(1, min(3 * C, size - offset) + 1)
                cbw.pwritev(offset, [bytes([seed]) * length])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                offset = rng.randrange(0, size - 1)
                length = rng.randrange(1, min(4 * C, size - offset) + 1)
                assert read(snap, offset, length) == original[offset:offset + length]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(s,)) for s in (1, 2, 3)]
    readers = [threading.Thread(target=reader, args=(s,)) for s in (10, 11)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(WAIT * 2)
    stop.set()
    for t in readers:
        t.join(WAIT)
    assert not errors, errors[0]
    assert read(snap, 0, size) == original
    assert disk.data != original


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "zeroes", "discard", "read", "trim"]),
                          st.integers(0, 16 * C - 1), st.integers(1, 3 * C)), max_size=25))
def test_model_of_guest_ops_and_snapshot_reads(ops: list[tuple[str, int, int]]) -> None:
    size = 16 * C
    disk, target, cbw, snap = fleece(size)
    original = bytes(disk.data)
    model = bytearray(original)
    readable = [True] * 16
    for n, (op, offset, length) in enumerate(ops):
        length = min(length, size - offset)
        if op == "write":
            cbw.pwritev(offset, [bytes([n + 1]) * length])
            model[offset:offset + length] = bytes([n + 1]) * length
        elif op in ("zeroes", "discard"):
            (cbw.write_zeroes(offset, length, may_unmap=True) if op == "zeroes" else cbw.discard(offset, length))
            model[offset:offset + length] = bytes(length)  # MemDisk discards to zeros
        elif op == "trim":
            snap.discard(offset, length)
            end = offset + length
            for c in range(-(-offset // C), (end if end == size else end - end % C) // C):
                readable[c] = False
        else:
            if all(readable[offset // C:-(-(offset + length) // C)]):
                assert read(snap, offset, length) == original[offset:offset + length]
            else:
                eacces(snap, offset, length)
        assert disk.data == model
    for c in range(16):
        if readable[c]:
            assert read(snap, c * C, C) == original[c * C:(c + 1) * C]


def test_a_guest_write_waits_only_for_copies_of_its_own_region() -> None:
    disk, target, cbw, snap = fleece()
    original = bytes(disk.data)
    held = target.hold("write", 0, C)
    first, out1 = in_thread(cbw.pwritev, 10, [b"1" * 10])
    assert held.entered.wait(WAIT)
    # Another region: copied and written while cluster 0's copy is stuck.
    cbw.pwritev(5 * C, [b"2" * 10])
    assert disk.data[5 * C:5 * C + 10] == b"2" * 10
    # The view is readable meanwhile, also the region being copied (from the disk, still old).
    assert read(snap, 0, 2 * C) == original[:2 * C]
    # The same region: waits for the copy in flight.
    second, out2 = in_thread(cbw.pwritev, 20, [b"3" * 10])
    second.join(0.3)
    assert second.is_alive() and disk.data[:C] == original[:C]
    held.release.set()
    first.join(WAIT)
    second.join(WAIT)
    assert out1 == [None] and out2 == [None]
    assert disk.data[10:30] == b"1" * 10 + b"3" * 10 and len(target.writes_in(0, C)) == 1
    assert read(snap, 0, MiB) == original


def test_a_guest_write_waits_for_a_snapshot_read_of_its_region() -> None:
    disk, target, cbw, snap = fleece()
    original = bytes(disk.data)
    held = disk.hold("read", 2 * C, 10)
    reader, got = in_thread(read, snap, 2 * C, C)
    assert held.entered.wait(WAIT)
    writer, out = in_thread(cbw.pwritev, 2 * C, [b"W" * C])
    writer.join(0.3)
    assert writer.is_alive() and disk.data[2 * C:3 * C] == original[2 * C:3 * C]
    other, out_other = in_thread(cbw.pwritev, 6 * C, [b"O" * 10])  # unrelated region: not held up
    other.join(WAIT)
    assert out_other == [None]
    held.release.set()
    reader.join(WAIT)
    writer.join(WAIT)
    assert got == [original[2 * C:3 * C]] and out == [None] and disk.data[2 * C:3 * C] == b"W" * C
    assert read(snap, 2 * C, C) == original[2 * C:3 * C]  # now from the target


def test_bitmap_limits_copies_and_access() -> None:
    size = MiB
    bitmap = DirtyBitmap("b", size, 4096)
    bitmap.set_range(2 * C, C)
    disk, target, cbw, snap = fleece(size, bitmap=bitmap)
    original = bytes(disk.data)
    eacces(snap, 0, C)
    eacces(snap, 2 * C - 1, 2)  # partly outside
    assert read(snap, 2 * C, C) == original[2 * C:3 * C]
    with pytest.raises(BlockIOError) as info:
        snap.block_status(0, C)
    assert info.value.errno == errno.EACCES
    cbw.pwritev(0, [b"x" * (4 * C)])
    assert target.writes_in(0, 2 * C) == [] and target.data[2 * C:3 * C] == original[2 * C:3 * C]
    assert read(snap, 2 * C, C) == original[2 * C:3 * C]


def test_discard_from_the_reader_stops_copying() -> None:
    disk, target, cbw, snap = fleece()
    cbw.pwritev(0, [b"a"])  # cluster 0 copied
    snap.discard(0, 3 * C + 5)  # clusters 0..2 (the partial fourth stays)
    assert ("discard", 0, 3 * C) in target.log
    for c in range(3):
        eacces(snap, c * C, 1)
    read(snap, 3 * C, C)
    before = len(target.log)
    cbw.pwritev(C, [b"b" * (2 * C)])
    assert len(target.log) == before and cbw.block_copy.next_dirty(0) == (3 * C, MiB - 3 * C)
    snap.discard(C + 1, 10)  # no whole cluster: nothing
    assert len(target.log) == before


def test_break_guest_write_fails_the_write() -> None:
    disk, target, cbw, snap = fleece()
    original = bytes(disk.data)
    target.fail["write"] = errno.EIO
    with pytest.raises(BlockCopyError) as info:
        cbw.pwritev(0, [b"x" * 10])
    assert info.value.errno == errno.EIO and info.value.side == "write"
    with pytest.raises(BlockIOError):
        cbw.write_zeroes(0, C, may_unmap=False)
    assert disk.data == original and not cbw.snapshot_broken
    assert read(snap, 0, MiB) == original
    target.fail.clear()
    cbw.pwritev(0, [b"x" * 10])
    assert read(snap, 0, C) == original[:C]


def test_break_snapshot_lets_the_write_through_and_breaks_the_view() -> None:
    disk, target, cbw, snap = fleece(on_cbw_error="break-snapshot")
    target.fail["write"] = errno.ENOSPC
    cbw.pwritev(0, [b"x" * 10])
    assert disk.data[:10] == b"x" * 10 and cbw.snapshot_broken
    assert cbw.snapshot_error is not None and cbw.snapshot_error.errno == errno.ENOSPC
    eacces(snap, 4 * C, 10)  # everything, not only the failed region
    target.fail.clear()
    count = len(target.log)
    cbw.pwritev(5 * C, [b"y"])  # the filter no longer copies
    assert len(target.log) == count and disk.data[5 * C] == ord("y")


def test_cbw_timeout_counts_as_a_failed_copy() -> None:
    disk, target, cbw, snap = fleece(on_cbw_error="break-snapshot", cbw_timeout=1)
    held = target.hold("write", 0, C)
    cbw.pwritev(0, [b"t"])  # returns after the timeout, the write done
    assert disk.data[0] == ord("t") and cbw.snapshot_broken
    assert isinstance(cbw.snapshot_error, BlockCopyTimeout)
    eacces(snap, C, 1)
    held.release.set()
    cbw.close()  # waits for the copy that outlived its timeout
    disk2, target2, cbw2, _ = fleece(cbw_timeout=1)
    held2 = target2.hold("write", 0, C)
    with pytest.raises(BlockCopyTimeout) as info:
        cbw2.pwritev(0, [b"t"])
    assert info.value.errno == errno.ETIMEDOUT and disk2.data[0] != ord("t")
    held2.release.set()
    cbw2.close()


def test_shared_block_copy_permissions_and_close() -> None:
    disk, target = MemDisk(MiB, data=pattern(MiB)), MemDisk(MiB)
    bcs = BlockCopy(disk, target)
    cbw = CopyBeforeWrite(disk, target, block_copy=bcs, owns_children=False, user="job 'j'")
    assert cbw.block_copy is bcs
    assert {(a.user, a.role) for a in users(disk)} == {("job 'j'", "file")}
    assert {(a.user, a.role) for a in users(target)} == {("job 'j'", "target")}
    bcs.copy(0, C)  # the job copies; a guest write there copies nothing more
    cbw.pwritev(0, [b"z"])
    assert len(target.log) == 1
    cbw.close()
    cbw.close()
    assert not disk.closed and not target.closed and users(disk) == [] and users(target) == []
    with pytest.raises(BlockConfigError, match="on-cbw-error"):
        CopyBeforeWrite(disk, target, on_cbw_error="nope")
    with pytest.raises(BlockConfigError, match="uint32_t"):
        CopyBeforeWrite(disk, target, cbw_timeout=-1)
    with pytest.raises(BlockConfigError, match="different sizes"):
        CopyBeforeWrite(disk, MemDisk(MiB // 2))
    owned = CopyBeforeWrite(disk, target)
    owned.close()
    assert disk.closed and target.closed


def test_requests_out_of_range_and_writes_to_the_view_are_refused() -> None:
    disk, target, cbw, snap = fleece()
    for call in (lambda: cbw.pwritev(MiB, [b"x"]), lambda: cbw.discard(-1, 2),
                 lambda: snap.preadv(MiB - 1, [memoryview(bytearray(2))]), lambda: snap.discard(0, MiB + 1),
                 lambda: cbw.write_zeroes(0, 2 ** 64, may_unmap=False)):
        with pytest.raises(BlockIOError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    for call in (lambda: snap.pwritev(0, [b"x"]), lambda: snap.write_zeroes(0, 1, may_unmap=False)):
        with pytest.raises(BlockIOError) as info:
            call()
        assert info.value.errno == errno.ENOTSUP
    plain = SnapshotAccess(MemDisk(MiB))  # QEMU opens it over any node; only reads fail
    with pytest.raises(BlockIOError) as info:
        read(plain, 0, 1)
    assert info.value.errno == errno.ENOTSUP


def test_disk_bitmaps_keep_recording_under_the_filter() -> None:
    disk, target = MemDisk(MiB, data=pattern(MiB)), MemDisk(MiB)
    bitmap = bitmaps_of(disk).create("b0", granularity=C)
    cbw = CopyBeforeWrite(disk, target)
    blk = BlockBackend(cbw, read_only=False, owns_root=False)
    blk.pwritev(3 * C + 1, [b"x"])
    blk.write_zeroes(5 * C, C, may_unmap=False)
    assert list(bitmap.dirty_extents()) == [(3 * C, C), (5 * C, C)]
    blk.close()
    cbw.close()


# -- -blockdev / blockdev-add ----------------------------------------------------------------------------
@pytest.fixture
def registry(tmp_path: Path) -> NodeRegistry:
    reg = NodeRegistry()
    for name, size in (("disk", MiB), ("tmp", MiB), ("small", MiB // 2)):
        path = tmp_path / f"{name}.raw"
        path.write_bytes(pattern(size) if name == "disk" else bytes(size))
        open_blockdev({"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}}, reg)
    bitmaps_of(reg.lookup("disk")).create("b0", granularity=C)
    bitmaps_of(reg.lookup("tmp")).create("bt", granularity=C)
    bitmaps_of(reg.lookup("small")).create("bs", granularity=C)
    return reg


@pytest.mark.parametrize("options,message", [
    ({"file": "disk"}, "Parameter 'target' is missing"),
    ({"target": "tmp"}, "Parameter 'file' is missing"),
    ({"file": "disk", "target": "tmp", "bitmap": {"node": "disk", "name": "nope"}}, "Dirty bitmap 'nope' not found"),
    ({"file": "disk", "target": "tmp", "bitmap": {"node": "nonode", "name": "b0"}}, "Node 'nonode' not found"),
    ({"file": "disk", "target": "tmp", "bitmap": {"node": "disk"}}, "Parameter 'bitmap.name' is missing"),
    ({"file": "disk", "target": "tmp", "on-cbw-error": "bad"}, "Parameter 'on-cbw-error' does not accept value 'bad'"),
    ({"file": "disk", "target": "tmp", "cbw-timeout": 1 << 32}, "Parameter 'cbw-timeout' expects uint32_t"),
    ({"file": "disk", "target": "tmp", "cbw-timeout": "1"}, "Invalid parameter type for 'cbw-timeout', expected: "
                                                            "integer"),
    ({"file": "disk", "target": "small"}, "Source and target image have different sizes"),
    ({"file": "disk", "target": "nonode"}, "Cannot find device='nonode' nor node-name='nonode'"),
    ({"file": "disk", "target": "tmp", "bitmap": {"node": "small", "name": "bs"}},
     r"Cannot create block-copy-state: Failed to merge bitmap 'bs' to internal copy-bitmap: Bitmaps are of "
     r"different sizes \(destination size is 1048576, source size is 524288\) and can't be merged"),
])
def test_option_errors(registry: NodeRegistry, options: dict[str, Any], message: str) -> None:
    count = len(registry)
    with pytest.raises(BlockError, match=message):
        open_blockdev({"driver": "copy-before-write", "node-name": "cbw", **options}, registry)
    assert len(registry) == count and all(a.user != "node 'cbw'" for a in users(registry.lookup("disk")))


def test_blockdev_nodes(registry: NodeRegistry) -> None:
    # A bitmap of another node of the same size is accepted, as QEMU does.
    open_blockdev({"driver": "copy-before-write", "node-name": "c2", "file": "disk", "target": "tmp",
                   "bitmap": {"node": "tmp", "name": "bt"}}, registry)
    delete_blockdev(registry, "c2")
    with pytest.raises(BlockdevError, match="Parameter 'file' is missing"):
        open_blockdev({"driver": "snapshot-access", "node-name": "s0"}, registry)
    entry = open_blockdev({"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "tmp",
                           "bitmap": {"node": "disk", "name": "b0"}, "on-cbw-error": "break-snapshot",
                           "cbw-timeout": 5}, registry)
    assert entry.children == {"file": "disk", "target": "tmp"}
    cbw = entry.node
    assert isinstance(cbw, CopyBeforeWrite) and cbw.on_cbw_error == "break-snapshot" and cbw.cbw_timeout == 5
    snap = open_blockdev({"driver": "snapshot-access", "node-name": "snap", "file": "cbw"}, registry).node
    eacces(snap, 0, 1)  # the bitmap b0 is empty: nothing is readable
    with pytest.raises(BlockError, match="Block device cbw is in use"):
        delete_blockdev(registry, "cbw")
    delete_blockdev(registry, "snap")
    delete_blockdev(registry, "cbw")
    registry.lookup("disk").pwritev(0, [b"still open"])
    keyval = open_blockdev({"driver": "copy-before-write", "node-name": "k", "file": "disk", "target": "tmp",
                            "cbw-timeout": "7", "on-cbw-error": "break-guest-write"}, registry, keyval=True)
    assert keyval.node.cbw_timeout == 7  # type: ignore[attr-defined]
    delete_blockdev(registry, "k")


# -- the fleecing flow in a VM, over QMP --------------------------------------------------------------------
def spin_vm(tmp_path: Path) -> tuple[Path, Path, Any]:
    """A 4 MiB qcow2 disk full of 0x11 under virtio-blk device vblk0 (node "disk") of a VM that only spins,
    and an empty 4 MiB qcow2 for the fleecing target. The VM is not started."""
    import pyemu
    from pyemu.target.x86.boot.synthetic import make_multiboot_binary

    disk_path, tmp_img = tmp_path / "disk.qcow2", tmp_path / "fleece.qcow2"
    for path in (disk_path, tmp_img):
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(path), str(4 * MiB)], check=True,
                       capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(disk_path)], check=True,
                   capture_output=True)
    kernel = tmp_path / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    vm = pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S",
                  "-blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={disk_path}",
                  "-device", "virtio-blk-device,drive=disk,id=vblk0")
    return disk_path, tmp_img, vm


def device_backend(vm: Any) -> BlockBackend:
    backend: BlockBackend = next(use.backend for use in vm._instance.machine.drives() if use.device_id == "vblk0")
    return backend


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_fleecing_over_qmp(tmp_path: Path) -> None:
    disk_path, tmp_img, vm = spin_vm(tmp_path)
    with vm:
        vm.start()
        blk = device_backend(vm)
        vm.execute("block-dirty-bitmap-add", {"node": "disk", "name": "inc"})
        blk.pwritev(MiB, [b"\x22" * (2 * C)])  # dirty region: the bitmap the snapshot exports
        vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "tmp",
                                    "file": {"driver": "file", "filename": str(tmp_img)}})
        vm.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
                                    "target": "tmp", "bitmap": {"node": "disk", "name": "inc"}})
        vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "cbw"})
        vm.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "fleece", "file": "cbw"})
        nodes = {n["node-name"]: n for n in vm.execute("query-named-block-nodes")}
        assert nodes["cbw"]["drv"] == "copy-before-write" and nodes["fleece"]["drv"] == "snapshot-access"
        registry = vm._instance.machine.virtio.backends.nodes
        view = registry.lookup("fleece")
        # The guest goes on writing through the filter; the view keeps the moment of insertion.
        blk.pwritev(MiB, [b"\x33" * (3 * C)])
        assert read(view, MiB, 2 * C) == b"\x22" * (2 * C)
        eacces(view, 0, 1)  # outside the bitmap
        assert read(blk, MiB, 3 * C) == b"\x33" * (3 * C)
        # The disk's bitmap still records writes made through the filter.
        (inc,) = [b for b in vm.execute("query-named-block-nodes") if b["node-name"] == "disk"][0]["dirty-bitmaps"]
        assert inc["count"] == 3 * C
        view.discard(MiB, C)
        eacces(view, MiB, 1)
        assert read(view, MiB + C, C) == b"\x22" * C
        # Tear down as QEMU's fleecing test: the view, the device back onto the disk, the filter, the target.
        vm.execute("blockdev-del", {"node-name": "fleece"})
        vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "disk"})
        vm.execute("blockdev-del", {"node-name": "cbw"})
        vm.execute("blockdev-del", {"node-name": "tmp"})
        blk.pwritev(0, [b"\x44" * 512])
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x33 1M 192k", "-c", "read -P 0x44 0 512",
                          str(disk_path)], check=True, capture_output=True, text=True).stdout
    assert "Pattern verification failed" not in out
    subprocess.run(["qemu-img", "check", str(tmp_img)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("nbdinfo") is None or shutil.which("qemu-io") is None,
                    reason="nbdinfo or qemu-io not installed")
def test_fleecing_export_over_nbd_read_by_qemu_tools(tmp_path: Path) -> None:
    """The issue's fleecing flow end to end: target with backing=disk as QEMU's test uses it, the view
    exported over NBD with the (disabled) bitmap, read by qemu-img/qemu-io/nbdinfo while the guest writes."""
    import tempfile

    _, tmp_img, vm = spin_vm(tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="cbw", dir="/tmp"))  # a unix socket path must stay short
    url = f"nbd+unix:///fleece?socket={sock_dir / 'nbd.sock'}"
    try:
        with vm:
            vm.start()
            blk = device_backend(vm)
            vm.execute("block-dirty-bitmap-add", {"node": "disk", "name": "inc"})
            blk.pwritev(MiB, [b"\x22" * MiB])
            vm.execute("block-dirty-bitmap-disable", {"node": "disk", "name": "inc"})
            vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "tmp", "backing": "disk",
                                        "file": {"driver": "file", "filename": str(tmp_img)}})
            vm.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
                                        "target": "tmp", "bitmap": {"node": "disk", "name": "inc"}})
            vm.execute("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "cbw"})
            vm.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "fleece", "file": "cbw"})
            vm.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock_dir / "nbd.sock")}}})
            vm.execute("block-export-add", {"type": "nbd", "id": "e", "node-name": "fleece", "bitmaps": ["inc"]})
            blk.pwritev(0, [b"\x33" * (2 * MiB)])  # the guest overwrites the dirty region after the snapshot
            out = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:inc", url], check=True, capture_output=True,
                                 text=True, timeout=120).stdout.split()
            assert out == ["0", str(MiB), "0", "clean", str(MiB), str(MiB), "1", "dirty", str(2 * MiB),
                           str(2 * MiB), "0", "clean"]
            good = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x22 {MiB} {MiB}", url],
                                  capture_output=True, text=True, timeout=120).stdout
            assert f"read {MiB}/{MiB}" in good and "Pattern verification failed" not in good
            bad = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", url], capture_output=True,
                                 text=True, timeout=120)
            # EACCES has no NBD code: QEMU's server sends NBD_EINVAL for it (qemu-storage-daemon 7.2 does the same).
            assert bad.returncode != 0 and "read failed: Invalid argument" in bad.stdout + bad.stderr
            vm.execute("block-export-del", {"id": "e"})
            vm.execute("nbd-server-stop")
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_discard_of_the_view_marks_no_bitmap_of_the_disk() -> None:
    disk, target, cbw, snap = fleece()
    bitmap = bitmaps_of(disk).create("b0", granularity=C)
    blk = BlockBackend(snap, read_only=False, discard="unmap", owns_root=False)
    blk.discard(0, 2 * C)
    with pytest.raises(BlockIOError):
        blk.pwritev(0, [b"x"])  # refused by the view, and no mark either
    assert bitmap.count() == 0
    eacces(snap, 0, 1)
    blk.close()
