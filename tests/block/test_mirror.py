"""The mirror and commit jobs (pyemu.block.mirror, pyemu.block.commit): a "guest" thread writes through the
drive during the job; ready -> complete pivots the drive onto a target equal to the source at the switch;
cancel before/after ready; write-blocking keeps the target in sync; block-commit intermediate and active on
real qcow2 chains over QMP, checked with qemu-img check/compare. Event sequences and messages are QEMU
7.2's, recorded with qemu-storage-daemon 7.2."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pyemu
from memdisk import KiB, MiB, MemDisk, pattern
from pyemu.api.errors import CommandError
from pyemu.block.backend import BlockBackend
from pyemu.block.mirror import MirrorError, MirrorJob, MirrorTop, create_mirror
from pyemu.jobs.job import JobManager
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.job_events import JobEventLog

WAIT = 60.0
C = 64 * KiB
qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def mirror(nodes: dict[str, Any], rec: JobEventLog, manager: JobManager, drive: BlockBackend | None,
           **args: Any) -> MirrorJob:
    def resolve(name: str) -> Any:
        if name not in nodes:
            raise MirrorError(f"Cannot find device='{name}' nor node-name='{name}'")
        return nodes[name]

    job = create_mirror({"device": "src", "target": "tgt", "sync": "full", "job-id": "m", **args}, resolve=resolve,
                        backends_of=lambda node: [drive] if drive is not None and drive.root is node else [],
                        emit=rec, check_id=manager.check_new_id)
    manager.add(job)
    return job


def poll(predicate: Any, what: str) -> None:
    """Wait (generous deadline) for a condition no event announces: the guest thread's progress or data."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.01)


class Writer:
    """The guest: writes small patterns all over the drive until stopped, a write every 0.2 ms at most.

    Why a pause: a background mirror or commit is READY only once it has caught up with the writes, and a
    writer looping without pause on a busy host could out-write the job (both are Python threads sharing
    one GIL) for longer than the test waits (CI, 2026-12-06: no BLOCK_JOB_READY within 60 s). A guest
    writes at a finite rate; write-blocking mode is what keeps up with any rate, and is tested too."""

    PAUSE_S = 0.0002

    def __init__(self, drive: BlockBackend, clusters: int) -> None:
        self.drive, self.clusters = drive, clusters
        self.stop = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            self.drive.pwritev((n * 37 % self.clusters) * C + 512 * (n % 7), [bytes([n % 251 + 1]) * 4096])
            n += 1
            self.count = n
            self.stop.wait(self.PAUSE_S)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)


def ready_mirror_under_writes(size: int) -> tuple[MemDisk, MemDisk, BlockBackend, JobEventLog, MirrorJob, Writer]:
    """A background sync=full mirror of a patterned ``size``-byte disk through a drive a Writer keeps
    writing, started and ready: ``(src, tgt, drive, events, job, writer)``."""
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": src, "tgt": tgt}, rec, manager, drive)
    writer = Writer(drive, size // C)
    job.start()
    rec.wait_status("m", "ready")
    return src, tgt, drive, rec, job, writer


def contents_at_switch(job: MirrorJob, src: MemDisk, tgt: MemDisk) -> dict[str, bytes]:
    """Source and target contents as the job's prepare sees them (drained, just before the switch), under
    keys "src" and "tgt" once it has run."""
    switched: dict[str, bytes] = {}
    original_prepare = job.prepare

    def checked_prepare() -> None:
        switched["src"], switched["tgt"] = bytes(src.data), bytes(tgt.data)
        original_prepare()

    job.prepare = checked_prepare  # type: ignore[method-assign]
    return switched


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_mirror_full_ready_complete_pivots_with_equal_target(copy_mode: str) -> None:
    size = 4 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": src, "tgt": tgt}, rec, manager, drive, **{"copy-mode": copy_mode})
    if copy_mode == "write-blocking":
        assert isinstance(drive.root, MirrorTop)
    writer = Writer(drive, size // C)
    job.start()
    rec.wait_status("m", "ready")
    poll(lambda: writer.count >= 50, "guest writes")  # the guest keeps writing while ready
    switched = contents_at_switch(job, src, tgt)
    manager.get("m").user_complete()
    rec.wait_status("m", "null")
    before = writer.count
    poll(lambda: writer.count > before + 20, "guest writes after the pivot")
    writer.join()
    assert switched["src"] == switched["tgt"]
    assert drive.root is tgt  # the drive now writes the target
    assert bytes(src.data) == switched["src"]  # ... and no longer the source
    assert rec.statuses("m") == ["created", "running", "ready", "waiting", "pending", "concluded", "null"]
    assert [n for n in rec.names() if n.startswith("BLOCK")] == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]


def test_job_complete_finishes_while_the_guest_dirties_faster_than_the_job_copies() -> None:
    """Ready, then the copy is slowed to 64 KiB/s while the guest keeps writing all over the disk: nothing
    is ever clean for long, yet ``job-complete`` finishes, copying what is still dirty with the drive
    drained (FINAL_SYNC_BYTES), and the target equals the source at the switch."""
    src, tgt, drive, rec, job, writer = ready_mirror_under_writes(4 * MiB)
    job.set_speed(64 * KiB)
    poll(lambda: writer.count >= 200, "guest writes")
    switched = contents_at_switch(job, src, tgt)
    job.user_complete()
    rec.wait_status("m", "null")
    writer.join()
    assert switched["src"] == switched["tgt"]
    assert drive.root is tgt


def test_mirror_write_blocking_target_follows_guest_writes_while_ready() -> None:
    size = 1 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": src, "tgt": tgt}, rec, manager, drive, **{"copy-mode": "write-blocking"})
    job.start()
    rec.wait_status("m", "ready")
    for i in range(16):  # each write reaches the target before it completes
        drive.pwritev(i * C + 100, [b"\xab" * 1000])
        assert bytes(tgt.data[i * C + 100:i * C + 1100]) == b"\xab" * 1000
    assert bytes(tgt.data) == bytes(src.data)
    job.cancel(force=True)
    rec.wait_status("m", "null")
    assert drive.root is src
    assert "BLOCK_JOB_CANCELLED" in rec.names()


def test_soft_cancel_after_ready_completes_without_pivot_and_target_is_consistent() -> None:
    src, tgt, drive, rec, job, writer = ready_mirror_under_writes(2 * MiB)
    snap = contents_at_switch(job, src, tgt)
    job.cancel()  # block-job-cancel without force on a ready mirror
    rec.wait_status("m", "null")
    writer.join()
    assert snap["src"] == snap["tgt"]
    assert drive.root is src
    assert [n for n in rec.names() if n.startswith("BLOCK")] == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
    assert rec.statuses("m")[-4:] == ["waiting", "pending", "concluded", "null"]


def test_cancel_before_ready_aborts() -> None:
    size = 4 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": src, "tgt": tgt}, rec, manager, drive, speed=64 * KiB)
    job.start()
    job.cancel()
    rec.wait_status("m", "null")
    assert "ready" not in rec.statuses("m")
    assert rec.statuses("m")[-3:] == ["aborting", "concluded", "null"]
    assert "BLOCK_JOB_CANCELLED" in rec.names()
    assert drive.root is src


def test_sync_top_and_none() -> None:
    size = 1 * MiB
    src = MemDisk(size, data=pattern(size), unallocated=[(C, size - C)])
    tgt = MemDisk(size)
    drive = BlockBackend(src, read_only=False, owns_root=False)
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": src, "tgt": tgt}, rec, manager, drive, sync="top")
    job.start()
    rec.wait_status("m", "ready")
    assert bytes(tgt.data[:C]) == bytes(src.data[:C])
    assert bytes(tgt.data[C:]) == bytes(size - C)  # unallocated: not copied
    src.unallocated = []  # the guest's write allocates (MemDisk keeps its list as given)
    drive.pwritev(3 * C, [b"\x11" * C])
    poll(lambda: bytes(tgt.data[3 * C:4 * C]) == b"\x11" * C, "guest write mirrored")
    job.user_complete()
    rec.wait_status("m", "null")
    assert drive.root is tgt

    src2, tgt2 = MemDisk(size, data=pattern(size)), MemDisk(size)
    drive2 = BlockBackend(src2, read_only=False, owns_root=False)
    rec2 = JobEventLog()
    job2 = mirror({"src": src2, "tgt": tgt2}, rec2, manager, drive2, sync="none", **{"job-id": "n"})
    job2.start()
    rec2.wait_status("n", "ready")
    drive2.pwritev(5 * C, [b"\x22" * 512])
    job2.user_complete()
    rec2.wait_status("n", "null")
    assert bytes(tgt2.data[5 * C:5 * C + 512]) == b"\x22" * 512
    assert bytes(tgt2.data[:5 * C]) == bytes(5 * C)  # only the writes made during the job


def test_target_write_error_report_fails_the_job() -> None:
    size = 1 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    tgt.fail["write"] = 5
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": src, "tgt": tgt}, rec, manager, None)
    job.start()
    rec.wait_status("m", "null")
    assert ("BLOCK_JOB_ERROR", {"device": "m", "operation": "write", "action": "report"}) in rec.events
    completed = [d for n, d in rec.events if n == "BLOCK_JOB_COMPLETED"]
    assert completed and completed[0]["error"] == "Input/output error"


@pytest.mark.parametrize("args, message", [
    ({"target": "src"}, "Can't mirror node into itself"),
    ({"device": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"sync": "incremental"}, "Sync mode 'incremental' not supported"),
    ({"sync": "bitmap"}, "Sync mode 'bitmap' not supported"),
    ({"granularity": 1000}, "Parameter 'granularity' expects a power of 2"),
    ({"granularity": 256}, "Parameter 'granularity' expects a value in range [512B, 64MB]"),
    ({"granularity": 128 * MiB}, "Parameter 'granularity' expects a value in range [512B, 64MB]"),
    ({"buf-size": -1}, "Invalid parameter 'buf-size'"),
    ({"speed": -1}, "Parameter 'speed' expects a non-negative value"),
    ({"job-id": "1x"}, "Invalid job ID '1x'"),
    ({"replaces": "foo"}, "Failed to find node with node-name='foo'"),
])
def test_qemu_refusals(args: dict[str, Any], message: str) -> None:
    src, tgt = MemDisk(MiB), MemDisk(MiB)
    with pytest.raises(MirrorError) as info:
        mirror({"src": src, "tgt": tgt}, JobEventLog(), JobManager(JobEventLog()), None, **args)
    assert str(info.value) == message


def test_size_mismatch_fails_when_running_as_qemu() -> None:
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": MemDisk(MiB), "tgt": MemDisk(2 * MiB)}, rec, manager, None)
    job.start()
    rec.wait_status("m", "null")
    assert rec.statuses("m") == ["created", "running", "aborting", "concluded", "null"]
    (done,) = [d for n, d in rec.events if n == "BLOCK_JOB_COMPLETED"]
    assert done == {"device": "m", "len": 0, "offset": 0, "speed": 0, "type": "mirror",
                    "error": "Source and target image have different sizes"}


# -- QMP, real qcow2 files --------------------------------------------------------------------------------
def _img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def _io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True, capture_output=True)


def make_vm(tmp_path: Path, *blockdevs: str, device: str) -> pyemu.VM:
    kernel = tmp_path / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    args = ["-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S"]
    for spec in blockdevs:
        args += ["-blockdev", spec]
    args += ["-device", f"virtio-blk-device,drive={device},id=vblk0"]
    return pyemu.VM(*args)


def _qcow2(name: str, path: Path, **extra: str) -> str:
    spec = f"driver=qcow2,node-name={name},file.driver=file,file.filename={path}"
    return ",".join([spec, *(f"{k}={v}" for k, v in extra.items())])


@qemu_img
def test_qmp_block_commit_intermediate_and_active(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.qcow2", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    _img("create", "-f", "qcow2", str(base), "4M")
    _io(base, "write -P 0x11 0 4M")
    _img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid))
    _io(mid, "write -P 0x22 1M 1M")
    _img("create", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    _io(top, "write -P 0x33 3M 512k")
    expected = tmp_path / "expected.raw"
    _img("convert", "-O", "raw", str(top), str(expected))
    with make_vm(tmp_path, _qcow2("base", base), _qcow2("mid", mid, backing="base"),
                 _qcow2("top", top, backing="mid"), device="top") as vm:
        vm.start()
        for args, message, cls in [
            ({"device": "nope"}, "Device 'nope' not found", "DeviceNotFound"),
            ({"device": "top", "top-node": "nope"}, "Cannot find device='' nor node-name='nope'", "GenericError"),
            ({"device": "top", "base-node": "top"}, "cannot commit an image into itself", "GenericError"),
            ({"device": "top", "base": "x", "base-node": "base"}, "'base-node' and 'base' are mutually exclusive",
             "GenericError"),
            ({"device": "top", "top": str(tmp_path / "no.qcow2")}, f"Top image file {tmp_path / 'no.qcow2'} not found",
             "GenericError"),
        ]:
            with pytest.raises(CommandError) as info:
                vm.execute("block-commit", args)
            assert (info.value.error_class, info.value.desc) == (cls, message)
        # intermediate: mid into base; top's header now names base
        vm.execute("block-commit", {"device": "top", "job-id": "c1", "top-node": "mid", "base-node": "base"})
        done = vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        assert done.data == {"device": "c1", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0, "type": "commit"}
        assert "backing file: " + str(base) in _img("info", "-U", str(top))
        # active: top into base, ready, complete -> the drive runs on base
        vm.execute("block-commit", {"device": "top", "job-id": "c2", "base-node": "base"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        vm.execute("job-complete", {"id": "c2"})
        done = vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        assert "error" not in done.data
    _img("check", str(base))
    _img("compare", "-f", "raw", "-F", "qcow2", str(expected), str(base))


@qemu_img
def test_qmp_drive_mirror_creates_target_and_pivots(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    _img("create", "-f", "qcow2", str(src), "4M")
    _io(src, "write -P 0x5a 512k 1M")
    target = tmp_path / "dm.qcow2"
    with make_vm(tmp_path, _qcow2("d0", src), device="d0") as vm:
        vm.start()
        vm.execute("drive-mirror", {"device": "d0", "target": str(target), "sync": "full", "format": "qcow2",
                                    "job-id": "d"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        vm.execute("job-complete", {"id": "d"})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        with pytest.raises(CommandError) as info:
            vm.execute("drive-mirror", {"device": "d0", "target": str(tmp_path / "no.qcow2"), "sync": "full",
                                        "mode": "existing", "job-id": "d2"})
        assert info.value.desc == f"Could not open '{tmp_path / 'no.qcow2'}': No such file or directory"
    _img("check", str(target))
    _img("compare", str(src), str(target))


@qemu_img
def test_qmp_blockdev_mirror_cancel_verbs_as_qemu(tmp_path: Path) -> None:
    """QEMU 7.2: job-cancel of a ready mirror aborts (BLOCK_JOB_CANCELLED); block-job-cancel without force
    completes it without a pivot (BLOCK_JOB_COMPLETED); query-block-jobs shows it ready."""
    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    for path in (src, tgt):
        _img("create", "-f", "qcow2", str(path), "4M")
    _io(src, "write -P 0x42 0 2M")
    with make_vm(tmp_path, _qcow2("d0", src), _qcow2("t0", tgt), device="d0") as vm:
        vm.start()
        vm.execute("blockdev-mirror", {"job-id": "m", "device": "d0", "target": "t0", "sync": "full"})
        ready = vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        assert ready.data == {"device": "m", "len": 4 * MiB, "offset": 4 * MiB, "speed": 0, "type": "mirror"}
        (info,) = vm.execute("query-block-jobs")
        assert (info["status"], info["ready"], info["type"], info["len"]) == ("ready", True, "mirror", 4 * MiB)
        with pytest.raises(CommandError) as refused:
            vm.execute("blockdev-del", {"node-name": "t0"})
        assert refused.value.desc == "Node t0 is in use"
        with pytest.raises(CommandError) as refused:  # QEMU: the source is below the running job's filter
            vm.execute("blockdev-mirror", {"job-id": "x", "sync": "full", "device": "d0", "target": "t0"})
        assert refused.value.desc == "Need a root block node"
        vm.execute("job-cancel", {"id": "m"})
        vm.events.wait_for("BLOCK_JOB_CANCELLED", WAIT)
        vm.execute("blockdev-mirror", {"job-id": "m2", "device": "d0", "target": "t0", "sync": "full"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        vm.execute("block-job-cancel", {"device": "m2"})
        done = vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        assert done.data["device"] == "m2" and "error" not in done.data
        assert vm.execute("query-block-jobs") == []
    _img("compare", str(src), str(tgt))


@qemu_img
def test_qmp_active_commit_with_guest_writes_pivots_onto_base(tmp_path: Path) -> None:
    """The drive keeps writing the active layer during an active commit; after job-complete it runs on
    base, whose contents equal what the drive showed at the switch (qemu-img compare against a raw copy)."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    _img("create", "-f", "qcow2", str(base), "4M")
    _io(base, "write -P 0x11 0 4M")
    _img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    _io(top, "write -P 0x33 1M 1M")
    with make_vm(tmp_path, _qcow2("base", base), _qcow2("top", top, backing="base"), device="top") as vm:
        vm.start()
        drive: BlockBackend = next(u.backend for u in vm._instance.machine.drives())  # type: ignore[union-attr]
        writer = Writer(drive, (4 * MiB) // C)
        vm.execute("block-commit", {"device": "top", "job-id": "c", "base-node": "base"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        poll(lambda: writer.count >= 50, "guest writes")
        vm.execute("job-complete", {"id": "c"})
        done = vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        writer.join()
        assert "error" not in done.data
        assert drive.root.filename == str(base)
        seen = bytearray(4 * MiB)
        drive.preadv(0, [memoryview(seen)])
        (tmp_path / "seen.raw").write_bytes(bytes(seen))
    _img("check", str(base))
    _img("compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "seen.raw"), str(base))


@qemu_img
def test_qmp_write_blocking_mirror_with_guest_writes(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    for path in (src, tgt):
        _img("create", "-f", "qcow2", str(path), "4M")
    _io(src, "write -P 0x42 0 3M")
    with make_vm(tmp_path, _qcow2("d0", src), _qcow2("t0", tgt), device="d0") as vm:
        vm.start()
        drive: BlockBackend = next(u.backend for u in vm._instance.machine.drives())  # type: ignore[union-attr]
        writer = Writer(drive, (4 * MiB) // C)
        vm.execute("blockdev-mirror", {"job-id": "m", "device": "d0", "target": "t0", "sync": "full",
                                       "copy-mode": "write-blocking", "filter-node-name": "mt"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        nodes = {n["node-name"]: n["drv"] for n in vm.execute("query-named-block-nodes", {"flat": True})}
        assert nodes["mt"] == "mirror_top"
        poll(lambda: writer.count >= 50, "guest writes")
        vm.execute("job-complete", {"id": "m"})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        before = writer.count
        poll(lambda: writer.count > before + 10, "guest writes after the pivot")
        writer.join()
        assert drive.root.filename == str(tgt)
        assert "mt" not in [n["node-name"] for n in vm.execute("query-named-block-nodes", {"flat": True})]
    _img("check", str(tgt))
    _img("check", str(src))


@qemu_img
def test_qmp_drive_mirror_sync_top_new_image_backs_onto_source_backing(tmp_path: Path) -> None:
    base, src, target = tmp_path / "base.qcow2", tmp_path / "src.qcow2", tmp_path / "dm.qcow2"
    _img("create", "-f", "qcow2", str(base), "4M")
    _io(base, "write -P 0x11 0 4M")
    _img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(src))
    _io(src, "write -P 0x77 2M 64k")
    with make_vm(tmp_path, _qcow2("d0", src), device="d0") as vm:
        vm.start()
        vm.execute("drive-mirror", {"device": "d0", "target": str(target), "sync": "top", "job-id": "d",
                                    "node-name": "dm"})
        ready = vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        assert ready.data["len"] == 64 * KiB  # only what the top allocates
        vm.execute("job-complete", {"id": "d"})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        names = [n["node-name"] for n in vm.execute("query-named-block-nodes", {"flat": True})]
        assert "dm" in names
    assert f"backing file: {base}" in _img("info", str(target))
    _img("check", str(target))
    _img("compare", str(src), str(target))


@qemu_img
def test_vm_close_with_a_ready_mirror_cancels_it_and_releases_the_nodes(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    for path in (src, tgt):
        _img("create", "-f", "qcow2", str(path), "4M")
    with make_vm(tmp_path, _qcow2("d0", src), _qcow2("t0", tgt), device="d0") as vm:
        vm.start()
        vm.execute("blockdev-mirror", {"job-id": "m", "device": "d0", "target": "t0", "sync": "full",
                                       "copy-mode": "write-blocking", "speed": 1})
        vm.events.wait_for("JOB_STATUS_CHANGE", WAIT)
    _img("check", str(src))  # both images closed (no lock left) and consistent
    _img("check", str(tgt))


def test_target_error_stop_pauses_and_resume_retries() -> None:
    size = 1 * MiB
    src, tgt = MemDisk(size, data=pattern(size)), MemDisk(size)
    tgt.fail["write"] = 28  # ENOSPC
    rec, manager = JobEventLog(), JobManager(JobEventLog())
    job = mirror({"src": src, "tgt": tgt}, rec, manager, None, **{"on-target-error": "enospc"})
    job.start()
    rec.wait_status("m", "paused")
    assert ("BLOCK_JOB_ERROR", {"device": "m", "operation": "write", "action": "stop"}) in rec.events
    assert job.block_info()["io-status"] == "nospace"
    del tgt.fail["write"]
    job.user_resume()
    rec.wait_status("m", "ready")
    assert bytes(tgt.data) == bytes(src.data)
    job.cancel()
    rec.wait_status("m", "null")


@qemu_img
def test_qmp_drive_mirror_sync_none_new_image_backs_onto_the_source(tmp_path: Path) -> None:
    src, target = tmp_path / "src.qcow2", tmp_path / "dm.qcow2"
    _img("create", "-f", "qcow2", str(src), "4M")
    _io(src, "write -P 0x66 0 1M")
    with make_vm(tmp_path, _qcow2("d0", src), device="d0") as vm:
        vm.start()
        vm.execute("drive-mirror", {"device": "d0", "target": str(target), "sync": "none", "job-id": "d"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        vm.execute("job-complete", {"id": "d"})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        drive: BlockBackend = next(u.backend for u in vm._instance.machine.drives())  # type: ignore[union-attr]
        seen = bytearray(MiB)
        drive.preadv(0, [memoryview(seen)])  # the drive, now on the new image, reads the old data through it
        assert bytes(seen) == b"\x66" * MiB
    assert f"backing file: {src}" in _img("info", str(target))
    _img("compare", str(src), str(target))
