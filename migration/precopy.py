"""Live pre-copy: RAM is sent while the guest runs, then the pages that changed, round after round, and
the VM is stopped only for the last, small set (QEMU's ``ram_save_iterate`` + ``migration_iteration_run``
in spirit).

Algorithm: round 1 sends every non-zero page; each later round (a "dirty sync", counted in
``dirty-sync-count``) sends the pages that changed since they were sent. After a round, the bytes that
round had to send are what the next round will likely find again, so when they fit in ``downtime-limit``
at the measured bandwidth (the best bytes-sent-per-second of a round so far, capped by ``max-bandwidth``;
a round that sends nothing converges at once) the VM is
stopped, its I/O drained, and the final round, the clock, vCPUs and devices are written: the downtime.
As in QEMU without auto-converge, a guest that dirties memory faster than it can be sent keeps the
migration iterating until it converges or is cancelled.

How changed pages are found: with an accelerator that has a dirty log
(:class:`~pyemu.accel.base.DirtyLogging`; KVM: KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG; TCG: write
tracking through pyemu's own TLB-fill hook, :mod:`pyemu.accel.tcg.dirty_log`, QEMU's dirty-memory bitmap
fed by the softmmu slow path in spirit; both plus the pages devices reported through DmaMemory) by
:class:`LogTracker`. When the accelerator cannot log (the software CPU with its engine's own TLB fill,
``PYEMU_TCG_ENGINE_TLB=1``) by :class:`ShadowTracker`, which keeps a copy of every page as it was sent and
compares RAM against it at each sync -- it finds every change whatever made it (vCPU stores, DMA, ring
writes through plain views) at the cost of one RAM-sized host buffer and a memcmp of RAM per round.

The stream format needs nothing new: RAM sections may come before the clock, vCPU and device sections
and a page may appear several times (the destination writes each section as it reads it; the last copy
wins), and the two-phase load still applies devices and vCPUs only after the end marker.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Callable

from pyemu.accel.base import DirtyLogging
from pyemu.block.errors import BlockError
from pyemu.migration.images import activate_images, inactivate_images
from pyemu.system.messages import error_report
from pyemu.migration.params import MigrationCancelled, MigrationParameters
from pyemu.migration.stream import RAM_CHUNK, Kind, StreamWriter, Writable
from pyemu.migration.ram_scan import populated_chunks
from pyemu.migration.vmstate import _RAM_ADDR, _ZERO_CHUNK, PAGE, LoadStats, begin_stream, send_changed_pages, write_cpu_and_devices

if TYPE_CHECKING:
    from pyemu.machines.base import Machine
    from pyemu.system.memory import GuestMemory


class ShadowTracker:
    """What the destination holds of each page (all zero before round 1: it clears RAM before loading),
    and the pages of RAM that differ from it now."""

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self._shadow = {region.gpa: bytearray(region.size) for region in memory.regions}

    def sync(self, writer: StreamWriter, stats: LoadStats, cancel: threading.Event | None = None,
             first: bool = False, final: bool = False) -> int:
        """Send every page that differs from what was sent, chunk by chunk; returns the RAM bytes sent.
        A page the guest writes while its chunk is read is sent as read and found again next round."""
        sent = 0
        for region in self._memory.regions:
            shadow = self._shadow[region.gpa]
            view = memoryview(shadow)
            # Round 1 may skip the memfd's holes (they read zero, as the shadow does); later rounds compare
            # everything, since a page sent before may have become a hole again.
            pieces = (populated_chunks(self._memory, region, stats) if first else
                      ((region.gpa + start, min(RAM_CHUNK, region.size - start))
                       for start in range(0, region.size, RAM_CHUNK)))
            for gpa, size in pieces:
                if cancel is not None and cancel.is_set():
                    raise MigrationCancelled()
                start = gpa - region.gpa
                chunk = self._memory.read(gpa, size)
                if chunk == bytes(view[start:start + size]):
                    if first:
                        stats.zero_pages += size // PAGE
                    continue
                sent += send_changed_pages(writer, stats, region.gpa + start, chunk, view[start:start + size],
                                           count_zero=first)
                stats.stream_bytes = writer.bytes_written
        return sent

    def close(self) -> None:
        self._shadow.clear()


class LogTracker:
    """Changed pages as the accelerator's dirty log reports them (KVM: KVM_GET_DIRTY_LOG, plus the pages
    devices wrote through DmaMemory). Round 1 sends every non-zero page with logging already on, so a
    store that races the read is in the next round's log. The used rings of virtio queues are written
    through plain views that nothing reports: the final round adds their pages (the device is drained
    then, so they no longer change)."""

    def __init__(self, machine: Machine, accel: DirtyLogging) -> None:
        self._machine = machine
        self._accel = accel
        self._logging = False

    def sync(self, writer: StreamWriter, stats: LoadStats, cancel: threading.Event | None = None,
             first: bool = False, final: bool = False) -> int:
        memory = self._machine.memory
        sent = 0
        if first:
            self._accel.start_dirty_log()
            self._logging = True
            for region in memory.regions:
                for gpa, size in populated_chunks(memory, region, stats):
                    if cancel is not None and cancel.is_set():
                        raise MigrationCancelled()
                    chunk = memory.read(gpa, size)
                    if chunk == (_ZERO_CHUNK if size == RAM_CHUNK else bytes(size)):
                        stats.zero_pages += size // PAGE
                        continue
                    sent += send_changed_pages(writer, stats, gpa, chunk, None, count_zero=True)
                    stats.stream_bytes = writer.bytes_written
            return sent
        pages = self._accel.fetch_dirty_pages()
        if final:
            pages |= virtio_ring_pages(self._machine)
        run: list[int] = []
        for page in sorted(p for p in pages if memory.contains(p, PAGE)):
            if run and (page != run[-1] + PAGE or len(run) * PAGE >= RAM_CHUNK
                        or memory.region_of(page) is not memory.region_of(run[0])):
                sent += self._send_run(writer, stats, run)
                run = []
            run.append(page)
        if run:
            sent += self._send_run(writer, stats, run)
        stats.stream_bytes = writer.bytes_written
        return sent

    def _send_run(self, writer: StreamWriter, stats: LoadStats, run: list[int]) -> int:
        size = len(run) * PAGE
        writer.section(Kind.RAM, "", _RAM_ADDR.pack(run[0]) + self._machine.memory.read(run[0], size))
        stats.normal_pages += len(run)
        stats.ram_bytes += size
        return size

    def close(self) -> None:
        if self._logging:
            self._logging = False
            self._accel.stop_dirty_log()


def virtio_ring_pages(machine: Machine) -> set[int]:
    """The pages of every ready virtqueue's descriptor table and rings."""
    pages: set[int] = set()
    for device in machine.devices:
        for queue in getattr(device.model, "queues", None) or ():
            if not getattr(queue, "ready", False):
                continue
            size = int(queue.size)
            for addr, length in ((queue.desc_addr, 16 * size), (queue.avail_addr, 6 + 2 * size),
                                 (queue.used_addr, 6 + 8 * size)):
                pages.update(range(addr & ~(PAGE - 1), addr + length, PAGE))
    return pages


def make_tracker(machine: Machine) -> ShadowTracker | LogTracker:
    """The accelerator's dirty log when it has one (and can use it now), else the comparison with what
    was sent."""
    accel = machine.accel
    if isinstance(accel, DirtyLogging) and getattr(accel, "dirty_logging_available", True):
        return LogTracker(machine, accel)
    return ShadowTracker(machine.memory)


def precopy_save(machine: Machine, out: Writable, stats: LoadStats, params: MigrationParameters,
                 cancel: threading.Event, stop_vm: Callable[[], None]) -> None:
    """Save a running ``machine`` to ``out`` live. ``stop_vm`` pauses it (and drains its I/O) when the
    rest fits in the downtime limit; everything written after that call is the downtime."""
    writer = begin_stream(machine, out, "running")
    tracker = make_tracker(machine)
    inactivated = False

    def stop_and_inactivate() -> None:
        # As QEMU's migration_completion: the stopped, drained source lets go of its images (their
        # locks) before the final state goes out, so the destination can take them when it has loaded.
        nonlocal inactivated
        stop_vm()
        inactivate_images(machine)
        inactivated = True

    try:
        _iterate(machine, writer, tracker, stats, params, cancel, stop_and_inactivate)
    except BaseException:
        if inactivated:
            try:
                activate_images(machine)  # failed or cancelled: the source goes on with its images
            except BlockError as exc:
                error_report(str(exc))
        raise
    finally:
        tracker.close()


def _iterate(machine: Machine, writer: StreamWriter, tracker: ShadowTracker | LogTracker, stats: LoadStats,
             params: MigrationParameters, cancel: threading.Event, stop_vm: Callable[[], None]) -> None:
    stats.ram_total = sum(region.size for region in machine.memory.regions)
    stats.remaining = stats.ram_total
    first = True
    best_rate = 0.0
    while True:
        started = time.monotonic()
        sent = tracker.sync(writer, stats, cancel, first)
        elapsed = max(time.monotonic() - started, 1e-3)
        first = False
        stats.dirty_sync_count += 1
        stats.remaining = sent  # what the next round will likely find again
        # The best rate seen (a round that sends little is dominated by the scan, not the transfer),
        # capped by max-bandwidth.
        best_rate = max(best_rate, sent / elapsed)
        limit = params.max_bandwidth
        bandwidth = min(best_rate, float(limit)) if limit else best_rate
        stats.expected_downtime_ms = int(sent / max(bandwidth, 1.0) * 1000)
        stats.precopy_bytes = writer.bytes_written
        if sent == 0 or stats.expected_downtime_ms <= params.downtime_limit_ms:
            break
    stop_vm()
    if cancel.is_set():
        raise MigrationCancelled()
    with machine.lock:
        write_cpu_and_devices(machine, writer)
        tracker.sync(writer, stats, None, final=True)
    stats.dirty_sync_count += 1
    stats.remaining = 0
    writer.finish()
    stats.stream_bytes = writer.bytes_written
    stats.downtime_bytes = writer.bytes_written - stats.precopy_bytes
