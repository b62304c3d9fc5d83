"""virtio-blk serves a batch of requests, merging reads (or writes) of consecutive sectors into one host request.

Linux splits a 1 MiB O_DIRECT read into a 254-segment request and a small one right behind it and offers
both at once; served one after the other, the second paid a whole host read of its own. These tests use a
real raw image (the block layer's file driver, ``cache=none`` as the benchmark uses it) behind the
transport, driven by the Python test driver, and check that merging never changes what the guest sees:
the data, each request's status and the used ring.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from pyemu.block.backend import BlockBackend
from pyemu.block.errors import BlockIOError
from pyemu.block.options import DriveOptions, open_drive
from pyemu.hw.virtio import blk as vblk
from pyemu.hw.virtio import mmio as regs
from pyemu.testing.virtio_driver import VirtioTestDriver

from .conftest import Rig, wait_for

SECTOR = 512
IMAGE_SIZE = 1 << 20
PATTERN = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(IMAGE_SIZE))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(PATTERN)
    return path


@pytest.fixture
def drive(image: Path) -> Iterator[BlockBackend]:
    backend = open_drive(DriveOptions.from_props([("file", str(image)), ("format", "raw"), ("if", "none"),
                                                  ("id", "d0"), ("cache", "none")]))
    yield backend
    backend.close()


class Recording:
    """Wraps a backend's preadv/pwritev to see the host requests (and, on demand, fail the large ones)."""

    def __init__(self, backend: BlockBackend, *, fail_above: int | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.fail_above = fail_above
        for name in ("preadv", "pwritev"):
            original = getattr(backend, name)
            setattr(backend, name, self._wrap(name, original))

    def _wrap(self, name: str, original):  # type: ignore[no-untyped-def]
        def call(offset: int, buffers: Sequence[memoryview], **kwargs: object) -> None:
            length = sum(memoryview(b).nbytes for b in buffers)
            self.calls.append((name, offset, length))
            if self.fail_above is not None and length > self.fail_above:
                raise BlockIOError("injected failure of a large request", errno=errno.EIO, offset=offset,
                                   length=length)
            original(offset, buffers, **kwargs)
        return call


def plug(rig: Rig, backend: BlockBackend) -> tuple[vblk.VirtioBlk, VirtioTestDriver]:
    device = vblk.VirtioBlk(backend, vblk.BlkConfig(drive_id="d0"))
    _, driver, _ = rig.plug(device)
    driver.initialise(event_idx=True, queues={0: 64})
    return device, driver


def offer(driver: VirtioTestDriver, kind: int, sector: int, data: bytes | int, *, pages: bool = True,
          status: bool = True) -> tuple[int, list[tuple[int, int]], int]:
    """Offer one request without kicking; returns (head, data buffers, status address). Reads and writes
    are split into 4 KiB guest buffers, as a driver's scatter-gather list of pages is."""
    header = driver.buffer(struct.pack("<IIQ", kind, 0, sector))
    size = data if isinstance(data, int) else len(data)
    pieces: list[tuple[int, int]] = []
    step = 4096 if pages else max(size, 1)
    for start in range(0, size, step):
        chunk = min(step, size - start)
        content: bytes | int = chunk if isinstance(data, int) else data[start:start + chunk]
        pieces.append((driver.buffer(content), chunk))
    status_addr = driver.buffer(1)
    driver.memory.write_u8(status_addr, 0xEE)
    segments = [(header, 16, False)] + [(addr, n, kind == vblk.T_IN) for addr, n in pieces]
    if status:
        segments.append((status_addr, 1, True))
    head = driver.submit(0, segments, indirect=True, kick=False)
    return head, pieces, status_addr


def read_back(driver: VirtioTestDriver, pieces: list[tuple[int, int]]) -> bytes:
    return b"".join(driver.memory.read(addr, n) for addr, n in pieces)


def wait_all(driver: VirtioTestDriver, count: int) -> dict[int, int]:
    return dict(driver.wait_used(0, count))


def test_consecutive_reads_are_one_host_read(rig: Rig, drive: BlockBackend) -> None:
    recording = Recording(drive)
    device, driver = plug(rig, drive)
    requests = [offer(driver, vblk.T_IN, 0, 60 * 1024), offer(driver, vblk.T_IN, 120, 4096),
                offer(driver, vblk.T_IN, 2032, 4096)]  # the third does not continue the second
    driver.kick(0)
    used = wait_all(driver, 3)
    for (head, pieces, status), (sector, size) in zip(requests, [(0, 60 * 1024), (120, 4096), (2032, 4096)]):
        assert used[head] == size + 1
        assert driver.memory.read_u8(status) == vblk.S_OK
        assert read_back(driver, pieces) == PATTERN[sector * SECTOR:sector * SECTOR + size]
    assert recording.calls == [("preadv", 0, 64 * 1024), ("preadv", 2032 * SECTOR, 4096)]
    assert device.merged == 1 and device.requests == 3


def test_consecutive_writes_are_one_host_write(rig: Rig, drive: BlockBackend, image: Path) -> None:
    recording = Recording(drive)
    device, driver = plug(rig, drive)
    first, second = os.urandom(8192), os.urandom(4096)
    requests = [offer(driver, vblk.T_OUT, 8, first), offer(driver, vblk.T_OUT, 24, second)]
    driver.kick(0)
    used = wait_all(driver, 2)
    assert all(used[head] == 1 and driver.memory.read_u8(status) == vblk.S_OK for head, _, status in requests)
    assert recording.calls == [("pwritev", 8 * SECTOR, 12288)]
    assert device.merged == 1
    on_disk = image.read_bytes()
    assert on_disk[8 * SECTOR:32 * SECTOR] == first + second
    assert on_disk[:8 * SECTOR] == PATTERN[:8 * SECTOR] and on_disk[32 * SECTOR:] == PATTERN[32 * SECTOR:]


def test_a_read_and_a_write_are_not_merged(rig: Rig, drive: BlockBackend, image: Path) -> None:
    recording = Recording(drive)
    device, driver = plug(rig, drive)
    data = os.urandom(4096)
    read = offer(driver, vblk.T_IN, 0, 4096)
    write = offer(driver, vblk.T_OUT, 8, data)
    driver.kick(0)
    used = wait_all(driver, 2)
    assert used[read[0]] == 4097 and used[write[0]] == 1
    assert read_back(driver, read[1]) == PATTERN[:4096]
    assert image.read_bytes()[4096:8192] == data
    assert [c[0] for c in recording.calls] == ["preadv", "pwritev"] and device.merged == 0


def test_a_failed_merged_read_is_retried_request_by_request(rig: Rig, drive: BlockBackend) -> None:
    """The merged host request fails (injected): each request is served alone and gets its own status, so
    a failure of the group never turns into an error for a request that alone succeeds."""
    recording = Recording(drive, fail_above=8192)
    device, driver = plug(rig, drive)
    requests = [offer(driver, vblk.T_IN, 0, 8192), offer(driver, vblk.T_IN, 16, 8192),
                offer(driver, vblk.T_IN, 32, 16384)]  # alone this one fails too
    driver.kick(0)
    used = wait_all(driver, 3)
    statuses = [driver.memory.read_u8(status) for _, _, status in requests]
    assert statuses == [vblk.S_OK, vblk.S_OK, vblk.S_IOERR]
    assert used[requests[0][0]] == 8193 and used[requests[1][0]] == 8193 and used[requests[2][0]] == 1
    assert read_back(driver, requests[0][1]) + read_back(driver, requests[1][1]) == PATTERN[:16384]
    assert recording.calls[0] == ("preadv", 0, 32768)  # the merged attempt
    assert device.merged == 0 and device.errors == 1


def test_a_request_past_the_end_breaks_the_run_but_not_its_neighbours(rig: Rig, drive: BlockBackend) -> None:
    device, driver = plug(rig, drive)
    last = IMAGE_SIZE // SECTOR
    requests = [offer(driver, vblk.T_IN, last - 16, 4096), offer(driver, vblk.T_IN, last - 8, 8192),
                offer(driver, vblk.T_IN, 0, 4096)]
    driver.kick(0)
    wait_all(driver, 3)
    statuses = [driver.memory.read_u8(status) for _, _, status in requests]
    assert statuses == [vblk.S_OK, vblk.S_IOERR, vblk.S_OK]
    assert read_back(driver, requests[0][1]) == PATTERN[-8192:-4096]
    assert device.merged == 0


def test_a_malformed_request_in_a_batch_breaks_the_device_after_the_ones_before_it(
        rig: Rig, drive: BlockBackend) -> None:
    device, driver = plug(rig, drive)
    good = offer(driver, vblk.T_IN, 0, 4096)
    offer(driver, vblk.T_IN, 8, 0, status=False)  # no writable byte at all: cannot be answered
    driver.kick(0)
    [(head, written)] = driver.wait_used(0, 1)
    assert (head, written) == (good[0], 4097) and driver.memory.read_u8(good[2]) == vblk.S_OK
    assert wait_for(lambda: driver.status & regs.STATUS_DEVICE_NEEDS_RESET)


def test_the_io_thread_spins_for_disk_kicks_and_not_for_other_devices(rig: Rig, drive: BlockBackend) -> None:
    """virtio-blk's queue notifiers are registered as worth spinning for (its host work is the I/O thread's
    own); another device's are not (see VirtioDevice.kicks_worth_polling)."""
    from pyemu.hw.virtio.rng import EntropySource, RngConfig, VirtioRng

    blk_transport, _, _ = rig.plug(vblk.VirtioBlk(drive, vblk.BlkConfig(drive_id="d0")))
    rng_transport, _, _ = rig.plug(VirtioRng(EntropySource("/dev/urandom"), RngConfig()))
    polled = rig.iothread._polled
    assert {notifier.fileno() for notifier in blk_transport.notifiers} <= polled
    assert not {notifier.fileno() for notifier in rng_transport.notifiers} & polled
