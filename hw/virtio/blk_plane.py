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
CPU drops stale translations before the guest can see the data. When there is nothing to mark first or
report -- a call that wrote no disk range or whose drive had no dirty bitmap recording when the call began
(:meth:`~pyemu.block.backend.BlockBackend.records_writes`), and whose guest writes the accelerator's DMA
write screen passes whole -- the C call publishes the used index itself and decides the interrupt as
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

import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from pyemu.block.backend import BlockBackend
from pyemu.block.dirty_bitmap import RECORDING_CHANGES
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
    int32_t report_disk;
    const uint64_t *recording;
    uint64_t recording_seen;
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
struct pyemu_bp_lease {
    int32_t state;
    int32_t fd;
    struct pyemu_bp_call *call;
    int (*kick)(void *route);
    int32_t left;
    uint64_t calls, served, merged, screened, posted;
};
int pyemu_bp_lease_kick(void *opaque);
int pyemu_bp_lease_revoke(struct pyemu_bp_lease *l);
"""

STOP_EMPTY, STOP_PYTHON, STOP_HOST_ERROR, STOP_LIMIT = 0, 1, 2, 3
GRANTED = 1
"""``struct pyemu_bp_lease``'s state while C may serve the queue (0 revoked, 2 serving: ``blk_plane.c``)."""
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
        call.recording = ffi.cast("const uint64_t *", RECORDING_CHANGES.address)
        self._wrote.wire_screen(call)
        self.kick_function = 0
        """The route's C kick (:attr:`~pyemu.hw.intc.apic_core.NativeRoute.kick_function`), 0 without a route."""
        if route is not None:
            call.post = ffi.cast("int (*)(void *)", route.function)
            call.route = ffi.cast("void *", route.address)
            self.kick_function = route.kick_function
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
        self.wrote = False
        """The last call wrote to the disk."""
        self.finished = False
        """The last call published what it served itself: it left Python nothing to do first."""

    @property
    def call(self) -> Any:
        """The C call structure (a :class:`Lease` hands it to C between passes)."""
        return self._call

    def serve(self, queue: Virtqueue, dma: DmaMemory, target: PassThrough, backend: BlockBackend) -> int:
        """Serve the reads and writes at the head of ``queue`` (its lock held) through ``target``, which
        ``backend`` handed out; returns how many."""
        self.prepare(queue, target, backend)
        return self.account(queue, dma, backend, self._serve(self._call))  # cffi lets the GIL go for the call

    def prepare(self, queue: Virtqueue, target: PassThrough, backend: BlockBackend) -> None:
        """Set the call up for ``queue`` (its lock held) as it stands, ``target``, and whether ``backend``'s
        dirty bitmaps record writes (:meth:`_ask_recording`)."""
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
        self._ask_recording(backend)

    def _ask_recording(self, backend: BlockBackend) -> None:
        """Whether a dirty bitmap records what the next calls write, and the count of changes to that answer
        C compares once a write is done (:class:`~pyemu.block.dirty_bitmap.RecordingChanges`): taken first,
        so a change during the question moves it; odd, a change is under way."""
        call = self._call
        seen = RECORDING_CHANGES.value
        call.recording_seen = seen
        call.report_disk = bool(seen & 1) or backend.records_writes()

    def mark_written(self, backend: BlockBackend) -> None:
        """The disk ranges the last call wrote go to the drive's dirty bitmaps (once)."""
        call = self._call
        if call.ndisk:
            backend.wrote_through(vring.range_list(self._disk, call.ndisk))
            call.ndisk = 0

    def account(self, queue: Virtqueue, dma: DmaMemory, backend: BlockBackend, served: int) -> int:
        """After the call served ``served`` requests of ``queue`` (its lock held): report what it wrote and
        take its indices into the queue, publishing the used index where C did not; returns ``served``."""
        call = self._call
        stop = call.stop
        # After a batch the C walk sets avail_event to the index it reached, fences, and looks again: a
        # chain the driver offers after that look notifies the queue, so nothing is left for Python.
        self.drained = bool(served) and stop == STOP_EMPTY
        self.posted = bool(call.posted)
        self.wrote = bool(call.ndisk)
        self.finished = bool(served) and bool(call.published)
        if stop == STOP_PYTHON:
            self.stops_for_python += 1
        elif stop == STOP_HOST_ERROR:
            self.host_errors += 1
        self.mark_written(backend)
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

    def fold(self, queue: Virtqueue, served: int, merged: int, screened: int, calls: int) -> None:
        """Calls a :class:`Lease` finished in C (published, interrupts posted and kicked there): their
        indices, in the call, go to ``queue`` (its lock held), their counts to this plane's."""
        call = self._call
        queue.published_elsewhere(served, call.last_avail, call.used_idx, call.signalled, False)
        self._wrote.screened += screened
        self.served += served
        self.merged += merged
        self.published += calls


class Lease:
    """One queue of a virtio-blk device leased to its C data plane between the device's Python passes.

    Why: with the plane serving the ring and posting the interrupt in C, what remained of a 1 MiB read's
    Python on the I/O thread was the way from the kick to the C call -- the wait's return, the handler, the
    transport's checks, the device's and the plane's set-up, ~45 µs a request (stamped 2026-12-07; QEMU's
    thread is in C throughout). With a lease the thread's C wait (:mod:`pyemu.system.iothread_wait`) hands
    the kick straight to ``pyemu_bp_lease_kick`` in ``blk_plane.c``, which makes the same call with the
    set-up Python's last pass left and, when nothing in the result needs Python, wakes the vCPU itself
    (:attr:`~pyemu.hw.intc.apic_core.NativeRoute.kick_function`) and goes back to waiting.

    The rules that keep one owner of the ring and of the drive's requests:
    - Granted (:meth:`grant`) only by the device's own pass on the I/O thread, holding the queue's lock,
      after the C plane left the ring empty and published what it served itself, and only on a drive
      whose pass-through needs no ending (``raw`` over ``file``; a qcow2 read map belongs to its node's
      lock). The lease holds a pass-through of the drive
      (:meth:`~pyemu.block.backend.BlockBackend.begin_pass_through`) all along: what C serves counts as in
      flight, so a drain waits for it.
    - Stopped (:meth:`stop`) by anything that changes what it was granted on: the queue's lock (every taker
      settles the lease first: :class:`~pyemu.hw.virtio.queue.QueueLock`), a drain, a throttle, closing the
      drive (:attr:`~pyemu.block.backend.BlockBackend.lease_revokers`), a broken device. The stop waits for
      a call in progress, lets the dirty bitmaps hear of a write C left unfinished, and ends the
      pass-through.
    - Whatever C did is folded into the queue's indices and the counters under the queue's lock
      (:meth:`settled`) before anyone looks at them; a call whose result needed Python (a flush behind the
      reads, a write a dirty bitmap records -- also one that started recording after the grant, which moves
      :data:`~pyemu.block.dirty_bitmap.RECORDING_CHANGES` -- an interrupt through the models, a vCPU that
      is not spinning at a HLT) ended the lease, and the device finishes it there with its usual steps.
    """

    def __init__(self, module: ModuleType, notifier_fd: int, backend: BlockBackend) -> None:
        ffi: Any = module.ffi
        self._ffi = ffi
        self._lib = module.lib
        self.state: Any = ffi.new("struct pyemu_bp_lease *")
        self.state.fd = notifier_fd
        self.native = (int(ffi.cast("uintptr_t", ffi.addressof(self._lib, "pyemu_bp_lease_kick"))),
                       int(ffi.cast("uintptr_t", self.state)))
        """The I/O thread's native handler for the queue's notifier
        (:data:`~pyemu.system.iothread_wait.NativeHandler`)."""
        self._backend = backend
        self._lock = threading.Lock()
        self._plane: DataPlane | None = None
        self._holds_pass_through = False
        self.grants = 0

    def grant(self, plane: DataPlane, queue: Virtqueue) -> bool:
        """From the device's pass (I/O thread, ``queue``'s lock held, the ring left empty by ``plane``): let C
        serve the queue's next kicks. False, with nothing granted, when the drive offers no pass-through now
        (quiesced, throttled, closed) or one that needs ending."""
        with self._lock:
            if self._holds_pass_through:
                return False  # not settled: cannot happen under the queue's lock
            target = self._backend.begin_pass_through()
            if target is None:
                return False
            if target.read_map:
                self._backend.end_pass_through()
                return False
            self._holds_pass_through = True
            plane.prepare(queue, target, self._backend)
            state = self.state
            state.call = plane.call
            state.kick = self._ffi.cast("int (*)(void *)", plane.kick_function)
            state.left = 0
            self._plane = plane
            self.grants += 1
            state.state = GRANTED  # stored last (x86 keeps the stores in order)
            return True

    def stop(self) -> None:
        """C serves no more (any thread; waits for a call in progress); the pass-through ends, after the dirty
        bitmaps heard of a write C left unfinished."""
        with self._lock:
            if not self._holds_pass_through:
                return  # never granted since the last stop: C cannot be serving
            self._lib.pyemu_bp_lease_revoke(self.state)  # cffi lets the GIL go for the wait
            self._holds_pass_through = False
            try:
                if self.state.left and self._plane is not None:
                    self._plane.mark_written(self._backend)
            finally:
                self._backend.end_pass_through()

    def settled(self, queue: Virtqueue) -> tuple[int, bool]:
        """Under ``queue``'s lock: stop, fold the calls C finished into ``queue`` and the plane; returns
        ``(interrupts posted and kicked in C, whether a call waits to be finished)`` -- the plane's
        :meth:`DataPlane.account` finishes that one."""
        self.stop()
        state, plane = self.state, self._plane
        if plane is None:
            return 0, False
        posted = int(state.posted)
        if state.calls:
            plane.fold(queue, int(state.served), int(state.merged), int(state.screened), int(state.calls))
            state.calls = state.served = state.merged = state.screened = state.posted = 0
        left = bool(state.left)
        state.left = 0
        return posted, left
