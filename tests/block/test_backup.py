"""The backup job (pyemu.block.backup): point in time under concurrent guest writes, sync modes, bitmap modes,
error policies, and blockdev-backup / transaction over QMP with QEMU 7.2's messages (recorded with
qemu-storage-daemon 7.2). Direct tests use in-memory nodes (memdisk) and a real BlockBackend; the QMP tests
an in-process pyemu.VM with -blockdev nodes, and qemu-img compare on the image files."""

from __future__ import annotations

import errno
import shutil
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import pyemu
from memdisk import KiB, MiB, MemDisk, pattern
from pyemu.api.errors import CommandError
from pyemu.block.backend import BlockBackend
from pyemu.block.backup import BackupError, BackupJob, create_backup
from pyemu.block.copy_before_write import CopyBeforeWrite
from pyemu.block.dirty_bitmap import bitmaps_of
from pyemu.testing.job_events import JobEventLog
from pyemu.jobs.job import JobManager, JobStatus
from pyemu.target.x86.boot.synthetic import make_multiboot_binary

C = 64 * KiB
WAIT = 60.0


Recorder = JobEventLog


def backup(nodes: dict[str, Any], rec: Recorder, manager: JobManager, backends: dict[int, list[Any]] | None = None,
           **args: Any) -> BackupJob:
    def resolve(name: str) -> Any:
        if name not in nodes:
            raise BackupError(f"Cannot find device='{name}' nor node-name='{name}'")
        return nodes[name]

    job = create_backup({"device": "src", "target": "tgt", "sync": "full", "job-id": "j", **args},
                        resolve=resolve, backends_of=lambda node: (backends or {}).get(id(node), []),
                        emit=rec, check_id=manager.check_new_id, node_name_taken=lambda name: name in nodes)
    return manager.add(job)  # type: ignore[return-value]


def test_full_backup_is_point_in_time_under_concurrent_writes() -> None:
    size = 4 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    rec, manager = Recorder(), JobManager(Recorder())
    snapshot = bytes(src.data)
    job = backup({"src": src, "tgt": tgt}, rec, manager, backends={id(src): [drive]}, speed=1 * MiB)
    assert isinstance(drive.root, CopyBeforeWrite)  # the filter is in the drive from the job's creation
    job.start()
    stop = threading.Event()

    def writer() -> None:  # the "guest": writes everywhere, through the drive, while the job copies
        n = 0
        while not stop.is_set():
            drive.pwritev((n * 37 % 64) * C + 512, [bytes([n % 251 + 1]) * 4096])
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    rec.wait(lambda: ("JOB_STATUS_CHANGE", {"id": "j", "status": "null"}) in rec.events)
    stop.set()
    thread.join(WAIT)
    assert bytes(tgt.data) == snapshot
    assert bytes(src.data) != snapshot  # the guest really wrote during the job
    assert drive.root is src  # filter gone
    assert rec.names() == ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    completed = rec.events[4][1]
    assert completed == {"device": "j", "len": size, "offset": size, "speed": 1 * MiB, "type": "backup"}


def test_sync_top_skips_unallocated() -> None:
    size = 1 * MiB
    src = MemDisk(size, data=pattern(size), unallocated=[(256 * KiB, 512 * KiB)])
    tgt = MemDisk(size)
    rec = Recorder()
    job = backup({"src": src, "tgt": tgt}, rec, JobManager(rec), sync="top")
    job.start()
    rec.wait_status("j", "null")
    assert tgt.writes_in(256 * KiB, 512 * KiB) == []
    assert bytes(tgt.data[:256 * KiB]) == bytes(src.data[:256 * KiB])
    assert bytes(tgt.data[768 * KiB:]) == bytes(src.data[768 * KiB:])


def test_sync_bitmap_copies_exactly_the_dirty_clusters_and_modes() -> None:
    size = 1 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    bitmap = bitmaps_of(src).create("b", granularity=C)
    bitmap.set_range(2 * C, 10)
    bitmap.set_range(9 * C, 2 * C)
    rec = Recorder()
    job = backup({"src": src, "tgt": tgt}, rec, JobManager(rec), sync="incremental", bitmap="b")
    assert bitmap.busy
    job.start()
    rec.wait_status("j", "null")
    written = sorted({off // C for _op, off, length in tgt.log for off in range(off, off + length, C)})
    assert written == [2, 9, 10]
    assert not bitmap.busy and bitmap.count() == 0  # on-success, success: only writes since the start (none)


@pytest.mark.parametrize("mode,cancel,expect", [
    ("on-success", False, {7}),            # success: writes made during the job
    ("on-success", True, {2, 3, 7}),       # failure: original | new
    ("never", False, {2, 3, 7}),           # always original | new
    ("always", True, {3, 7}),              # new | not copied (cluster 2 was in flight and completed)
])
def test_bitmap_modes(mode: str, cancel: bool, expect: set[int]) -> None:
    size = 1 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    bitmap = bitmaps_of(src).create("b", granularity=C)
    bitmap.set_range(2 * C, 2 * C)
    rec = Recorder()
    hold = tgt.hold("write", 2 * C, C)  # keep the job at its first cluster while the guest writes
    # One cluster per job step (x-perf max-chunk), so cluster 3 is not in flight with cluster 2.
    job = backup({"src": src, "tgt": tgt}, rec, JobManager(rec), backends={id(src): [drive]}, sync="bitmap",
                 bitmap="b", **{"bitmap-mode": mode, "x-perf": {"max-chunk": C}})
    job.start()
    assert hold.entered.wait(WAIT)
    drive.pwritev(7 * C, [b"x" * 512])  # a guest write during the job
    if cancel:
        job.cancel()
    hold.release.set()
    rec.wait_status("j", "null")
    dirty = {off // C for off in range(0, size, C) if bitmap.get(off)}
    assert dirty == expect
    assert not bitmap.busy


def test_on_target_error_stop_pauses_and_resume_completes() -> None:
    size = 512 * KiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    tgt.fail["write"] = errno.EIO
    rec = Recorder()
    job = backup({"src": src, "tgt": tgt}, rec, JobManager(rec), **{"on-target-error": "stop"})
    job.start()
    rec.wait_status("j", "paused")
    assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "write", "action": "stop"}) in rec.events
    info = job.block_info()
    assert (info["io-status"], info["paused"], info["status"]) == ("failed", True, "paused")
    del tgt.fail["write"]  # the target heals
    job.user_resume()
    rec.wait_status("j", "null")
    assert bytes(tgt.data) == bytes(src.data)
    assert "BLOCK_JOB_COMPLETED" in rec.names()


def test_target_error_report_fails_the_job() -> None:
    size = 256 * KiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    tgt.fail["write"] = errno.EIO
    rec = Recorder()
    job = backup({"src": src, "tgt": tgt}, rec, JobManager(rec), **{"auto-dismiss": False})
    job.start()
    rec.wait_status("j", "concluded")
    assert rec.names() == ["created", "running", "BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded"]
    assert rec.events[4][1]["error"] == "Input/output error"
    assert job.info()["error"] == "Input/output error"


def test_sync_none_runs_until_cancelled() -> None:
    size = 256 * KiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    old = bytes(src.data[:C])
    rec = Recorder()
    job = backup({"src": src, "tgt": tgt}, rec, JobManager(rec), backends={id(src): [drive]}, sync="none")
    job.start()
    drive.pwritev(0, [b"new" * 100])
    assert bytes(tgt.data[:C]) == old  # the filter copied the old data
    assert tgt.writes_in(C, size - C) == []  # and nothing else
    job.cancel()
    rec.wait_status("j", "null")
    assert rec.names()[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]  # as qsd 7.2
    assert drive.root is src


def test_refusals_change_nothing() -> None:
    size = 256 * KiB
    src, tgt, small = MemDisk(size), MemDisk(size), MemDisk(size // 2)
    ro = MemDisk(size)
    ro.read_only = True  # type: ignore[misc]
    nodes = {"src": src, "tgt": tgt, "small": small, "ro": ro}
    bitmap = bitmaps_of(src).create("b", granularity=C)
    rec, manager = Recorder(), JobManager(Recorder())
    cases = [
        ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"target": "small"}, "Source and target image have different sizes"),
        ({"target": "ro"}, "Could not create node: Block node is read-only"),
        ({"target": "src"}, "Source and target cannot be the same"),
        ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
        ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
        ({"bitmap": "zz", "bitmap-mode": "always"}, "Bitmap 'zz' could not be found"),
        ({"bitmap": "b"}, "Bitmap sync mode must be given when providing a bitmap"),
        ({"sync": "incremental", "bitmap": "b", "bitmap-mode": "never"},
         "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
        ({"bitmap-mode": "never"}, "Cannot specify bitmap sync mode without a bitmap"),
        ({"sync": "none", "bitmap": "b", "bitmap-mode": "never"},
         "sync mode 'none' does not produce meaningful bitmap outputs"),
        ({"compress": True}, "Compression is not supported for this drive "),
        ({"speed": -1}, "Parameter 'speed' expects a non-negative value"),
        ({"x-perf": {"max-chunk": 1000}}, "Required max-chunk (1000) is less than backup cluster size (65536)"),
        ({"x-perf": {"max-chunk": -1}}, "max-chunk must be zero (which means no limit) or positive"),
        ({"x-perf": {"max-workers": 0}}, "max-workers must be between 1 and 2147483647"),
        ({"job-id": "1bad"}, "Invalid job ID '1bad'"),
        ({"filter-node-name": "src"}, "Could not create node: Duplicate nodes with node-name='src'"),
    ]
    for args, message in cases:
        with pytest.raises(BackupError) as info:
            backup(nodes, rec, manager, **args)
        assert str(info.value) == message, args
    busy = backup(nodes, rec, manager, sync="bitmap", bitmap="b", **{"bitmap-mode": "never", "job-id": "busy"})
    with pytest.raises(BackupError, match="^Bitmap 'b' is currently in use by another operation and cannot be used$"):
        backup(nodes, rec, manager, sync="bitmap", bitmap="b", **{"bitmap-mode": "never", "job-id": "x"})
    with pytest.raises(BackupError, match="^Node 'tgt' is busy: block device is in use by block job: backup$"):
        backup({**nodes, "src2": MemDisk(size)}, rec, manager, device="src2", **{"job-id": "y"})
    busy.cancel()
    assert not bitmap.busy and list(manager) == []
    assert tgt.log == [] and src.log == []


# -- over QMP ----------------------------------------------------------------------------------------------
pytestmark_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture
def vm_images(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, tgt, small = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2", tmp_path / "small.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(src), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", "-c", "write -P 9 3M 64k", str(src))
    run("qemu-img", "create", "-f", "qcow2", str(tgt), "4M")
    run("qemu-img", "create", "-f", "qcow2", str(small), "2M")
    return src, tgt, small


def make_vm(tmp_path: Path, src: Path, tgt: Path, small: Path) -> pyemu.VM:
    kernel = tmp_path / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    return pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S",
                    "-blockdev", f"driver=qcow2,node-name=d0,file.driver=file,file.filename={src}",
                    "-device", "virtio-blk-device,drive=d0,id=vblk0",
                    "-blockdev", f"driver=qcow2,node-name=t0,file.driver=file,file.filename={tgt}",
                    "-blockdev", f"driver=qcow2,node-name=s0,file.driver=file,file.filename={small}")


def refused(vm: pyemu.VM, command: str, args: dict[str, Any], message: str, cls: str = "GenericError") -> None:
    with pytest.raises(CommandError) as info:
        vm.execute(command, args)
    assert (info.value.error_class, info.value.desc) == (cls, message)


@pytestmark_qemu
def test_qmp_full_backup_equals_source(tmp_path: Path, vm_images: tuple[Path, Path, Path]) -> None:
    src, tgt, small = vm_images
    with make_vm(tmp_path, src, tgt, small) as vm:
        vm.start()
        refused(vm, "blockdev-backup", {"device": "d0", "target": "s0", "sync": "full", "job-id": "j"},
                "Source and target image have different sizes")
        refused(vm, "blockdev-backup", {"device": "nope", "target": "t0", "sync": "full", "job-id": "j"},
                "Cannot find device='nope' nor node-name='nope'")
        refused(vm, "blockdev-backup", {"device": "d0", "target": "t0", "sync": "full"}, "Invalid job ID ''")
        assert vm.execute("blockdev-backup", {"device": "d0", "target": "t0", "sync": "full", "job-id": "j",
                                              "auto-dismiss": False}) == {}
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        (info,) = vm.execute("query-jobs")
        assert info == {"id": "j", "type": "backup", "status": "concluded", "current-progress": 4 * MiB,
                        "total-progress": 4 * MiB}
        (binfo,) = vm.execute("query-block-jobs")
        assert (binfo["device"], binfo["status"], binfo["io-status"], binfo["len"]) == ("j", "concluded", "ok",
                                                                                       4 * MiB)
        refused(vm, "block-job-pause", {"device": "nope"}, "Block job 'nope' not found", "DeviceNotActive")
        refused(vm, "job-pause", {"id": "nope"}, "Job not found")
        refused(vm, "job-pause", {"id": "j"}, "Job 'j' in state 'concluded' cannot accept command verb 'pause'")
        vm.execute("block-job-dismiss", {"id": "j"})
        assert vm.execute("query-jobs") == []
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src), str(tgt)], check=True,
                   capture_output=True, timeout=120)


@pytestmark_qemu
def test_qmp_compressed_backup(tmp_path: Path, vm_images: tuple[Path, Path, Path]) -> None:
    """compress=true writes the target's data clusters compressed (qemu-img map says so) and equal."""
    src, tgt, small = vm_images
    with make_vm(tmp_path, src, tgt, small) as vm:
        vm.start()
        vm.execute("blockdev-backup", {"device": "d0", "target": "t0", "sync": "full", "job-id": "j",
                                       "compress": True})
        event = vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        assert "error" not in event.data, event.data
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(src), str(tgt)], check=True,
                   capture_output=True, timeout=120)
    extents = json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", str(tgt)))
    data = [e for e in extents if e["data"]]
    # QEMU 7.2's map gives compressed clusters no host "offset"; the patterned MiB packs into a few KiB.
    assert data and all("offset" not in e for e in data), data
    assert tgt.stat().st_size < 512 * 1024
    run("qemu-img", "check", str(tgt))


@pytestmark_qemu
def test_qmp_transaction_abort_leaves_neither(tmp_path: Path, vm_images: tuple[Path, Path, Path]) -> None:
    src, tgt, small = vm_images
    with make_vm(tmp_path, src, tgt, small) as vm:
        vm.start()
        refused(vm, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "inc"}},
            {"type": "blockdev-backup", "data": {"device": "d0", "target": "t0", "sync": "full", "job-id": "t"}},
            {"type": "abort", "data": {}}]}, "Transaction aborted using Abort action")
        assert vm.execute("query-jobs") == []
        assert "dirty-bitmaps" not in vm.execute("query-named-block-nodes")[-1]
        assert not any(n.get("dirty-bitmaps") for n in vm.execute("query-named-block-nodes"))
        # the recipe that works: bitmap-add + full backup together
        vm.execute("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "inc"}},
            {"type": "blockdev-backup", "data": {"device": "d0", "target": "t0", "sync": "full", "job-id": "t"}}]})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        vm.events.wait_for("JOB_STATUS_CHANGE", WAIT)
        assert any(b["name"] == "inc" for n in vm.execute("query-named-block-nodes")
                   for b in n.get("dirty-bitmaps", []))


@pytestmark_qemu
def test_vm_close_cancels_a_running_backup(tmp_path: Path, vm_images: tuple[Path, Path, Path]) -> None:
    src, tgt, small = vm_images
    vm = make_vm(tmp_path, src, tgt, small)
    with vm:
        vm.start()
        vm.execute("blockdev-backup", {"device": "d0", "target": "t0", "sync": "full", "job-id": "slow",
                                       "speed": 1})
        (info,) = vm.execute("query-block-jobs")
        assert (info["status"], info["speed"]) == ("running", 1)
        vm.execute("block-job-set-speed", {"device": "slow", "speed": 2})
        refused(vm, "blockdev-del", {"node-name": "t0"},
                "Node 't0' is busy: block device is in use by block job: backup")
        refused(vm, "block-job-set-speed", {"device": "slow", "speed": -1},
                "Parameter 'speed' expects a non-negative value")
        job = vm._instance.control.jobs.get("slow")
    assert job.status is JobStatus.NULL  # cancelled and finished before the nodes closed
    assert job._thread is not None and not job._thread.is_alive()
    run("qemu-img", "check", str(src))


@pytestmark_qemu
def test_qmp_grouped_transaction(tmp_path: Path, vm_images: tuple[Path, Path, Path]) -> None:
    """completion-mode=grouped: bitmap actions refuse it (QEMU's words); two backups in one group -- the
    slow one cancelled -- end cancelled together, the finished one included."""
    src, tgt, small = vm_images
    src2, tgt2 = tmp_path / "src2.qcow2", tmp_path / "tgt2.qcow2"
    for image in (src2, tgt2):
        run("qemu-img", "create", "-f", "qcow2", str(image), "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 5 0 4M", str(src2))
    with make_vm(tmp_path, src, tgt, small) as vm:
        vm.start()
        for name, image in (("d1", src2), ("t1", tgt2)):
            vm.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                        "file": {"driver": "file", "filename": str(image)}})
        grouped = {"completion-mode": "grouped"}
        refused(vm, "transaction", {"actions": [{"type": "block-dirty-bitmap-add",
                                                 "data": {"node": "d0", "name": "b"}}], "properties": grouped},
                "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped")
        vm.execute("transaction", {"properties": grouped, "actions": [
            {"type": "blockdev-backup", "data": {"job-id": "fast", "device": "d0", "target": "t0", "sync": "full"}},
            {"type": "blockdev-backup", "data": {"job-id": "slow", "device": "d1", "target": "t1", "sync": "full",
                                                 "speed": 64 * 1024}}]})
        while True:  # the fast job finished its copy and waits for its group
            event = vm.events.get(WAIT)
            if event.name == "JOB_STATUS_CHANGE" and event.data == {"id": "fast", "status": "waiting"}:
                break
        vm.execute("block-job-cancel", {"device": "slow"})
        ends: dict[str, str] = {}
        while len(ends) < 2:
            event = vm.events.get(WAIT)
            if event.name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                ends[event.data["device"]] = event.name
        assert ends == {"fast": "BLOCK_JOB_CANCELLED", "slow": "BLOCK_JOB_CANCELLED"}
        assert vm.execute("query-jobs") == []


@pytestmark_qemu
def test_qmp_filter_node_name_is_a_node_while_the_job_runs(tmp_path: Path,
                                                           vm_images: tuple[Path, Path, Path]) -> None:
    src, tgt, small = vm_images
    with make_vm(tmp_path, src, tgt, small) as vm:
        vm.start()
        vm.execute("blockdev-backup", {"device": "d0", "target": "t0", "sync": "full", "job-id": "j",
                                       "speed": 64 * 1024, "filter-node-name": "cbw0"})
        nodes = {n["node-name"]: n for n in vm.execute("query-named-block-nodes")}
        assert nodes["cbw0"]["drv"] == "copy-before-write"
        refused(vm, "blockdev-del", {"node-name": "cbw0"}, "Node cbw0 is in use")
        vm.execute("block-job-cancel", {"device": "j"})
        vm.events.wait_for("BLOCK_JOB_CANCELLED", WAIT)
        assert "cbw0" not in {n["node-name"] for n in vm.execute("query-named-block-nodes")}
