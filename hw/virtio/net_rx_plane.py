"""virtio-net's receive plane: frames from the TAP into the guest's receive buffers in C.

Why: host -> guest TCP moves 64 KiB frames (the TAP hands over GSO packets once the guest takes TSO), and
Linux posts page-sized mergeable buffers, so each frame fills ~16 of them. In Python, per frame: the read,
~16 pops, the copy into each buffer and the push took ~140 µs of the I/O thread's time, under the GIL the
vCPU thread needs for its own exits (probe, 2026-12-07: 125 µs in ``_deliver`` for a median 65238-byte
frame); host -> guest TCP ran at 0.59-0.69 of QEMU's. The C call (``net_rx_plane.c``, after ``vring.c``)
reads, walks, copies and fills the used elements for a whole batch without the GIL.

What it serves: the plain path, with the link up and the backend healthy -- a frame read into the
device's own host buffer (shared with the Python path: a frame left there is pending for either), copied
into as many buffers as it needs. Everything else -- a chain the walk refuses or shorter than the header,
a frame no buffers could hold, a read error or end of file, a frame of an impossible size -- ends the call
before it touches the ring, and :class:`~pyemu.hw.virtio.net.VirtioNet`'s Python path handles it with its
rules and reports. After the call Python reports the written guest ranges to the DMA layer, then publishes
the used index (:meth:`~pyemu.hw.virtio.queue.Virtqueue.served_elsewhere`), the order its own push keeps.

``PYEMU_VIRTIO_NET_RX_PLANE=0`` turns it off (the Python path alone).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio import vring
from pyemu.hw.virtio.queue import Virtqueue

CDEF = """
struct pyemu_nrx_call {
    struct pyemu_vr_queue queue;
    int32_t fd;
    int32_t vnet;
    int32_t mergeable;
    int32_t guest_csum;
    uint32_t hdr_len, min_frame, max_frame;
    uint8_t *buf;
    uint32_t max_frames;
    struct pyemu_vr_range *wrote;
    uint32_t max_wrote;
    uint32_t buf_len;
    uint16_t last_avail, used_idx;
    uint32_t frames, chains, nwrote;
    uint64_t bytes;
    int32_t stop;
    int32_t err;
};
int pyemu_nrx_serve(struct pyemu_nrx_call *c);
"""

STOP_NO_FRAME, STOP_NO_BUFFERS, STOP_PYTHON, STOP_BAD_FRAME, STOP_LIMIT, STOP_END, STOP_READ_ERROR = range(7)
MAX_WROTE = 8192
"""Written guest ranges one call may report (a 64 KiB frame in 4 KiB buffers: ~17)."""

PLANE = vring.NativePlane("net_rx_plane", Path(__file__).with_name("net_rx_plane.c"), CDEF,
                          what="virtio-net's C receive plane", switch="PYEMU_VIRTIO_NET_RX_PLANE")
load = PLANE.load


class Received(NamedTuple):
    """What one call did: frames and their bytes (headers included) delivered, why it stopped, and the
    errno of a failed read (STOP_READ_ERROR)."""

    frames: int
    bytes: int
    stop: int
    err: int


class ReceivePlane:
    """One NIC's C call: RAM regions, the call structure and the written-ranges buffer, made once and reused
    on the device's I/O thread. ``buffer`` is the device's host frame buffer (header room included)."""

    def __init__(self, module: ModuleType, dma: DmaMemory, fd: int, buffer: memoryview, *, vnet: bool,
                 hdr_len: int, min_frame: int, max_frame: int) -> None:
        ffi: Any = module.ffi
        self._ram = vring.ram_regions(ffi, dma)
        self._wrote = vring.WrittenRanges(ffi, dma, MAX_WROTE)
        self._buffer = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
        self._call = call = ffi.new("struct pyemu_nrx_call *")
        call.queue.ram = self._ram
        call.queue.nram = len(self._ram)
        call.fd = fd
        call.vnet = vnet
        call.hdr_len, call.min_frame, call.max_frame = hdr_len, min_frame, max_frame
        call.buf = self._buffer
        call.wrote = self._wrote.table
        call.max_wrote = MAX_WROTE
        self._serve = module.lib.pyemu_nrx_serve
        self._setup: tuple[object, ...] | None = None

    def serve(self, queue: Virtqueue, dma: DmaMemory, pending: int, max_frames: int, *, mergeable: bool,
              guest_csum: bool) -> tuple[Received, int]:
        """Move frames into ``queue`` (its lock held), starting with the ``pending`` bytes already in the
        buffer; returns what was delivered and the bytes pending in the buffer now."""
        call = self._call
        rings = vring.ring_fields(queue)
        setup = (rings, mergeable, guest_csum)
        if setup != self._setup:
            vring.set_ring_fields(call.queue, rings)
            call.mergeable, call.guest_csum = mergeable, guest_csum
            self._setup = setup
        call.buf_len = pending
        call.max_frames = max_frames
        call.last_avail, call.used_idx = queue.last_avail, queue.used_idx
        self._serve(call)  # cffi lets the GIL go for the call
        chains = call.chains
        if chains:
            ranges = self._wrote.to_report(call.nwrote)
            queue.served_elsewhere(dma, chains, call.last_avail, call.used_idx, ranges)
        return Received(call.frames, call.bytes, call.stop, call.err), call.buf_len
