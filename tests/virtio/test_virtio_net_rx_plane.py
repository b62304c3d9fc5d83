"""virtio-net's receive plane (pyemu.hw.virtio.net_rx_plane): frames the C call moves reach the guest
exactly as the Python path would move them, and everything it does not take is left to that path.

The main check is a property: random receive-buffer layouts (sizes, indirect tables, buffers too short
for the header, buffers outside guest RAM) and random frames (ordinary, large, too short, too long), with
and without mergeable buffers, vnet headers and GUEST_CSUM, are run through two devices -- plane on and
off -- and must leave the same used ring, the same bytes in every buffer, the same counters, the same
broken state and the same frames unread in the backend."""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio import net_rx_plane
from pyemu.hw.virtio.mmio import VirtioMmio
from pyemu.hw.virtio.net import F_GUEST_CSUM, F_MRG_RXBUF, MAX_FRAME, NetConfig, VirtioNet
from pyemu.system.iothread import IoThread
from pyemu.system.memory import GuestMemory
from pyemu.testing.virtio_driver import VirtioTestDriver

from .conftest import environment_setting
from .test_virtio_net import HDR, SocketBackend, frame, header

RAM_SIZE = 8 << 20
SCRATCH = 1 << 20
OUTSIDE_RAM = 64 << 20


class Irq:
    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1


@dataclass(frozen=True)
class Buffer:
    size: int
    indirect: bool = False
    split: bool = False          # two descriptors instead of one
    outside_ram: bool = False


@dataclass(frozen=True)
class Layout:
    mergeable: bool
    vnet: bool
    guest_csum: bool
    event_idx: bool


def plane_setting(on: bool) -> contextlib.AbstractContextManager[None]:
    return environment_setting("PYEMU_VIRTIO_NET_RX_PLANE", "1" if on else "0")


def run(layout: Layout, buffers: list[Buffer], frames: list[int], *, plane: bool) -> dict[str, object]:
    memory = GuestMemory([(0, RAM_SIZE)], name="net-rx-plane-test")
    iothread = IoThread("net-rx-plane-test")  # never started: the test serves the queue itself
    dma = DmaMemory(memory, lambda gpa, size: None)
    backend = SocketBackend(vnet_hdr=layout.vnet)
    backend.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # room for every frame drawn
    device = VirtioNet(backend, NetConfig(netdev="n0"))  # type: ignore[arg-type]
    transport = VirtioMmio(device, dma, Irq(), iothread, name="vn0")
    device.attach_iothread(iothread)
    try:
        with plane_setting(plane):
            driver = VirtioTestDriver(transport, memory, SCRATCH, scratch_size=6 << 20)
            want = ~0
            if not layout.mergeable:
                want &= ~F_MRG_RXBUF
            if not layout.guest_csum:
                want &= ~F_GUEST_CSUM
            driver.initialise(want=want, event_idx=layout.event_idx, queues={0: 64, 1: 16})
            posted: list[tuple[int, int]] = []
            for index, buf in enumerate(buffers):
                address = driver.buffer(buf.size)
                if buf.outside_ram:
                    address = OUTSIDE_RAM
                if buf.split and buf.size >= 2:
                    half = buf.size // 2
                    segments = [(address, half, True), (address + half, buf.size - half, True)]
                else:
                    segments = [(address, buf.size, True)]
                driver.submit(0, segments, indirect=buf.indirect, kick=False)
                posted.append((address, buf.size))
            for seed, size in enumerate(frames):
                data = frame(size, seed) if size >= 14 else bytes(range(size))
                backend.host.send((header(flags=2) if layout.vnet else b"") + data)
            for _ in range(3):
                try:
                    transport.process(0)
                except Exception as exc:  # noqa: BLE001 -- what IoThread hands to the transport's on_error
                    transport.fail_from(exc)
            unread = []
            while True:
                try:
                    message = backend.device_end.recv(1 << 17)
                except BlockingIOError:
                    break
                if not message:
                    break  # the end (or an empty frame: both read as b"")
                unread.append(message)
            rx = driver.queues[0]
            return {
                "used": driver.used(0),
                # what the device asked the driver for: with EVENT_IDX, the index whose buffer must notify
                "avail_event": memory.read(rx.used + 4 + 8 * rx.size, 2),
                "buffers": [memory.read(a, n) if a < RAM_SIZE else b"" for a, n in posted],
                "counters": (device.rx_frames, device.rx_bytes, device.rx_dropped),
                "broken": transport.broken,
                "pending": device._rx_len,
                "unread": unread,
                "plane": device._rx_plane is not None,
            }
    finally:
        transport.close()
        iothread.close()
        memory.close()


layouts = st.builds(Layout, mergeable=st.booleans(), vnet=st.booleans(), guest_csum=st.booleans(),
                    event_idx=st.booleans())
buffers_strategy = st.lists(st.builds(
    Buffer,
    size=st.sampled_from([4096] * 6 + [1526, 1024, 65562, 100, 11, 12, 0]),
    indirect=st.booleans(),
    split=st.booleans(),
    outside_ram=st.sampled_from([False] * 30 + [True]),
), max_size=40)
frames_strategy = st.lists(st.sampled_from([60, 1514, 3000, 9000, 65000, MAX_FRAME, MAX_FRAME + 1, 13, 14, 0]),
                           max_size=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(layout=layouts, buffers=buffers_strategy, frames=frames_strategy)
def test_the_plane_changes_nothing_the_guest_sees(layout: Layout, buffers: list[Buffer], frames: list[int]) -> None:
    with_plane = run(layout, buffers, frames, plane=True)
    without = run(layout, buffers, frames, plane=False)
    assert with_plane["plane"] and not without["plane"]
    for key in ("used", "buffers", "counters", "broken", "pending", "unread", "avail_event"):
        assert with_plane[key] == without[key], key


def test_large_frames_into_page_buffers_go_through_the_plane() -> None:
    layout = Layout(mergeable=True, vnet=True, guest_csum=True, event_idx=True)
    result = run(layout, [Buffer(4096)] * 60, [65000, 1514, 65000], plane=True)
    assert result["counters"] == (3, 65000 + 1514 + 65000, 0)
    used = result["used"]
    assert len(used) == 16 + 1 + 16 and not result["broken"]
    data = b"".join(buf[:n] for buf, (_, n) in zip(result["buffers"], used))
    first = data[:HDR + 65000]
    assert struct.unpack_from("<H", first, 10)[0] == 16 and first[0] == 2 and first[HDR:] == frame(65000, 0)


def test_a_short_buffer_is_left_to_python_which_breaks_the_device() -> None:
    layout = Layout(mergeable=True, vnet=True, guest_csum=True, event_idx=False)
    result = run(layout, [Buffer(4096), Buffer(8)], [1514, 1514], plane=True)
    assert len(result["used"]) == 1 and result["broken"]


def test_a_frame_of_an_impossible_size_is_dropped_as_in_python() -> None:
    layout = Layout(mergeable=True, vnet=False, guest_csum=False, event_idx=True)
    result = run(layout, [Buffer(4096)] * 4, [10, 1514], plane=True)
    assert result["counters"] == (1, 1514, 1) and len(result["used"]) == 1


def test_the_plane_builds() -> None:
    assert net_rx_plane.load() is not None


def test_a_backend_that_fails_is_left_to_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read error (here: the device's end shut down for reading gives end of file) is the Python path's:
    it warns once and stops receiving."""
    layout = Layout(mergeable=True, vnet=True, guest_csum=True, event_idx=True)
    warnings: list[str] = []
    monkeypatch.setattr("pyemu.hw.virtio.net.host_warning", warnings.append)
    original = SocketBackend.__init__

    def shut(self, **kwargs):  # type: ignore[no-untyped-def]
        original(self, **kwargs)
        self.device_end.shutdown(socket.SHUT_RD)
    monkeypatch.setattr(SocketBackend, "__init__", shut)
    result = run(layout, [Buffer(4096)] * 4, [], plane=True)
    assert result["counters"] == (0, 0, 0) and len(warnings) == 1 and "end of file" in warnings[0]
