"""I/O throttling in a running VM, no guest: virtio-blk devices driven through their register windows on a
shared I/O thread (a throttled drive's requests wait for their turn without stalling the other device),
the request rate of a throttled drive, and the QMP/command-line surfaces against QEMU 7.2's behaviour."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pyemu
from pyemu.api.errors import CommandError
from pyemu.block.options import DriveOptions, open_drive
from pyemu.block.throttle import NS, THROTTLE_GROUPS, ThrottleConfig
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio import blk as vblk
from pyemu.hw.virtio.mmio import VirtioMmio
from pyemu.system.iothread import IoThread
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.virtio_driver import VirtioTestDriver

KiB, MiB = 1024, 1024 * 1024
RAM = 32 * MiB
WAIT = 60.0


class Interrupt:
    def trigger(self) -> None:
        pass


class Disk:
    """One virtio-blk device over a raw file, its transport on ``iothread``, and a test driver."""

    def __init__(self, tmp: Path, name: str, memory: GuestMemory, iothread: IoThread, scratch: int,
                 props: list[tuple[str, str]]) -> None:
        path = tmp / f"{name}.raw"
        path.write_bytes(bytes(4 * MiB))
        self.backend = open_drive(DriveOptions.from_props([("file", str(path)), ("format", "raw"), ("id", name)]
                                                          + props))
        self.device = vblk.VirtioBlk(self.backend, vblk.BlkConfig(drive_id=name))
        self.transport = VirtioMmio(self.device, DmaMemory(memory), Interrupt(), iothread,  # type: ignore[arg-type]
                                    name=name)
        self.driver = VirtioTestDriver(self.transport, memory, scratch, 4 * MiB)
        self.driver.initialise(queues={0: 128})
        self.done = 0

    def write(self, sector: int, length: int) -> None:
        header = self.driver.buffer(struct.pack("<IIQ", vblk.T_OUT, 0, sector))
        data = self.driver.buffer(bytes([sector & 0xFF]) * length)
        status = self.driver.buffer(1)
        self.driver.submit(0, [(header, 16, False), (data, length, False), (status, 1, True)])

    def read(self, sector: int, length: int) -> None:
        header = self.driver.buffer(struct.pack("<IIQ", vblk.T_IN, 0, sector))
        data = self.driver.buffer(length)
        status = self.driver.buffer(1)
        self.driver.submit(0, [(header, 16, False), (data, length, True), (status, 1, True)])

    def zero_or_discard(self, kind: int, sector: int, count: int, flags: int = 0) -> None:
        header = self.driver.buffer(struct.pack("<IIQ", kind, 0, 0))
        segment = self.driver.buffer(vblk.SEGMENT_STRUCT.pack(sector, count, flags))
        status = self.driver.buffer(1)
        self.driver.submit(0, [(header, 16, False), (segment, vblk.SEGMENT_STRUCT.size, False), (status, 1, True)])

    def completed(self) -> int:
        self.done += len(self.driver.used(0))
        return self.done

    def close(self) -> None:
        self.transport.reset()
        self.backend.close()


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    memory = GuestMemory([(0, RAM)], name="throttle-test")
    iothread = IoThread("throttle-test")
    iothread.start()
    disks: list[Disk] = []

    def make(name: str, props: list[tuple[str, str]]) -> Disk:
        disk = Disk(tmp_path, name, memory, iothread, (1 + 5 * len(disks)) * MiB, props)
        disks.append(disk)
        return disk
    try:
        yield make
    finally:
        for disk in disks:
            disk.close()
        iothread.stop()
        iothread.close()
        memory.close()


def wait_until(predicate, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_throttled_drive_does_not_stall_its_io_thread(rig) -> None:  # type: ignore[no-untyped-def]
    slow = rig("slow", [("throttling.bps-total", str(64 * KiB))])
    fast = rig("fast", [])
    for i in range(8):  # 512 KiB at 64 KiB/s: 8 s if nothing changes
        slow.write(i * 128, 64 * KiB)
    wait_until(lambda: slow.completed() >= 1)
    fast.write(0, 64 * KiB)
    fast.read(0, 64 * KiB)
    wait_until(lambda: fast.completed() == 2)  # served on the same I/O thread while slow's requests wait
    assert slow.completed() < 8
    slow.backend.set_throttle(ThrottleConfig())  # limits removed: the held request and the rest go at once
    wait_until(lambda: slow.completed() == 8)
    assert slow.device.errors == 0 and fast.device.errors == 0


def test_throttled_drive_rate_respects_the_limit(rig) -> None:  # type: ignore[no-untyped-def]
    disk = rig("rated", [("throttling.bps-write", str(1 * MiB)), ("throttling.iops-read", "1000")])
    start = time.monotonic()
    for i in range(24):  # 3 MiB at 1 MiB/s; a tenth of a second's worth may go at once
        disk.write(i * 256, 128 * KiB)
    wait_until(lambda: disk.completed() == 24)
    elapsed = time.monotonic() - start
    assert elapsed >= (3 * MiB - 0.1 * MiB - 128 * KiB) / MiB  # cannot be faster than the limit
    member = disk.backend.throttle
    assert member is not None and member.group.name == "rated"


def test_group_members_share_the_limit(rig) -> None:  # type: ignore[no-untyped-def]
    # Both drives bring the limits: in QEMU a -drive with throttling.group= but no limits is not throttled.
    a = rig("ga", [("throttling.bps-total", str(512 * KiB)), ("throttling.group", "shared-h5")])
    b = rig("gb", [("throttling.bps-total", str(512 * KiB)), ("throttling.group", "shared-h5")])
    assert a.backend.throttle is not None and b.backend.throttle is not None
    assert a.backend.throttle.group is b.backend.throttle.group
    start = time.monotonic()
    for i in range(8):
        a.write(i * 128, 64 * KiB)
        b.write(i * 128, 64 * KiB)
    wait_until(lambda: a.completed() == 8 and b.completed() == 8)
    # 1 MiB in all through one 512 KiB/s limit: both drives count against it
    assert time.monotonic() - start >= (1 * MiB - 52 * KiB - 64 * KiB) / (512 * KiB)


def test_write_zeroes_count_as_writes(rig) -> None:  # type: ignore[no-untyped-def]
    # QEMU's blk_co_pwrite_zeroes goes through blk_co_pwritev_part and its throttle: zeroing 4 MiB at
    # 64 KiB/s fills the bucket by 4 MiB (an empty bucket lets it start at once), and the next write waits
    # about a minute -- a guest cannot zero its way around a bps limit.
    disk = rig("wz", [("throttling.bps-total", str(64 * KiB))])
    fast = rig("wzfast", [])
    member = disk.backend.throttle
    assert member is not None
    disk.zero_or_discard(vblk.T_WRITE_ZEROES, 0, 4 * MiB // 512)
    wait_until(lambda: disk.completed() == 1)
    assert member.group.state.buckets["bps-total"].level > 2 * MiB  # leaks 64 KiB/s: > 2 MiB for 32 s
    disk.zero_or_discard(vblk.T_WRITE_ZEROES, 0, 8, vblk.WRITE_ZEROES_UNMAP)
    disk.write(0, 4 * KiB)
    wait_until(lambda: len(member.pending[1]) == 1)  # held by the throttle...
    fast.write(0, 64 * KiB)
    wait_until(lambda: fast.completed() == 1)        # ...without holding the I/O thread
    assert disk.completed() == 1
    disk.backend.set_throttle(ThrottleConfig())
    wait_until(lambda: disk.completed() == 3)
    assert disk.device.errors == 0


def test_discard_is_not_drive_throttled(rig) -> None:  # type: ignore[no-untyped-def]
    # QEMU's blk_co_pdiscard has no throttle: a drive's own limits leave discards alone.
    disk = rig("dc", [("throttling.bps-total", str(64 * KiB)), ("discard", "unmap")])
    member = disk.backend.throttle
    assert member is not None
    disk.zero_or_discard(vblk.T_DISCARD, 0, 4 * MiB // 512)
    disk.write(0, 4 * KiB)  # the bucket is still empty: goes at once
    wait_until(lambda: disk.completed() == 2)
    assert member.group.state.buckets["bps-total"].level <= 4 * KiB and disk.device.errors == 0


def test_throttle_filter_counts_write_zeroes_and_discards(tmp_path: Path) -> None:
    # QEMU's throttle driver intercepts both as writes of their length (throttle_co_pwrite_zeroes/pdiscard).
    from pyemu.block.blockdev import open_blockdev
    from pyemu.block.registry import NodeRegistry
    from pyemu.block.throttle import FakeTimers, ThrottleGroup
    from pyemu.block.throttle_filter import ThrottleFilter

    path = tmp_path / "tf.raw"
    path.write_bytes(bytes(4 * MiB))
    registry = NodeRegistry()
    file = open_blockdev({"driver": "file", "node-name": "tf0", "filename": str(path)}, registry).node
    timers = FakeTimers()  # a clock that stands still: the bucket shows exactly what was counted
    group = ThrottleGroup("tf", ThrottleConfig.from_limits({"bps-total": 10 * MiB}), clock=timers.clock,
                          timers=timers)
    node = ThrottleFilter(file, group.register("tf"))
    node.write_zeroes(0, 512 * KiB, may_unmap=False)
    assert group.state.buckets["bps-total"].level == 512 * KiB
    node.discard(512 * KiB, 520 * KiB)
    assert group.state.buckets["bps-total"].level == 1032 * KiB
    woken: list[bool] = []
    ticket = group.members[0].admit(True, 512, lambda: woken.append(True))
    assert not ticket.granted  # the bucket (a tenth of 10 MiB/s) is full: the next write waits
    timers.advance(NS)
    assert ticket.granted and woken == [True]
    node._attachment.detach()
    registry.remove("tf0")


# -- QMP and the command line ---------------------------------------------------------------------------------
def make_vm(tmp_path: Path, *extra: str) -> pyemu.VM:
    kernel = tmp_path / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    disk = tmp_path / "d0.raw"
    disk.write_bytes(bytes(4 * MiB))
    return pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S",
                    "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-device,drive=d0,id=vblk0",
                    *extra)


ZERO = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}


def refused(vm: pyemu.VM, args: dict[str, Any], message: str, cls: str = "GenericError") -> None:
    with pytest.raises(CommandError) as info:
        vm.execute("block_set_io_throttle", args)
    assert (info.value.error_class, info.value.desc) == (cls, message)


def inserted(vm: pyemu.VM) -> dict[str, Any]:
    (info,) = [i for i in vm.execute("query-block") if i["device"] == "d0"]
    return info["inserted"]  # type: ignore[no-any-return]


def test_block_set_io_throttle_as_qemu(tmp_path: Path) -> None:
    # Messages and query-block output recorded from qemu-system-x86_64 7.2 -M microvm.
    with make_vm(tmp_path) as vm:
        vm.start()
        refused(vm, {"device": "nope", **ZERO, "bps": 1}, "Device 'nope' not found", "DeviceNotFound")
        refused(vm, {"id": "nope", **ZERO, "bps": 1}, "Device 'nope' not found", "DeviceNotFound")
        refused(vm, {**ZERO, "bps": 1}, "Need exactly one of 'device' and 'id'")
        refused(vm, {"device": "d0", **ZERO, "bps": 1, "bps_rd": 5},
                "bps/iops/max total values and read/write values cannot be used at the same time")
        refused(vm, {"device": "d0", **ZERO, "bps": -1}, "bps/iops/max values must be within [0, 1000000000000000]")
        refused(vm, {"device": "d0", **ZERO, "iops_rd": 10, "iops_rd_max": 5},
                "bps_max/iops_max cannot be lower than bps/iops")
        assert {k: inserted(vm)[k] for k in ZERO} == ZERO and "group" not in inserted(vm)
        assert vm.execute("block_set_io_throttle", {"device": "d0", **ZERO, "bps": 1000}) == {}
        info = inserted(vm)
        assert info["bps"] == 1000 and info["group"] == "d0" and "bps_max" not in info
        assert vm.execute("block_set_io_throttle", {"id": "vblk0", **ZERO, "bps": 1000, "bps_max": 5000,
                                                    "bps_max_length": 3, "iops": 50, "iops_size": 4096}) == {}
        info = inserted(vm)
        assert (info["bps_max"], info["bps_max_length"], info["iops"], info["iops_size"]) == (5000, 3, 50, 4096)
        assert vm.execute("block_set_io_throttle", {"id": "vblk0", **ZERO}) == {}
        info = inserted(vm)
        assert info["bps"] == 0 and "group" not in info


def test_drive_options_object_group_and_filter(tmp_path: Path) -> None:
    other = tmp_path / "e1.raw"
    other.write_bytes(bytes(4 * MiB))
    with make_vm(tmp_path, "-object", "throttle-group,id=tg0,x-bps-total=2097152,limits.iops-total=100",
                 "-drive", f"file={other},format=raw,if=none,id=e1,throttling.group=tg0",
                 "-device", "virtio-blk-device,drive=e1,id=vblk1",
                 "-blockdev", f"driver=file,filename={tmp_path / 'd0.raw'},node-name=f2,locking=off",
                 "-blockdev", "driver=throttle,throttle-group=tg0,file=f2,node-name=thr") as vm:
        vm.start()
        # As QEMU 7.2: a -drive naming a group without limits of its own is not throttled at all
        # (blockdev_init only registers a drive that has limits); the filter node is the group's member.
        (e1,) = [i for i in vm.execute("query-block") if i["device"] == "e1"]
        assert e1["inserted"]["bps"] == 0 and "group" not in e1["inserted"]
        group = THROTTLE_GROUPS.get("tg0")
        assert group is not None and len(group.members) == 1 and group.config.get("iops-total") == 100
    assert THROTTLE_GROUPS.get("tg0") is None  # the VM's objects go with it


@pytest.mark.parametrize("drive, message", [
    ("throttling.bps-total=10,bps_rd=4", "bps/iops/max total values and read/write values cannot be used at the "
                                         "same time"),
    ("throttling.bps-total=x", "Parameter 'throttling.bps-total' expects a number"),
])
def test_drive_throttling_errors(tmp_path: Path, drive: str, message: str) -> None:
    disk = tmp_path / "x.raw"
    disk.write_bytes(bytes(MiB))
    with pytest.raises(Exception) as info:
        with make_vm(tmp_path, "-drive", f"file={disk},format=raw,if=none,id=x,{drive}",
                     "-device", "virtio-blk-device,drive=x") as vm:
            vm.start()
    assert message in str(info.value)


def test_throttle_filter_needs_an_existing_group(tmp_path: Path) -> None:
    disk = tmp_path / "x.raw"
    disk.write_bytes(bytes(MiB))
    with pytest.raises(Exception) as info:
        with make_vm(tmp_path, "-blockdev", f"driver=file,filename={disk},node-name=f1",
                     "-blockdev", "driver=throttle,throttle-group=nosuch,file=f1,node-name=t1") as vm:
            vm.start()
    assert "Throttle group 'nosuch' does not exist" in str(info.value)
