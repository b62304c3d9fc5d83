"""Whole-VM internal snapshots: savevm/loadvm/delvm, info snapshots, QMP snapshot-save/-load/-delete jobs
and -loadvm, with the counting guest program under the software CPU; the images stay valid for qemu-img
(``snapshot -l`` lists pyemu's snapshots with their VM size, ``check`` finds nothing)."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import pyemu
from pyemu.block.image import open_image
from pyemu.block.qcow2.create import create_qcow2
from pyemu.block.qcow2.layout import OFFSET_MASK
from pyemu.block.qcow2.vmstate import VmStateError, VmStateReader, VmStateWriter, vm_state_offset
from pyemu.errors import PyemuError
from pyemu.system.runstate import RunState

from migration_programs import write_counter_kernel
from test_migration_guest import BASE, TIMEOUT, counter, stop_vm, wait_counting
MARK_ADDR = 0x500000  # RAM the counter program never touches


def qemu_img(*args: str) -> str:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def drive_args(path: Path, drive_id: str, fmt: str = "qcow2") -> tuple[str, ...]:
    return ("-drive", f"file={path},if=none,id={drive_id},format={fmt}",
            "-device", f"virtio-blk-device,drive={drive_id}")


def hmp(vm: pyemu.VM, line: str) -> str:
    return str(vm.execute("human-monitor-command", {"command-line": line}))


@pytest.fixture
def kernel(short_dir: Path) -> Path:
    return write_counter_kernel(short_dir)


@pytest.fixture
def disk(short_dir: Path) -> Path:
    path = short_dir / "disk.qcow2"
    create_qcow2(str(path), 16 << 20)
    return path


@pytest.fixture
def vm(kernel: Path, disk: Path) -> Iterator[pyemu.VM]:
    machine = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"))
    machine.start()
    yield machine
    assert stop_vm(machine) == 0  # the program's own invariants (counter == ebx, TSC monotonic) held


# -- the qcow2 VM-state area -----------------------------------------------------------------------------
def test_vmstate_area_round_trip_and_qemu_img_sees_a_clean_image(disk: Path) -> None:
    image = open_image(str(disk), read_only=False)
    image.pwritev(0, [b"A" * 70000])
    state = os.urandom(3 << 20) + b"end"
    writer = VmStateWriter(image)
    writer.write(state[:100])
    writer.write(state[100:])
    size = writer.finish()
    assert size == len(state)
    image.create_snapshot("s1", vm_state_size=size, vm_clock_nsec=1_234_000_000, icount=None)
    image.drop_active_vmstate()
    # The active image no longer maps the area; the snapshot's L1 does.
    first = image.geometry.l1_entries_for(image.size())
    assert not any(entry & OFFSET_MASK for entry in image.map.l1[first:])
    image.pwritev(0, [b"B" * 70000])
    snap = image.snapshots()[0]
    assert io.BufferedReader(VmStateReader(image, snap)).read() == state
    with pytest.raises(VmStateError):
        image.read_snapshot_vmstate(snap, image.snapshot_l1(snap), size - 2, 3)
    image.close()
    listing = qemu_img("snapshot", "-l", str(disk))
    row = [line for line in listing.splitlines() if " s1 " in f" {line} "][0]
    assert "3 MiB" in row and "00:00:01.234" in row and row.rstrip().endswith("00:00:01.234")  # no ICOUNT
    assert "No errors were found" in qemu_img("check", str(disk))
    image = open_image(str(disk), read_only=False)
    image.apply_snapshot("s1")
    buf = bytearray(4)
    image.preadv(0, [memoryview(buf)])
    assert buf == b"AAAA"
    image.delete_snapshot("s1")
    image.close()
    assert "No errors were found" in qemu_img("check", str(disk))


def test_vmstate_offset_is_the_first_l1_entry_past_the_disk(disk: Path) -> None:
    image = open_image(str(disk), read_only=True)
    try:
        per_l1 = (image.cluster_size // 8) * image.cluster_size  # 64 KiB clusters: 512 MiB per L1 entry
        assert vm_state_offset(image) == per_l1
        assert vm_state_offset(image, per_l1 + 1) == 2 * per_l1
    finally:
        image.close()


# -- HMP -----------------------------------------------------------------------------------------------
def test_savevm_loadvm_returns_to_the_saved_count_and_ram(vm: pyemu.VM, disk: Path) -> None:
    machine = vm._instance.machine
    wait_counting(vm, 100_000)
    machine.memory.write(MARK_ADDR, b"before")
    assert hmp(vm, "savevm s1") == ""
    assert vm.state is RunState.RUNNING  # savevm runs the VM on
    machine.memory.write(MARK_ADDR, b"after!")
    vm.pause()
    saved = machine.vcpus[0].save_state().regs["rbx"]
    vm.resume()
    listing = hmp(vm, "info snapshots")
    lines = listing.splitlines()
    assert lines[0] == "List of snapshots present on all disks:"
    assert lines[1] == "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
    assert lines[2].startswith("--        s1  ") and "KiB" in lines[2]
    wait_counting(vm, saved + 1_000_000)
    events_before = len(vm.events.drain())
    assert events_before >= 0
    assert hmp(vm, "loadvm s1") == ""
    assert vm.state is RunState.RUNNING  # a running VM runs on from the loaded state
    assert [e.name for e in vm.events.drain()] == ["STOP", "RESUME"]
    wait_counting(vm, saved + 1_000_000)
    vm.pause()
    assert hmp(vm, "loadvm s1") == ""
    assert vm.state is RunState.PAUSED  # a stopped VM stays stopped
    resumed = counter(vm)
    assert resumed <= saved  # the count at the save (the guest ran on after it, up to 'saved')
    assert machine.vcpus[0].save_state().regs["rbx"] == resumed  # registers and RAM of the same moment
    assert machine.memory.read(MARK_ADDR, 6) == b"before"
    vm.resume()
    wait_counting(vm, resumed + 1000)  # and it runs on from there
    assert hmp(vm, "delvm s1") == ""
    assert hmp(vm, "info snapshots") == "There is no snapshot available.\r\n"


def test_savevm_without_a_name_and_qemu_img_lists_it(kernel: Path, disk: Path) -> None:
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"))
    vm.start()
    try:
        wait_counting(vm, 1000)
        assert hmp(vm, "savevm") == ""
        assert hmp(vm, "savevm keep") == ""
        assert hmp(vm, "savevm keep") == ""  # HMP savevm replaces a snapshot of the same name
    finally:
        assert stop_vm(vm) == 0
    listing = qemu_img("snapshot", "-l", str(disk)).splitlines()
    names = [line.split()[1] for line in listing[2:]]
    assert len(names) == 2 and names[0].startswith("vm-2") and names[1] == "keep"
    assert all("KiB" in line for line in listing[2:])  # the VM SIZE column
    assert "No errors were found" in qemu_img("check", str(disk))


def test_refusals_leave_the_vm_running_unchanged(kernel: Path, disk: Path, short_dir: Path) -> None:
    raw = short_dir / "raw.img"
    raw.write_bytes(bytes(1 << 20))
    other = short_dir / "other.qcow2"
    create_qcow2(str(other), 1 << 20)
    qemu_img("snapshot", "-c", "diskonly", str(disk))
    qemu_img("snapshot", "-c", "diskonly", str(other))
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"), *drive_args(other, "d1"))
    vm.start()
    try:
        wait_counting(vm, 1000)
        assert hmp(vm, "loadvm nope") == "Error: Snapshot 'nope' does not exist in one or more devices\r\n"
        assert hmp(vm, "loadvm diskonly") == \
            "Error: This is a disk-only snapshot. Revert to it offline using qemu-img\r\n"
        assert hmp(vm, "loadvm") == 'loadvm: string expected\r\nTry "help loadvm" for more information\r\n'
        machine = vm._instance.machine
        disk1 = next(u.backend for u in machine.drives() if u.drive_id == "d1")
        assert hmp(vm, "savevm both") == ""
        disk1.root.delete_snapshot("both")  # now one drive lacks it
        assert hmp(vm, "loadvm both") == "Error: Snapshot 'both' does not exist in one or more devices\r\n"
        assert vm.state is RunState.RUNNING
        wait_counting(vm, counter(vm) + 1000)
        assert hmp(vm, "delvm nope") == ""  # as QEMU: nothing to delete is no error
    finally:
        assert stop_vm(vm) == 0
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"), *drive_args(raw, "d1", "raw"))
    vm.start()
    try:
        assert hmp(vm, "savevm x") == "Error: Device 'd1' is writable but does not support snapshots\r\n"
        assert vm.state is RunState.RUNNING
    finally:
        assert stop_vm(vm) == 0


def _corrupt_vmstate(image: Any, name: str) -> None:
    """Flip bytes in the middle of snapshot ``name``'s VM state, in the image file itself."""
    snap = next(s for s in image.snapshots() if s.name == name)
    l1 = image.snapshot_l1(snap)
    guest = vm_state_offset(image, snap.disk_size) + snap.vm_state_size // 2
    vcluster = guest // image.cluster_size
    l2_bits = image.geometry.l2_bits
    table = image.map.load_l2(l1[vcluster >> l2_bits] & OFFSET_MASK, what="test")
    word, _ = image.map.table_entry(table, vcluster & ((1 << l2_bits) - 1))
    host = (word & OFFSET_MASK) + guest % image.cluster_size
    with open(image.filename, "r+b") as f:
        f.seek(host)
        old = f.read(16)
        f.seek(host)
        f.write(bytes(b ^ 0xFF for b in old))


def test_a_corrupt_vm_state_is_refused_before_anything_changes(vm: pyemu.VM) -> None:
    machine = vm._instance.machine
    wait_counting(vm, 1000)
    assert hmp(vm, "savevm s1") == ""
    image = machine.drives()[0].backend.root
    _corrupt_vmstate(image, "s1")
    machine.memory.write(MARK_ADDR, b"later!")
    answer = hmp(vm, "loadvm s1")
    assert answer.startswith("Error: Error -22 while loading VM state: "), answer
    assert vm.state is RunState.RUNNING
    assert machine.memory.read(MARK_ADDR, 6) == b"later!"
    wait_counting(vm, counter(vm) + 1000)


# -- QMP jobs ----------------------------------------------------------------------------------------------
def _job_events(vm: pyemu.VM, job_id: str) -> list[str]:
    deadline = time.monotonic() + TIMEOUT
    seen: list[str] = []
    while time.monotonic() < deadline:
        for event in vm.events.drain():
            if event.name == "JOB_STATUS_CHANGE" and event.data["id"] == job_id:
                seen.append(event.data["status"])
        if seen and seen[-1] == "concluded":
            return seen
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not conclude: {seen}")


def _job(vm: pyemu.VM, job_id: str) -> dict[str, Any]:
    return next(j for j in vm.execute("query-jobs") if j["id"] == job_id)


def test_qmp_snapshot_jobs(vm: pyemu.VM) -> None:
    wait_counting(vm, 1000)
    vm.events.drain()
    vm.execute("snapshot-save", {"job-id": "j1", "tag": "t1", "vmstate": "d0", "devices": ["d0"]})
    assert _job_events(vm, "j1") == ["created", "running", "waiting", "pending", "concluded"]
    assert _job(vm, "j1") == {"id": "j1", "type": "snapshot-save", "status": "concluded",
                              "current-progress": 1, "total-progress": 1}
    vm.execute("snapshot-save", {"job-id": "j2", "tag": "t1", "vmstate": "d0", "devices": ["d0"]})
    assert _job_events(vm, "j2") == ["created", "running", "aborting", "concluded"]
    assert _job(vm, "j2")["error"] == "Snapshot 't1' already exists in one or more devices"
    vm.execute("snapshot-load", {"job-id": "j3", "tag": "t1", "vmstate": "d0", "devices": ["nope"]})
    _job_events(vm, "j3")
    assert _job(vm, "j3")["error"] == "No block device node 'nope'"
    saved_at = counter(vm)
    wait_counting(vm, saved_at + 500_000)
    vm.execute("snapshot-load", {"job-id": "j4", "tag": "t1", "vmstate": "d0", "devices": ["d0"]})
    assert _job_events(vm, "j4") == ["created", "running", "waiting", "pending", "concluded"]
    assert "error" not in _job(vm, "j4")
    assert vm.state is RunState.RUNNING
    vm.execute("snapshot-delete", {"job-id": "j5", "tag": "t1", "devices": ["d0"]})
    _job_events(vm, "j5")
    assert "error" not in _job(vm, "j5")
    assert hmp(vm, "info snapshots") == "There is no snapshot available.\r\n"
    for job_id in ("j1", "j2", "j3", "j4", "j5"):
        vm.execute("job-dismiss", {"id": job_id})
    assert vm.execute("query-jobs") == []


# -- -loadvm ---------------------------------------------------------------------------------------------
def test_loadvm_at_start_up_continues_from_the_save(kernel: Path, disk: Path) -> None:
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"))
    vm.start()
    try:
        wait_counting(vm, 200_000)
        vm.pause()
        saved = counter(vm)
        assert hmp(vm, "savevm boot") == ""
        assert vm.state is RunState.PAUSED  # a stopped VM stays stopped
    finally:
        assert stop_vm(vm) == 0
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"), "-loadvm", "boot", "-S")
    vm.start()
    try:
        assert vm.state is RunState.PAUSED
        assert counter(vm) == saved
        vm.resume()
        wait_counting(vm, saved + 1000)
    finally:
        assert stop_vm(vm) == 0
    with pytest.raises(PyemuError, match="Snapshot 'nope' does not exist in one or more devices"):
        bad = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"), "-loadvm", "nope")
        try:
            bad.start()
        finally:
            bad.close()


def test_vmstate_node_errors(vm: pyemu.VM) -> None:
    vm.execute("snapshot-save", {"job-id": "j1", "tag": "t1", "vmstate": "zz", "devices": ["d0"]})
    _job_events(vm, "j1")
    assert _job(vm, "j1")["error"] == "vmstate block device 'zz' does not exist"
    vm.execute("snapshot-save", {"job-id": "j2", "tag": "t1", "vmstate": "d0", "devices": []})
    _job_events(vm, "j2")
    assert _job(vm, "j2")["error"] == "At least one device is required for snapshot"
    assert hmp(vm, "savevm " + "x" * 300) == ""  # QEMU cuts a name to 255 bytes
    assert hmp(vm, "info snapshots").splitlines()[2].split()[1] == "x" * 255
    assert hmp(vm, "delvm " + "x" * 255) == ""
    assert hmp(vm, "info snapshots") == "There is no snapshot available.\r\n"


def test_a_snapshot_qemu_saved_is_refused_and_the_vm_runs_on(kernel: Path, disk: Path) -> None:
    """QEMU's VM state is not pyemu's stream: loadvm refuses it before reverting anything."""
    done = subprocess.run(
        ["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-S", "-display", "none", "-m", "32",
         "-drive", f"file={disk},format=qcow2,if=none,id=d0", "-device", "virtio-blk-device,drive=d0",
         "-monitor", "stdio"], input="savevm fromqemu\nquit\n", capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "fromqemu" in qemu_img("snapshot", "-l", str(disk))
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *drive_args(disk, "d0"))
    vm.start()
    try:
        wait_counting(vm, 1000)
        answer = hmp(vm, "loadvm fromqemu")
        assert answer == "Error: Error -22 while loading VM state: not a pyemu VM-state stream (bad magic)\r\n"
        assert vm.state is RunState.RUNNING
        wait_counting(vm, counter(vm) + 1000)
    finally:
        assert stop_vm(vm) == 0


@pytest.mark.kvm
def test_savevm_loadvm_under_kvm(kernel: Path, disk: Path) -> None:
    from pyemu.accel.base import AcceleratorUnavailable
    from pyemu.accel.kvm.accel import KvmAccelerator

    try:
        KvmAccelerator().close()
    except AcceleratorUnavailable as error:
        pytest.skip(f"KVM is not usable here: {error}")
    kvm = tuple("kvm" if word == "tcg" else word for word in BASE)
    vm = pyemu.VM("-kernel", str(kernel), *kvm, *drive_args(disk, "d0"))
    vm.start()
    try:
        machine = vm._instance.machine
        wait_counting(vm, 100_000)
        machine.memory.write(MARK_ADDR, b"before")
        assert hmp(vm, "savevm k") == ""
        vm.pause()
        saved = machine.vcpus[0].save_state().regs["rbx"]
        vm.resume()
        machine.memory.write(MARK_ADDR, b"after!")
        wait_counting(vm, saved + 100_000)
        vm.pause()
        assert hmp(vm, "loadvm k") == ""
        # KVM may stop the loop between its two increments: RAM can be one ahead of EBX at the save.
        assert counter(vm) <= saved + 1
        assert machine.vcpus[0].save_state().regs["rbx"] in (counter(vm), counter(vm) - 1)
        assert machine.memory.read(MARK_ADDR, 6) == b"before"
        vm.resume()
        wait_counting(vm, counter(vm) + 1000)
    finally:
        assert stop_vm(vm) == 0
