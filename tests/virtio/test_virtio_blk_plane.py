"""virtio-blk's C data plane (hw/virtio/blk_plane.c) against the Python path it stands in for.

The plane serves reads at the head of a queue and leaves everything else, untouched, to Python. The
property test drives the same random batches -- reads in and out of range, odd lengths, writes, flushes,
unknown types, chains without a status byte or with a buffer outside RAM, direct and indirect, buffered
and O_DIRECT drives -- through a device with the plane and one without, and requires the guest to see
the same thing: used ring, status bytes, data, the image file, whether the device broke, and the DMA
report covering what was written.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyemu.accel.tcg.block_gate import load_gate_module
from pyemu.accel.tcg.tlb_fill import CodeMap
from pyemu.block.backend import BlockBackend
from pyemu.block.dirty_bitmap import bitmaps_of
from pyemu.block.options import DriveOptions, open_drive
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.core.irq import PulseInterrupt
from pyemu.hw.intc.ioapic import IoApic
from pyemu.hw.intc.lapic import REG_SVR, LocalApic
from pyemu.hw.virtio import blk as vblk
from pyemu.hw.virtio import blk_plane
from pyemu.hw.virtio.mmio import INT_USED_BUFFER, REG_QUEUE_NOTIFY, VirtioMmio
from pyemu.system.iothread import IoThread
from pyemu.system.memory import GuestMemory
from pyemu.system.timers import TimerQueue
from pyemu.testing.virtio_driver import VirtioTestDriver

from .conftest import environment_setting

SECTOR = 512
IMAGE_SIZE = 1 << 20
RAM_SIZE = 8 << 20
SCRATCH = 1 << 20
OUTSIDE_RAM = 64 << 20
PATTERN = bytes((i * 13 + (i >> 9)) & 0xFF for i in range(IMAGE_SIZE))


class Irq:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


@dataclass
class Setup:
    memory: GuestMemory
    device: vblk.VirtioBlk
    transport: VirtioMmio
    driver: VirtioTestDriver
    backend: BlockBackend
    written: list[tuple[int, int]]
    irq: Irq
    code_map: CodeMap | None = None
    iothread: IoThread | None = None


def plane_setting(on: bool) -> contextlib.AbstractContextManager[None]:
    return environment_setting("PYEMU_VIRTIO_BLK_PLANE", "1" if on else "0")


@contextlib.contextmanager
def device_on(image: Path, cache: str, *, plane: bool, event_idx: bool = True,
              extra: tuple[tuple[str, str], ...] = (), probed: bool = False, fmt: str = "raw",
              screen: bool = False, irq: Irq | None = None) -> Iterator[Setup]:
    """A device on test RAM; ``screen``: the DMA layer offers the software CPU's write screen (a code map of
    the test RAM, with no code in it unless a test marks some), as under ``-accel tcg``."""
    memory = GuestMemory([(0, RAM_SIZE)], name="read-plane-test")
    iothread = IoThread("read-plane-test")
    written: list[tuple[int, int]] = []
    code_map = CodeMap(memory, load_gate_module()) if screen else None
    dma = DmaMemory(memory, lambda gpa, size: written.append((gpa, size)),
                    screen=(lambda: code_map.write_screen) if code_map is not None else None)
    format_props = () if probed else (("format", fmt),)
    backend = open_drive(DriveOptions.from_props([("file", str(image)), *format_props, ("if", "none"),
                                                  ("id", "d0"), ("cache", cache), *extra]))
    device = vblk.VirtioBlk(backend, vblk.BlkConfig(drive_id="d0", serial="SER"))
    irq = irq if irq is not None else Irq()
    transport = VirtioMmio(device, dma, irq, iothread, name="vd0")
    driver = VirtioTestDriver(transport, memory, SCRATCH, scratch_size=6 << 20)
    driver.initialise(event_idx=event_idx, queues={0: 256})  # room for ten 18-descriptor chains
    try:
        with plane_setting(plane):
            yield Setup(memory, device, transport, driver, backend, written, irq, code_map, iothread)
    finally:
        transport.close()
        iothread.close()
        backend.close()
        memory.close()


@dataclass(frozen=True)
class Request:
    kind: int
    sector: int
    size: int
    pages: bool
    align: int
    indirect: bool
    status: bool = True
    outside_ram: bool = False


def offer(driver: VirtioTestDriver, req: Request, seed: int) -> tuple[int, list[tuple[int, int]], int]:
    header = driver.buffer(struct.pack("<IIQ", req.kind, 0, req.sector))
    writable = req.kind != vblk.T_OUT
    data = bytes((seed + i) & 0xFF for i in range(req.size)) if req.kind == vblk.T_OUT else req.size
    pieces: list[tuple[int, int]] = []
    step = 4096 if req.pages else max(req.size, 1)
    for start in range(0, req.size, step):
        chunk = min(step, req.size - start)
        # a buffer the device fills starts as 0xEE, so a read that leaves part of it alone is seen
        content = data[start:start + chunk] if isinstance(data, bytes) else b"\xee" * chunk
        pieces.append((driver.buffer(content, align=req.align), chunk))
    if req.outside_ram and pieces:
        pieces[-1] = (OUTSIDE_RAM, pieces[-1][1])
    status = driver.buffer(1)
    driver.memory.write_u8(status, 0xEE)
    segments = [(header, 16, False)] + [(addr, n, writable) for addr, n in pieces]
    if req.status:
        segments.append((status, 1, True))
    head = driver.submit(0, segments, indirect=req.indirect, kick=False)
    return head, pieces, status


def hand_out_a_closed_descriptor(backend: BlockBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drive's pass-through names a descriptor that is not open: every host call of the plane fails."""
    real = backend.begin_pass_through

    def broken_fd():  # type: ignore[no-untyped-def]
        target = real()
        return target._replace(fd=10_000_000) if target is not None else None
    monkeypatch.setattr(backend, "begin_pass_through", broken_fd)


def serve(transport: VirtioMmio) -> None:
    """The queue's work, here in the test's thread, with the I/O thread's rule for a handler that raises."""
    try:
        transport.process(0)
    except Exception as exc:  # noqa: BLE001 -- what IoThread hands to the transport's on_error
        transport.fail_from(exc)


def run_batch(image: Path, cache: str, requests: list[Request], *, plane: bool, fmt: str = "raw",
              prepare: Callable[[Setup], object] | None = None, screen: bool = False) -> dict[str, object]:
    work = image.with_name(f"{image.stem}-{int(plane)}.img")
    work.write_bytes(image.read_bytes())
    with device_on(work, cache, plane=plane, fmt=fmt, screen=screen) as s:
        if prepare is not None:
            prepare(s)
        offered = [offer(s.driver, req, index) for index, req in enumerate(requests)]
        serve(s.transport)
        used = s.driver.used(0)
        data = [s.memory.read(addr, n) if req.kind != vblk.T_OUT and addr < RAM_SIZE else b""
                for req, (_, pieces, _) in zip(requests, offered) for addr, n in pieces]
        covered = set()
        for gpa, size in s.written:
            covered.update(range(gpa, gpa + size))
        written_into = set()
        for (head, written) in used:
            index = next(i for i, (h, _, _) in enumerate(offered) if h == head)
            req, (_, pieces, status) = requests[index], offered[index]
            writable = (pieces if req.kind != vblk.T_OUT else []) + ([(status, 1)] if req.status else [])
            left = written
            for addr, n in writable:
                take = min(n, max(0, left))
                written_into.update(range(addr, addr + take))
                left -= take
        served = s.device._planes[0].served if s.device._planes else 0
        return {
            "used": used,
            "statuses": [s.memory.read_u8(status) for _, _, status in offered],
            "data": data,
            "image": work.read_bytes(),
            "broken": s.transport.broken,
            "reported": written_into <= covered,
            "served_by_plane": served,
        }


requests_strategy = st.lists(st.builds(
    Request,
    kind=st.sampled_from([vblk.T_IN] * 6 + [vblk.T_OUT, vblk.T_FLUSH, vblk.T_GET_ID, 99]),
    sector=st.one_of(st.integers(0, IMAGE_SIZE // SECTOR - 1), st.integers(IMAGE_SIZE // SECTOR - 8,
                                                                           IMAGE_SIZE // SECTOR + 8)),
    size=st.sampled_from([4096, 8192, 512, 12288, 65536, 100, 0]),
    pages=st.booleans(),
    align=st.sampled_from([4096, 512, 16]),
    indirect=st.booleans(),
    status=st.sampled_from([True] * 40 + [False]),
    outside_ram=st.sampled_from([False] * 40 + [True]),
), min_size=1, max_size=10)


@st.composite
def runs_strategy(draw: st.DrawFn) -> list[Request]:
    """Batches in which requests often continue the one before (the next sectors, the same direction), as
    a guest's large reads and writes arrive: what the plane merges into one host call."""
    requests = draw(requests_strategy)
    follows = draw(st.lists(st.booleans(), min_size=len(requests), max_size=len(requests)))
    for index in range(1, len(requests)):
        if follows[index]:
            before = requests[index - 1]
            requests[index] = replace(requests[index], kind=before.kind if draw(st.integers(0, 4)) else
                                      requests[index].kind,
                                      sector=before.sector + max(before.size, 0) // SECTOR)
    return requests


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("read-plane") / "disk.img"
    path.write_bytes(PATTERN)
    return path


@pytest.fixture(scope="module", autouse=True)
def plane_builds() -> None:
    assert blk_plane.load() is not None, "the C data plane did not build"


@pytest.mark.parametrize("screen", [False, True], ids=["no-screen", "tcg-screen"])
@pytest.mark.parametrize("cache", ["writeback", "none"])
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=requests_strategy)
def test_the_plane_changes_nothing_the_guest_sees(image: Path, cache: str, screen: bool,
                                                  requests: list[Request]) -> None:
    """With the software CPU's write screen and no code in RAM, the plane publishes what it served itself
    (nothing to report): the guest must see the same as without the plane."""
    with_plane = run_batch(image, cache, requests, plane=True, screen=screen)
    without = run_batch(image, cache, requests, plane=False)
    assert without["served_by_plane"] == 0
    assert without["reported"] and (screen or with_plane["reported"])
    for key in ("used", "statuses", "data", "image", "broken"):
        assert with_plane[key] == without[key], key


@pytest.mark.parametrize("cache", ["writeback", "none"])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=runs_strategy())
def test_merged_runs_change_nothing_the_guest_sees(image: Path, cache: str, requests: list[Request]) -> None:
    with_plane = run_batch(image, cache, requests, plane=True)
    without = run_batch(image, cache, requests, plane=False)
    assert with_plane["reported"] and without["reported"]
    for key in ("used", "statuses", "data", "image", "broken"):
        assert with_plane[key] == without[key], key


@pytest.mark.parametrize("cache", ["writeback", "none"])
@pytest.mark.parametrize("kind", [vblk.T_IN, vblk.T_OUT])
def test_consecutive_requests_are_one_host_call(copy: Path, cache: str, kind: int) -> None:
    """Linux's 1 MiB O_DIRECT read arrives as a 1020 KiB request and a 4 KiB one: the plane moves such a
    run with one preadv (pwritev), and each request still gets its own used element and status."""
    with device_on(copy, cache, plane=True) as s:
        sizes = [65536, 4096, 8192]
        reqs, sector = [], 64
        for index, size in enumerate(sizes):
            reqs.append(Request(kind, sector, size, pages=True, align=4096, indirect=index != 1))
            sector += size // SECTOR
        reqs.append(Request(kind, 0, 4096, pages=True, align=4096, indirect=False))  # not the next sectors
        offered = [offer(s.driver, req, index) for index, req in enumerate(reqs)]
        serve(s.transport)
        plane = s.device._planes[0]
        assert plane.served == 4 and plane.merged == 2 and s.device.merged == 2
        written = [size + 1 if kind == vblk.T_IN else 1 for size in sizes + [4096]]
        assert s.driver.used(0) == [(head, n) for (head, _, _), n in zip(offered, written)]
        assert [s.memory.read_u8(status) for _, _, status in offered] == [vblk.S_OK] * 4
        for req, (_, pieces, _), index in zip(reqs, offered, range(4)):
            start = req.sector * SECTOR
            expected = (PATTERN[start:start + req.size] if kind == vblk.T_IN
                        else bytes((index + i) & 0xFF for i in range(req.size)))
            got = (b"".join(s.memory.read(a, n) for a, n in pieces) if kind == vblk.T_IN
                   else copy.read_bytes()[start:start + req.size])
            assert got == expected


def test_a_merged_run_that_fails_on_the_host_is_served_request_by_request(image: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with device_on(image, "writeback", plane=True) as s:
        hand_out_a_closed_descriptor(s.backend, monkeypatch)
        reqs = [Request(vblk.T_IN, 8, 4096, True, 16, False), Request(vblk.T_IN, 16, 4096, True, 16, True)]
        offered = [offer(s.driver, req, index) for index, req in enumerate(reqs)]
        serve(s.transport)
        assert s.driver.used(0) == [(head, 4097) for head, _, _ in offered]
        for req, (_, pieces, status) in zip(reqs, offered):
            assert s.memory.read_u8(status) == vblk.S_OK
            assert s.memory.read(pieces[0][0], 4096) == PATTERN[req.sector * SECTOR:req.sector * SECTOR + 4096]
        assert s.device._planes[0].host_errors == 1 and s.device._planes[0].served == 0


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_aligned_reads_at_queue_depth_one_go_through_the_plane(image: Path, cache: str) -> None:
    with device_on(image, cache, plane=True) as s:
        for index in range(12):
            sector = (index * 97) % (IMAGE_SIZE // SECTOR - 16)
            req = Request(vblk.T_IN, sector, 8192, pages=True, align=4096, indirect=index % 2 == 0)
            head, pieces, status = offer(s.driver, req, index)
            serve(s.transport)
            assert s.driver.used(0) == [(head, 8193)]
            assert s.memory.read_u8(status) == vblk.S_OK
            assert b"".join(s.memory.read(a, n) for a, n in pieces) == PATTERN[sector * SECTOR:sector * SECTOR + 8192]
        assert s.device._planes[0].served == 12 and s.device.requests == 12
        assert s.irq.count >= 1


def test_a_chain_offered_after_the_planes_last_look_waits_for_its_kick(image: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest offers a read between the C plane's last look at the ring and the end of the queue's work:
    the device leaves it for the kick the driver owes (avail_event names it) and the plane serves it then,
    instead of the Python path serving it on the spot (it did, for ~5% of 1 MiB reads in the Debian guest)."""
    with device_on(image, "writeback", plane=True) as s:
        late: list[tuple[int, list[tuple[int, int]], int]] = []
        real_serve = blk_plane.DataPlane.serve

        def serve_then_offer(plane, *args):  # type: ignore[no-untyped-def]
            served = real_serve(plane, *args)
            if not late:
                late.append(offer(s.driver, Request(vblk.T_IN, 64, 4096, pages=True, align=4096,
                                                    indirect=False), 1))
            return served

        monkeypatch.setattr(blk_plane.DataPlane, "serve", serve_then_offer)
        first, _, _ = offer(s.driver, Request(vblk.T_IN, 8, 4096, pages=True, align=4096, indirect=False), 0)
        serve(s.transport)
        assert s.driver.used(0) == [(first, 4097)]
        queue = s.driver.queues[0]
        assert s.memory.read_u16(queue.used + 4 + 8 * queue.size) == 1, "avail_event must ask for the late one"
        head, pieces, status = late[0]
        serve(s.transport)  # the kick
        assert s.driver.used(0) == [(head, 4097)]
        assert s.memory.read_u8(status) == vblk.S_OK
        assert s.memory.read(pieces[0][0], 4096) == PATTERN[64 * SECTOR:64 * SECTOR + 4096]
        assert s.device._planes[0].served == 2 and s.device.requests == 2


def _used_event(s: Setup, value: int) -> None:
    """The driver's used_event (virtio 1.x 2.7.10): interrupt me once the used index passes ``value``."""
    queue = s.driver.queues[0]
    s.memory.write_u16(queue.avail + 4 + 2 * queue.size, value & 0xFFFF)


def _read(s: Setup, sector: int, seed: int) -> tuple[int, list[tuple[int, int]], int]:
    return offer(s.driver, Request(vblk.T_IN, sector, 8192, pages=True, align=4096, indirect=False), seed)


def test_reads_with_nothing_to_report_are_published_in_c_with_the_interrupt_the_driver_asked_for(
        image: Path) -> None:
    """Under the software CPU's write screen, a read into RAM without translated code leaves Python
    nothing to report: the C call publishes the used index and decides the interrupt by used_event, as
    Virtqueue.should_interrupt does. A read into a page holding code, and a write (the dirty bitmaps hear
    of it from Python), are published by Python after their reports."""
    with device_on(image, "writeback", plane=True, screen=True) as s:
        plane_reads = [_read(s, 8 * i, i) for i in range(3)]
        serve(s.transport)
        assert [head for head, _ in s.driver.used(0)] == [head for head, _, _ in plane_reads]
        for index, (_, pieces, status) in enumerate(plane_reads):
            assert s.memory.read_u8(status) == vblk.S_OK
            assert b"".join(s.memory.read(a, n) for a, n in pieces) == PATTERN[8 * index * SECTOR:(8 * index + 16) * SECTOR]
        plane = s.device._planes[0]
        assert plane.published == 1 and s.written == []
        assert s.irq.count == 1  # the queue's first decision always interrupts

        _used_event(s, 3)  # the driver wants an interrupt once used index 3 is passed
        _read(s, 64, 7)
        serve(s.transport)
        assert s.irq.count == 2 and plane.published == 2
        _used_event(s, 100)  # not before index 100
        _read(s, 72, 8)
        serve(s.transport)
        assert len(s.driver.used(0)) == 2
        assert s.irq.count == 2 and plane.published == 3

        _used_event(s, 5)
        assert s.code_map is not None
        head, pieces, _ = _read(s, 80, 9)
        s.code_map._owner_bytes[pieces[0][0] >> 12] = 1  # translated code in the first page read into
        serve(s.transport)
        assert s.driver.used(0) == [(head, 8193)]
        assert plane.published == 3 and s.written[:1] == [pieces[0]]
        assert s.irq.count == 3


def test_without_event_idx_the_c_call_honours_no_interrupt(image: Path) -> None:
    with device_on(image, "writeback", plane=True, screen=True, event_idx=False) as s:
        queue = s.driver.queues[0]
        _read(s, 0, 1)
        serve(s.transport)
        assert s.irq.count == 1 and s.device._planes[0].published == 1
        s.memory.write_u16(queue.avail, 1)  # VRING_AVAIL_F_NO_INTERRUPT
        _read(s, 8, 2)
        serve(s.transport)
        assert len(s.driver.used(0)) == 2
        assert s.irq.count == 1 and s.device._planes[0].published == 2


def test_the_plane_stops_at_a_flush_and_python_serves_the_rest_in_order(image: Path) -> None:
    with device_on(image, "writeback", plane=True) as s:
        reqs = [Request(vblk.T_IN, 0, 4096, True, 16, False), Request(vblk.T_FLUSH, 0, 0, True, 16, False),
                Request(vblk.T_IN, 16, 4096, True, 16, True)]
        offered = [offer(s.driver, r, i) for i, r in enumerate(reqs)]
        serve(s.transport)
        assert [h for h, _ in s.driver.used(0)] == [h for h, _, _ in offered]
        assert s.device._planes[0].served == 1 and s.device._planes[0].stops_for_python == 1


@pytest.fixture
def copy(image: Path, tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(image.read_bytes())
    return path


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_writes_go_through_the_plane_and_mark_the_dirty_bitmaps(copy: Path, cache: str) -> None:
    with device_on(copy, cache, plane=True) as s:
        bitmap = bitmaps_of(s.backend.root).create("b", granularity=65536)
        head, _, status = offer(s.driver, Request(vblk.T_OUT, 1024, 8192, True, 4096, True), 0)
        serve(s.transport)
        assert s.driver.used(0) == [(head, 1)] and s.memory.read_u8(status) == vblk.S_OK
        assert s.device._planes[0].served == 1
        assert list(bitmap.dirty_extents()) == [(1024 * SECTOR, 65536)]
    assert copy.read_bytes()[1024 * SECTOR:1024 * SECTOR + 8192] == bytes(i & 0xFF for i in range(8192))


@pytest.mark.parametrize("recording", [False, True])
def test_a_write_is_published_in_c_unless_a_dirty_bitmap_records_writes(copy: Path, recording: bool) -> None:
    """A write with no bitmap recording leaves Python nothing to do first: the C call publishes it (and
    decides its interrupt). With one recording, Python marks the range and then publishes."""
    with device_on(copy, "writeback", plane=True, screen=True) as s:
        bitmap = bitmaps_of(s.backend.root).create("b", granularity=65536, enabled=recording)
        head, _, status = offer(s.driver, Request(vblk.T_OUT, 1024, 8192, True, 4096, True), 0)
        serve(s.transport)
        assert s.driver.used(0) == [(head, 1)] and s.memory.read_u8(status) == vblk.S_OK
        plane = s.device._planes[0]
        assert plane.served == 1 and plane.published == (0 if recording else 1)
        assert s.irq.count == 1
        assert list(bitmap.dirty_extents()) == ([(1024 * SECTOR, 65536)] if recording else [])
    assert copy.read_bytes()[1024 * SECTOR:1024 * SECTOR + 8192] == bytes(i & 0xFF for i in range(8192))


def test_a_bitmap_that_starts_recording_after_the_plane_asked_hears_of_the_write_first(
        copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plane asks whether a bitmap records before its call; one enabled right after that answer moves
    the count of recording changes, so C leaves the write to Python, which marks the range and then lets
    the driver see the write."""
    with device_on(copy, "writeback", plane=True, screen=True) as s:
        bitmaps = bitmaps_of(s.backend.root)
        bitmap = bitmaps.create("b", granularity=65536, enabled=False)

        def asked_then_enabled() -> bool:
            recording = BlockBackend.records_writes(s.backend)
            bitmaps.set_enabled("b", True)
            return recording

        monkeypatch.setattr(s.backend, "records_writes", asked_then_enabled)
        head, _, _ = offer(s.driver, Request(vblk.T_OUT, 1536, 8192, True, 4096, True), 0)
        serve(s.transport)
        assert s.driver.used(0) == [(head, 1)]
        assert s.device._planes[0].served == 1 and s.device._planes[0].published == 0
        assert list(bitmap.dirty_extents()) == [(1536 * SECTOR, 65536)]


@pytest.mark.parametrize("extra, why", [
    ((("read-only", "on"),), "a read-only drive"),
    ((("cache.writeback", "off"),), "writethrough: every write needs its flush"),
])
def test_writes_that_must_keep_to_python_do(copy: Path, extra: tuple[tuple[str, str], ...], why: str) -> None:
    before = copy.read_bytes()
    with device_on(copy, "writeback", plane=True, extra=extra) as s:
        assert s.backend.begin_pass_through() is not None
        s.backend.end_pass_through()
        head, _, status = offer(s.driver, Request(vblk.T_OUT, 8, 4096, True, 4096, False), 0)
        serve(s.transport)
        assert s.driver.used(0) == [(head, 1)], why
        assert s.device._planes[0].served == 0, why
        read_only = ("read-only", "on") in extra
        assert s.memory.read_u8(status) == (vblk.S_IOERR if read_only else vblk.S_OK), why
    assert (copy.read_bytes() == before) is read_only


def test_a_probed_raw_image_keeps_its_first_sector_to_python(copy: Path) -> None:
    """Without format=raw the first sector is guarded (no qcow2 magic may be written there): the plane
    leaves writes to it to the Python path, which refuses that one and takes the others."""
    with device_on(copy, "writeback", plane=True, probed=True) as s:
        target = s.backend.begin_pass_through()
        assert target is not None and target.write_floor == SECTOR
        s.backend.end_pass_through()
        magic = offer(s.driver, Request(vblk.T_OUT, 0, 512, True, 16, False), 0)
        s.memory.write(magic[1][0][0], b"QFI\xfb")
        other = offer(s.driver, Request(vblk.T_OUT, 8, 512, True, 16, False), 1)
        serve(s.transport)
        assert [h for h, _ in s.driver.used(0)] == [magic[0], other[0]]
        assert s.memory.read_u8(magic[2]) == vblk.S_IOERR and s.memory.read_u8(other[2]) == vblk.S_OK
        assert s.device._planes[0].served == 0


def test_a_throttled_drive_is_served_by_python(image: Path) -> None:
    with device_on(image, "writeback", plane=True, extra=(("throttling.iops-total", "1000000"),)) as s:
        head, _, status = offer(s.driver, Request(vblk.T_IN, 0, 4096, True, 16, False), 0)
        serve(s.transport)
        assert s.driver.used(0) == [(head, 4097)] and s.memory.read_u8(status) == vblk.S_OK
        assert not s.device._planes or s.device._planes[0].served == 0


def test_a_failed_host_read_is_left_to_python(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plane's read fails (a descriptor that is not open): the request is not taken, and Python serves
    it from the drive as usual."""
    with device_on(image, "writeback", plane=True) as s:
        hand_out_a_closed_descriptor(s.backend, monkeypatch)
        head, pieces, status = offer(s.driver, Request(vblk.T_IN, 8, 4096, True, 16, False), 0)
        serve(s.transport)
        assert s.driver.used(0) == [(head, 4097)] and s.memory.read_u8(status) == vblk.S_OK
        assert s.memory.read(pieces[0][0], 4096) == PATTERN[8 * SECTOR:8 * SECTOR + 4096]
        assert s.device._planes[0].host_errors == 1 and s.device._planes[0].served == 0


def test_a_reading_plane_counts_as_in_flight_for_drains(image: Path) -> None:
    with device_on(image, "writeback", plane=True) as s:
        target = s.backend.begin_pass_through()
        assert target is not None and target.fd >= 0 and target.size == IMAGE_SIZE
        try:
            assert s.backend._inflight == 1
        finally:
            s.backend.end_pass_through()
        assert s.backend._inflight == 0


def test_o_direct_writes_keep_to_python_when_others_may_write_the_image(copy: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A drive that lets others write the image (as an export's backend does) under cache=none: another
    writer's read-modify-write of the same blocks is serialised only against writes that take the file
    node's path, so the plane may read but not write."""
    from pyemu.block.locking import PERM_ALL

    backend = open_drive(DriveOptions.from_props([("file", str(copy)), ("format", "raw"), ("if", "none"),
                                                  ("id", "d1"), ("cache", "none")]))
    try:
        for shared, floor in ((None, 0), (PERM_ALL, -1)):
            if shared is not None:
                monkeypatch.setattr(backend, "_shared", shared)
            target = backend.begin_pass_through()
            assert target is not None and target.direct_align > 0 and target.write_floor == floor
            backend.end_pass_through()
    finally:
        backend.close()


@dataclass
class RoutedApic:
    """A local APIC with its registers in C behind an IOAPIC whose pin 5 the transport's pulse drives."""

    apic: LocalApic
    ioapic: IoApic
    pulse: PulseInterrupt
    kicks: list[int]

    def redirect(self, low: int) -> None:
        """Pin 5's redirection entry: ``low`` (vector and flags), destination APIC 0."""
        for index, value in ((0x11 + 2 * 5, 0), (0x10 + 2 * 5, low)):
            self.ioapic.write(0x00, 4, index)
            self.ioapic.write(0x10, 4, value)


def routed_apic(vector: int = 0x33) -> RoutedApic:
    """A :class:`RoutedApic` whose pin 5 sends ``vector``; the APIC's kicks are recorded."""
    apic = LocalApic(TimerQueue(clock=time.monotonic_ns))
    apic.write(REG_SVR, 4, 0x1FF)
    if apic.engine_route_core is None:
        pytest.skip("the APIC core's C module could not be built")
    kicks: list[int] = []
    apic.kick = lambda: kicks.append(1)
    ioapic = IoApic(apic)
    routed = RoutedApic(apic, ioapic, PulseInterrupt(ioapic.pin(5), threading.RLock(), partial(ioapic.edge_route, 5)),
                        kicks)
    routed.redirect(vector)
    return routed


def test_a_read_served_in_c_posts_its_interrupt_through_the_transports_route(image: Path) -> None:
    """With the interrupt a pulse to an IOAPIC pin that names one APIC, the C call that published a read
    also posts the interrupt it decided: InterruptStatus and the APIC's IRR are set, the vCPU is kicked,
    and the pulse is not used. Masked, the pin gets the models' pulse again."""
    r = routed_apic()
    apic, kicks, pulse = r.apic, r.kicks, r.pulse
    with device_on(image, "writeback", plane=True, screen=True, irq=pulse) as s:  # type: ignore[arg-type]
        _, pieces, status = _read(s, 0, 1)
        serve(s.transport)
        route = s.transport.interrupt_route()
        assert route is not None and route.posts == 1 and s.device._planes[0].posted
        assert pulse.count == 0 and kicks == [1]
        assert s.transport.interrupt_status == INT_USED_BUFFER and apic.irr == 1 << 0x33
        assert s.memory.read_u8(status) == vblk.S_OK
        assert b"".join(s.memory.read(a, n) for a, n in pieces) == PATTERN[:16 * SECTOR]
        r.redirect(0x33 | 1 << 16)  # masked: the route is stale, the models latch the edge
        _used_event(s, 1)  # the driver wants an interrupt for the next one too
        _read(s, 16, 2)
        serve(s.transport)
        assert route.posts == 1 and pulse.count == 1


def _kick_and_wait(s: Setup, count: int) -> list[tuple[int, int]]:
    """Kick queue 0 as the guest does and wait for ``count`` newly used chains (returned)."""
    s.transport.write(REG_QUEUE_NOTIFY, 4, 0)
    used: list[tuple[int, int]] = []
    deadline = time.monotonic() + 30
    while len(used) < count:
        assert time.monotonic() < deadline, "the I/O thread did not serve the kick"
        time.sleep(0.001)
        used += s.driver.used(0)
    return used


def test_a_leased_queue_is_served_inside_the_io_threads_wait(image: Path) -> None:
    """After a pass of the device's Python that left the ring empty, the queue is leased to C: the next
    kick is served in the I/O thread's C wait -- data read, used index published, the interrupt posted into
    the APIC's IRR and the vCPU, spinning at a HLT, woken through its gate's words -- with no Python; the
    queue's lock folds it all into the queue and the counters. A request C cannot finish (a flush) goes
    back to Python, in order; a drain revokes the lease and ends its hold on the drive; neither a pass
    that served nothing nor a queue that writes is leased."""
    r = routed_apic()
    apic, kicks, pulse = r.apic, r.kicks, r.pulse
    ffi = blk_plane.load().ffi  # type: ignore[union-attr]
    words = ffi.new("int32_t[3]")
    apic.wake_words = (int(ffi.cast("intptr_t", words)), int(ffi.cast("intptr_t", words + 1)),
                       int(ffi.cast("intptr_t", words + 2)))
    with device_on(image, "writeback", plane=True, screen=True, irq=pulse) as s:  # type: ignore[arg-type]
        assert s.iothread is not None
        s.transport.notifiers[0].test_and_clear()  # DRIVER_OK's kick, with nothing offered yet
        s.iothread.start()
        queue = s.transport.queues[0]
        lease = s.device._leases[0]
        _, pieces, status = _read(s, 0, 1)
        _kick_and_wait(s, 1)  # the device's Python pass: the plane serves it, the pass grants the lease
        assert lease.grants == 1 and kicks == [1] and s.iothread.served_natively == 0
        apic.isr = 0
        apic.irr = 0  # the guest took the first interrupt and ended it
        s.transport.write(0x064, 4, INT_USED_BUFFER)  # InterruptACK
        _used_event(s, 1)  # and wants one for the next request

        words[0] = 1  # the vCPU spins at a HLT inside its run
        _, pieces, status = _read(s, 16, 2)
        _kick_and_wait(s, 1)
        assert s.iothread.served_natively == 1 and int(lease.state.calls) == 1
        assert kicks == [1] and list(words) == [1, 1, 1]  # woken in C: interrupt pending, attention
        assert apic.irr == 1 << 0x33 and s.transport.interrupt_status == INT_USED_BUFFER
        assert s.memory.read_u8(status) == vblk.S_OK
        assert b"".join(s.memory.read(a, n) for a, n in pieces) == PATTERN[16 * SECTOR:32 * SECTOR]
        assert s.device.requests == 1 and s.transport.interrupts == 1  # not folded in yet
        with queue.lock:  # every taker of the lock settles the lease first
            assert queue.last_avail == 2 and queue.used_idx == 2
            assert s.device.requests == 2 and s.device._planes[0].served == 2 and s.transport.interrupts == 2
            assert int(lease.state.state) == 0 and int(lease.state.calls) == 0
        assert s.backend._inflight == 0  # the stop ended the lease's pass-through

        _read(s, 24, 6)
        _kick_and_wait(s, 1)  # no lease now: Python's pass serves it and grants the lease again
        deadline = time.monotonic() + 30
        while lease.grants < 2:  # the pass grants after it published
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert s.iothread.served_natively == 1
        words[0] = 0  # the vCPU sleeps: only Python may wake it
        offered = [_read(s, 32, 3), offer(s.driver, Request(vblk.T_FLUSH, 0, 0, True, 16, False), 4),
                   _read(s, 48, 5)]
        _used_event(s, 3)
        assert [h for h, _ in _kick_and_wait(s, 3)] == [h for h, _, _ in offered]
        # C took the kick, served the first read and stopped at the flush: its pass finished the rest
        assert s.iothread.served_natively == 1 and s.device._planes[0].stops_for_python >= 1
        assert kicks == [1, 1] and s.transport.interrupts == 3  # its interrupt, posted in C, kicked by Python
        with s.backend.drained():
            assert s.backend._inflight == 0 and int(lease.state.state) == 0
        with queue.lock:
            assert s.device.requests == 6 and queue.last_avail == 6

        grants = lease.grants
        serve(s.transport)  # a pass with nothing to serve (a spurious kick) grants nothing
        assert lease.grants == grants


def _wait_for_grants(lease: blk_plane.Lease, grants: int) -> None:
    deadline = time.monotonic() + 30
    while lease.grants < grants:  # the pass grants after it published
        assert time.monotonic() < deadline, "the pass granted no lease"
        time.sleep(0.001)


def test_writes_no_dirty_bitmap_records_are_leased_too(copy: Path) -> None:
    """A write a dirty bitmap records keeps its queue in Python (the bitmap hears of it before the guest
    does). With nothing recording, the pass that wrote leases the queue and C serves the next write whole;
    a bitmap that starts recording while the queue is leased gets the next write's range, through Python."""
    r = routed_apic()
    apic = r.apic
    ffi = blk_plane.load().ffi  # type: ignore[union-attr]
    words = ffi.new("int32_t[3]")
    apic.wake_words = (int(ffi.cast("intptr_t", words)), int(ffi.cast("intptr_t", words + 1)),
                       int(ffi.cast("intptr_t", words + 2)))
    with device_on(copy, "writeback", plane=True, screen=True, irq=r.pulse) as s:  # type: ignore[arg-type]
        assert s.iothread is not None
        s.transport.notifiers[0].test_and_clear()  # DRIVER_OK's kick, with nothing offered yet
        s.iothread.start()
        queue = s.transport.queues[0]
        lease = s.device._leases[0]
        bitmaps = bitmaps_of(s.backend.root)
        bitmap = bitmaps.create("b", granularity=65536)

        done = 0

        def write(sector: int, seed: int) -> None:
            nonlocal done
            apic.isr = apic.irr = 0  # the guest took the last interrupt, ended it
            s.transport.write(0x064, 4, INT_USED_BUFFER)  # and acknowledged it
            _used_event(s, done)  # it wants one for this request
            offer(s.driver, Request(vblk.T_OUT, sector, 4096, True, 4096, False), seed)
            _kick_and_wait(s, 1)
            done += 1

        write(64, 1)
        with queue.lock:
            assert lease.grants == 0 and s.device._planes[0].wrote
        assert list(bitmap.dirty_extents()) == [(0, 65536)]

        bitmaps.set_enabled("b", False)
        write(72, 2)
        _wait_for_grants(lease, 1)
        words[0] = 1  # the vCPU spins at a HLT inside its run
        write(80, 3)
        assert s.iothread.served_natively == 1 and int(lease.state.calls) == 1

        bitmaps.set_enabled("b", True)  # while the queue is leased
        write(256, 4)
        with queue.lock:
            assert s.iothread.served_natively == 1 and s.device._planes[0].served == 4
        assert list(bitmap.dirty_extents()) == [(0, 65536), (131072, 65536)]
        assert s.backend._inflight == 0
    data = copy.read_bytes()
    for sector, seed in ((64, 1), (72, 2), (80, 3), (256, 4)):
        assert data[sector * SECTOR:sector * SECTOR + 4096] == bytes((seed + i) & 0xFF for i in range(4096))


def test_a_hostile_chain_reaching_a_leased_queue_breaks_the_device_not_the_thread(image: Path) -> None:
    """A chain whose buffer lies outside guest RAM, offered while C holds the lease: C leaves it untouched
    and hands the kick to Python, whose rules mark the device as needing a reset; the lease ends with its
    hold on the drive, and the I/O thread goes on serving."""
    with device_on(image, "writeback", plane=True, screen=True) as s:
        assert s.iothread is not None
        s.transport.notifiers[0].test_and_clear()  # DRIVER_OK's kick, with nothing offered yet
        s.iothread.start()
        lease = s.device._leases[0]
        _read(s, 0, 1)
        _kick_and_wait(s, 1)
        deadline = time.monotonic() + 30
        while lease.grants < 1:  # the pass grants after it published
            assert time.monotonic() < deadline
            time.sleep(0.001)
        offer(s.driver, Request(vblk.T_IN, 8, 4096, True, 16, False, outside_ram=True), 2)
        s.transport.write(REG_QUEUE_NOTIFY, 4, 0)
        while not s.transport.broken:
            assert time.monotonic() < deadline, "the device did not break"
            time.sleep(0.001)
        assert s.iothread.running and int(lease.state.state) == 0
        assert s.backend._inflight == 0  # the broken device's stop ended the lease's pass-through
