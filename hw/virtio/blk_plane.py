"""virtio-blk's data plane: the reads and writes at the head of a queue served in C, between the image
file and guest RAM.

Why: with a guest reading 4 KiB at queue depth 1 under the software CPU, the I/O thread's Python between
the kick and ``preadv`` took ~60 us a request and ~35 us from the end of the read to the interrupt
(measured 2026-12-06, ~470 us a request in all; QEMU's thread takes ~7 and ~5); around a 1 MiB write it
was ~70 us before ``pwritev`` and ~50 after. Python running once per request on a host that has meanwhile
run other work is several times slower than the same code in a tight loop. The C walk (``blk_plane.c``)
takes a few microseconds, and runs without the GIL.

What it serves: reads (VIRTIO_BLK_T_IN) and writes (T_OUT) of a drive whose graph is plain ``raw`` over
``file`` and not throttled (:meth:`~pyemu.block.backend.BlockBackend.begin_pass_through`, which also says
when writes must keep to Python), and reads of a ``qcow2`` drive over ``file`` whose every cluster the
image's read map (:mod:`pyemu.block.qcow2.read_map`) places in the file -- split where the clusters are not
one after the other there; kick to ``preadv`` of a 1 MiB read ~300 -> ~40 µs (perf trace, 2026-12-07) --
at the head of the queue, one ``preadv``/``pwritev`` for each run of consecutive reads (or writes) of
consecutive sectors -- Linux offers a 1 MiB O_DIRECT read as a 1020 KiB request and a 4 KiB one, which
one at a time cost a second host read (~80 µs on this project's hosts). It stops
before the first chain that is anything else -- a flush, a discard, a chain it cannot check, an O_DIRECT
request that needs a bounce buffer, a write below the drive's write floor, a failed host call -- and the
device's Python path takes over from there with every rule and error report it has; a chain is either
served whole in C or left untouched. After the C call, Python marks the written disk ranges in the dirty
bitmaps, reports the written guest ranges to the DMA layer and then publishes the used index
(:meth:`~pyemu.hw.virtio.queue.Virtqueue.served_elsewhere`), the order its own path keeps, so the software
CPU drops stale translations before the guest can see the data. When there is nothing to mark or report --
a call that wrote no disk range and whose guest writes the accelerator's DMA write screen passes whole --
the C call publishes the used index itself and decides the interrupt as
:meth:`~pyemu.hw.virtio.queue.Virtqueue.should_interrupt` does
(:meth:`~pyemu.hw.virtio.queue.Virtqueue.published_elsewhere`), which took Python ~17 µs per read between
the host read and the interrupt (stamped on 2026-12-07: the report and the index store ~9, the decision ~8).
An interrupt it decided is also posted there, into the APIC's IRR with the InterruptStatus bit set, when the
transport has an armed route (:meth:`~pyemu.hw.virtio.mmio.VirtioMmio.interrupt_route`,
:class:`~pyemu.hw.intc.apic_core.NativeRoute`): the device then only kicks the vCPU, instead of the
models' pulse, IOAPIC and APIC acceptance (~32 µs of Python per read on that day).

``PYEMU_VIRTIO_BLK_PLANE=0`` turns it off (the Python path alone, as before it existed).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from pyemu.block.backend import BlockBackend
from pyemu.block.driver import PassThrough
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.intc.apic_core import NativeRoute
from pyemu.hw.virtio import vring
from pyemu.hw.virtio.queue import MAX_QUEUE_SIZE, Virtqueue

CDEF = """
struct pyemu_bp_call {
    struct pyemu_vr_queue queue;
    int32_t fd;
    uint64_t file_offset;
    uint64_t disk_bytes;
    uint64_t direct_align;
    uint64_t direct_end;
    int64_t write_floor;
    const uint64_t *read_map;
    uint64_t map_clusters;
    uint32_t cluster_bits;
    uint32_t max_requests;
    struct pyemu_vr_range *wrote;
    uint32_t max_wrote;
    struct pyemu_vr_range *disk;
    uint32_t max_disk;
    uint16_t last_avail, used_idx;
    uint32_t served, nwrote, ndisk;
    uint32_t merged;
    int32_t stop;
    int64_t (*screen)(const void *state, const uint64_t *pairs, uint64_t count);
    const void *screen_state;
    int32_t signalled;
    int32_t published;
    int32_t interrupt;
    int (*post)(void *route);
    void *route;
    int32_t posted;
};
int pyemu_bp_serve(struct pyemu_bp_call *c);
"""

STOP_EMPTY, STOP_PYTHON, STOP_HOST_ERROR, STOP_LIMIT = 0, 1, 2, 3
MAX_WROTE = 4096
"""Written guest ranges one call may report; a call that would need more stops before that request."""
MAX_DISK = 256
"""Written disk ranges one call may report (one per write)."""
PLANE = vring.NativePlane("blk_plane", Path(__file__).with_name("blk_plane.c"), CDEF,
                          what="virtio-blk's C data plane", switch="PYEMU_VIRTIO_BLK_PLANE")
load = PLANE.load


class DataPlane:
    """One device's C call: guest RAM's regions, the call structure and the written-ranges buffer, made once
    (RAM stays mapped at one address for the VM's life) and reused by every call on the device's I/O thread."""

    def __init__(self, module: ModuleType, dma: DmaMemory, route: NativeRoute | None = None) -> None:
        ffi: Any = module.ffi
        self._ffi = ffi
        self._ram = vring.ram_regions(ffi, dma)
        self._wrote = vring.WrittenRanges(ffi, dma, MAX_WROTE)
        self._disk = ffi.new("struct pyemu_vr_range[]", MAX_DISK)
        self._call = call = ffi.new("struct pyemu_bp_call *")
        call.queue.ram = self._ram
        call.queue.nram = len(self._ram)
        call.wrote = self._wrote.table
        call.max_wrote = MAX_WROTE
        call.disk = self._disk
        call.max_disk = MAX_DISK
        self._wrote.wire_screen(call)
        if route is not None:
            call.post = ffi.cast("int (*)(void *)", route.function)
            call.route = ffi.cast("void *", route.address)
        self._serve = module.lib.pyemu_bp_serve
        self._setup: tuple[object, ...] | None = None
        self.served = 0
        self.merged = 0
        """Requests served within an earlier request's host call (consecutive reads or writes merged)."""
        self.stops_for_python = 0
        self.host_errors = 0
        self.published = 0
        """Calls that published the used index themselves (nothing for Python to report first)."""
        self.drained = False
        """The last call served something and stopped on an empty ring (see :meth:`serve`)."""
        self.posted = False
        """The last call posted the queue's interrupt itself (the device kicks the vCPU, raises nothing)."""

    def serve(self, queue: Virtqueue, dma: DmaMemory, target: PassThrough, backend: BlockBackend) -> int:
        """Serve the reads and writes at the head of ``queue`` (its lock held) through ``target``, which
        ``backend`` handed out; returns how many."""
        call = self._call
        rings = vring.ring_fields(queue)
        setup = (rings, target)
        if setup != self._setup:  # the rings and the drive's descriptor rarely change between requests
            vring.set_ring_fields(call.queue, rings)
            (call.fd, call.file_offset, call.disk_bytes, call.direct_align, call.direct_end,
             call.write_floor, read_map, call.map_clusters, call.cluster_bits) = target
            call.read_map = self._ffi.cast("const uint64_t *", read_map)
            call.max_requests = min(queue.size, MAX_QUEUE_SIZE)
            self._setup = setup
        call.last_avail, call.used_idx = queue.last_avail, queue.used_idx
        signalled = queue.signalled_used
        call.signalled = -1 if signalled is None else signalled
        served = self._serve(call)  # cffi lets the GIL go for the call
        stop = call.stop
        # After a batch the C walk sets avail_event to the index it reached, fences, and looks again: a
        # chain the driver offers after that look notifies the queue, so nothing is left for Python.
        self.drained = bool(served) and stop == STOP_EMPTY
        self.posted = bool(call.posted)
        if stop == STOP_PYTHON:
            self.stops_for_python += 1
        elif stop == STOP_HOST_ERROR:
            self.host_errors += 1
        if call.ndisk:
            backend.wrote_through(vring.range_list(self._disk, call.ndisk))
        if served:
            if call.published:
                # Published in C, with the interrupt decided: nothing was left to report (blk_plane.c).
                self._wrote.screened += call.nwrote
                queue.published_elsewhere(served, call.last_avail, call.used_idx, call.signalled,
                                          bool(call.interrupt) and not self.posted)
                self.published += 1
            else:
                ranges = self._wrote.to_report(call.nwrote)
                queue.served_elsewhere(dma, served, call.last_avail, call.used_idx, ranges)
            self.served += served
            self.merged += call.merged
        return served
