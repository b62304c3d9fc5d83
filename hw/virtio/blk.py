"""virtio-blk (virtio 1.x section 5.2): a disk on a :class:`~pyemu.block.backend.BlockBackend`.

Requests are read from the guest with every field checked -- sector ranges against the capacity, data
lengths in whole sectors, a status byte where the spec puts it -- and a request that cannot be served
gets an error status (IOERR, UNSUPP) rather than breaking the device; only a request too malformed to
carry a status (no writable byte at the end) marks the device as needing a reset. Payloads move
zero-copy: ``preadv``/``pwritev`` straight between the image and memoryviews of guest RAM, on the
device's I/O thread. A throttled drive (:mod:`pyemu.block.throttle`) never makes that thread sleep: a
read or write the throttle holds back is kept aside with its ticket, the rest of the ring waits behind it,
and the throttle's timer kicks the queue when its turn comes.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from pyemu.block.backend import BlockBackend
from pyemu.block.errors import BlockError
from pyemu.block.iovec import ByteViews
from pyemu.block.throttle import Ticket
from pyemu.hw.virtio import blk_plane
from pyemu.hw.virtio.device import ID_BLOCK, VirtioDevice, pack_config
from pyemu.hw.virtio.errors import VirtqueueError
from pyemu.hw.virtio.queue import DescriptorChain, Virtqueue
from pyemu.system import log
from pyemu.system.iothread_wait import NativeHandler

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2
ID_BYTES = 20

F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_CONFIG_WCE = 1 << 11
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

WRITE_ZEROES_UNMAP = 1
MAX_DISCARD_SECTORS = 0x3FFFFF  # just under 2 GiB per request, as QEMU advertises
MAX_DISCARD_SEGMENTS = 1
SEGMENT_STRUCT = struct.Struct("<QII")
MAX_MERGED_REQUESTS = 32
MAX_MERGED_BYTES = 8 << 20
HEADER = struct.Struct("<IIQ")


@dataclass(frozen=True)
class BlkConfig:
    """``-device virtio-blk-device`` properties."""

    drive_id: str
    serial: str = ""
    num_queues: int = 1
    queue_size: int = QUEUE_SIZE
    discard: bool = True
    write_zeroes: bool = True


class VirtioBlk(VirtioDevice):
    device_id = ID_BLOCK
    name = "virtio-blk"
    kicks_worth_polling = True

    def __init__(self, backend: BlockBackend, config: BlkConfig) -> None:
        super().__init__(tuple([config.queue_size] * config.num_queues))
        self.backend = backend
        self.config = config
        self._requests_in_python = 0
        self.errors = 0
        self._merged_in_python = 0
        # A request the drive's throttle holds back, per queue: it is served when its ticket is granted
        # (the timer kicks the queue); the requests behind it stay in the guest's ring, in order.
        self._held: dict[int, tuple[DescriptorChain, Ticket]] = {}
        # A backend without throttling support (a test double) is served without admission.
        self._throttles = hasattr(backend, "admit")
        # The C data plane, one call structure per queue (made at the queue's first kick); a stand-in backend
        # that cannot name a host descriptor (a test double) has none.
        self._planes: dict[int, blk_plane.DataPlane] = {}
        self._no_plane = not hasattr(backend, "begin_pass_through")
        # Queues whose kicks C may serve between passes (blk_plane.Lease), per queue.
        self._leases: dict[int, blk_plane.Lease] = {}
        self.config_changes = 0
        listeners = getattr(backend, "resize_listeners", None)  # a test's stand-in backend may not resize
        if listeners is not None:
            listeners.append(self._resized)

    def _resized(self, size: int) -> None:
        """block_resize changed the drive: the capacity field (read live from the backend) is new, so the
        driver gets a config-change interrupt and re-reads it (QEMU's virtio_blk_resize)."""
        if self.context is not None:
            self.config_changes += 1
            self.context.notify_config()

    # -- description ------------------------------------------------------------------------------------
    def device_features(self) -> int:
        features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY
        if self.config.num_queues > 1:
            features |= F_MQ
        if self.backend.read_only:
            features |= F_RO
        else:
            if self.config.discard:
                features |= F_DISCARD
            if self.config.write_zeroes:
                features |= F_WRITE_ZEROES
        return features

    def config_bytes(self) -> bytes:
        capacity = self.backend.size() // SECTOR
        return (pack_config("QII", capacity, 0, SEG_MAX)
                + pack_config("HBB", 0, 0, 0)              # geometry: unused
                + pack_config("I", SECTOR)                 # blk_size
                + pack_config("BBHI", 0, 0, 1, 0)          # topology: 512-byte physical blocks
                + pack_config("BBH", 1, 0, self.config.num_queues)  # writeback cache, num_queues
                + pack_config("III", MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1)
                + pack_config("IIB3x", MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1))

    @property
    def requests(self) -> int:
        """Requests served: by the Python path and by the C planes (those a lease served in C once its
        queue's lock folded them in)."""
        return self._requests_in_python + sum(plane.served for plane in self._planes.values())

    @property
    def merged(self) -> int:
        """Requests served as part of an earlier request's host I/O (reads or writes merged)."""
        return self._merged_in_python + sum(plane.merged for plane in self._planes.values())

    # -- requests ---------------------------------------------------------------------------------------
    def native_kick_handler(self, queue: Virtqueue, notifier_fd: int) -> NativeHandler | None:
        """A lease for ``queue`` (:class:`~pyemu.hw.virtio.blk_plane.Lease`) when the C plane can serve this
        drive: its kicks then go to C between this device's passes, once a pass granted it."""
        if self._no_plane or not hasattr(self.backend, "lease_revokers"):
            return None
        module = blk_plane.PLANE.module_for_a_device()
        if module is None:
            return None
        lease = self._leases[queue.index] = blk_plane.Lease(module, notifier_fd, self.backend)
        if len(self._leases) == 1:
            self.backend.lease_revokers.append(self.stop_native_service)
        queue.lock.settle = lambda: self._settle(queue)
        return lease.native

    def stop_native_service(self) -> None:
        for lease in self._leases.values():
            lease.stop()

    def _settle(self, queue: Virtqueue) -> None:
        """``queue``'s lock was taken: what its lease's C calls did goes into the queue and the counters,
        and a call C left to Python is finished as the pass would have (its interrupt raised)."""
        posted, left = self._leases[queue.index].settled(queue)
        if posted:
            self.context.interrupts_kicked_elsewhere(posted)  # type: ignore[union-attr]
        plane = self._planes.get(queue.index)
        if left and plane is not None:
            if plane.account(queue, self.context.dma, self.backend, plane.call.served):  # type: ignore[union-attr]
                self._interrupt_after_plane(queue, plane)

    def _interrupt_after_plane(self, queue: Virtqueue, plane: blk_plane.DataPlane) -> None:
        if plane.posted:  # the interrupt is in the APIC's IRR already: only the vCPU's kick is left
            self.context.interrupt_posted()  # type: ignore[union-attr]
        else:
            self.context.notify_queue(queue)  # type: ignore[union-attr]

    def process_queue(self, queue: Virtqueue) -> None:
        self._process_queue(queue)
        # C may take the next kick when the plane's own call served requests, left the ring empty and
        # published them itself (what the guest streams then is more of the same, and C can finish it).
        # Not after a call whose result needed Python first (a write a dirty bitmap records, guest writes
        # into translated code): C would hand each such request back and pay for the lease's stop and
        # grant -- sequential 1 MiB writes were 7% slower leased while every write came back to Python
        # for the bitmaps (six paired runs, 2026-12-07). Nor after a pass whose plane call served nothing
        # (a spurious kick, a flush, common in a stream of writes): with such grants writes measured 0.93
        # of a build without leases, without them 0.97 (eight paired runs each, 2026-12-07).
        lease = self._leases.get(queue.index)
        plane = self._planes.get(queue.index)
        if lease is not None and plane is not None and plane.drained and plane.finished \
                and queue.index not in self._held:
            lease.grant(plane, queue)

    def _process_queue(self, queue: Virtqueue) -> None:
        assert self.context is not None
        dma = self.context.dma
        served = 0
        held = self._held.get(queue.index)
        if held is not None:
            if not held[1].granted:
                return  # still waiting for its turn: the throttle's timer kicks the queue
            del self._held[queue.index]
            queue.push(dma, held[0], self._serve(queue, held[0]))
            served += 1
        if self._throttles and self.backend.throttle_member() is not None:
            served += self._process_throttled(queue)
            if served:
                self.context.notify_queue(queue)
            return
        if served:
            self.context.notify_queue(queue)
        if self._plane_serves(queue):
            plane = self._planes[queue.index]
            self._interrupt_after_plane(queue, plane)
            if plane.drained:
                # Nothing left (avail_event asks for the next kick): a chain offered since goes to the C
                # plane at that kick, not to the Python pass below (~5% of 1 MiB reads took that pass).
                return
        while self._process_batch(queue):
            self.context.notify_queue(queue)

    def _plane_serves(self, queue: Virtqueue) -> int:
        """Reads and writes at the head of the queue served by the C data plane (:mod:`pyemu.hw.virtio.blk_plane`)
        when the drive allows it; returns how many (the Python path serves whatever it leaves)."""
        plane = self._planes.get(queue.index)
        if plane is None:
            if self._no_plane:
                return 0
            module = blk_plane.PLANE.module_for_a_device()
            if module is None:
                self._no_plane = True
                return 0
            plane = self._planes[queue.index] = blk_plane.DataPlane(  # type: ignore[union-attr]
                module, self.context.dma, self.context.interrupt_route())  # type: ignore[union-attr]
        target = self.backend.begin_pass_through()
        if target is None:
            return 0
        try:
            return plane.serve(queue, self.context.dma, target, self.backend)  # type: ignore[union-attr]
        finally:
            self.backend.end_pass_through()

    def _process_batch(self, queue: Virtqueue) -> int:
        """Pop every request the driver has offered, serve them -- adjacent reads (or writes) of
        consecutive sectors as one host request, as QEMU's virtio-blk merges them -- and push them back
        together. Returns how many were served. A malformed chain raises after the requests before it
        are served and pushed (the transport then marks the device broken)."""
        dma = self.context.dma  # type: ignore[union-attr]
        chains: list[DescriptorChain] = []
        failure: VirtqueueError | None = None
        while len(chains) < queue.size:
            try:
                chain = queue.pop(dma)
            except VirtqueueError as exc:
                failure = exc
                break
            if chain is None:
                break
            chains.append(chain)
            if chain.writable_length < 1 or chain.readable_length < HEADER.size:
                break  # it breaks the device when its turn comes: take nothing from the ring after it
        done: list[tuple[DescriptorChain, int]] = []
        try:
            index = 0
            while index < len(chains):
                merged = self._serve_merged(chains, index, done)
                if merged:
                    index += merged
                    continue
                done.append((chains[index], self._serve(queue, chains[index])))
                index += 1
        finally:
            if done:
                queue.push_many(dma, done)
        if failure is not None:
            raise failure
        return len(done)

    def _process_throttled(self, queue: Virtqueue) -> int:
        """One request at a time through the drive's throttle, which may hold one back (see _admit)."""
        dma = self.context.dma  # type: ignore[union-attr]
        served = 0
        while True:
            chain = queue.pop(dma)
            if chain is None:
                break
            ticket = self._admit(queue, chain)
            if ticket is not None and not ticket.granted:
                self._held[queue.index] = (chain, ticket)
                break
            written = self._serve(queue, chain)
            queue.push(dma, chain, written)
            served += 1
        return served

    def _data_request(self, chain: DescriptorChain) -> tuple[int, int, int] | None:
        """``(kind, first sector, data bytes)`` of a well-formed read or write that can be served, or None
        (anything else is left to :meth:`_serve`, which reports it)."""
        if chain.writable_length < 1 or chain.readable_length < HEADER.size:
            return None
        kind, _reserved, sector = HEADER.unpack(chain.read(self.context.dma, 0, HEADER.size))  # type: ignore[union-attr]
        if kind == T_IN:
            length = chain.writable_length - 1
        elif kind == T_OUT and not self.backend.read_only:
            length = chain.readable_length - HEADER.size
        else:
            return None
        if length <= 0 or length % SECTOR or (sector + length // SECTOR) * SECTOR > self.backend.size():
            return None
        return kind, sector, length

    def _serve_merged(self, chains: list[DescriptorChain], index: int,
                      done: list[tuple[DescriptorChain, int]]) -> int:
        """Serve ``chains[index]`` and the reads (or writes) right behind it that continue where it ends as
        one host request; returns how many were served (0: nothing to merge, or the merged request failed
        and each is left to :meth:`_serve`, so every request still gets its own status)."""
        if index + 1 >= len(chains):
            return 0  # nothing behind it (a queue-depth-1 guest's every request)
        first = self._data_request(chains[index])
        if first is None:
            return 0
        kind, sector, length = first
        group = [chains[index]]
        end = sector + length // SECTOR
        total = length
        while index + len(group) < len(chains) and len(group) < MAX_MERGED_REQUESTS:
            following = self._data_request(chains[index + len(group)])
            if following is None or following[0] != kind or following[1] != end \
                    or total + following[2] > MAX_MERGED_BYTES:
                break
            group.append(chains[index + len(group)])
            end += following[2] // SECTOR
            total += following[2]
        if len(group) == 1:
            return 0
        dma = self.context.dma  # type: ignore[union-attr]
        views: list[memoryview] = []
        for chain in group:
            if kind == T_IN:
                views.extend(chain.views(dma, writable=True, length=chain.writable_length - 1))
            else:
                views.extend(chain.views(dma, writable=False, start=HEADER.size))
        data = ByteViews(views, total, writable=True)
        try:
            self._transfer(kind, sector * SECTOR, data)
        except BlockError:
            return 0  # served one by one instead, each with its own status
        for chain in group:
            written = chain.writable_length if kind == T_IN else 1
            chain.write(dma, bytes([S_OK]), chain.writable_length - 1, report=written < chain.writable_length)
            done.append((chain, written))
        self._requests_in_python += len(group)
        self._merged_in_python += len(group) - 1
        return len(group)

    def _admit(self, queue: Virtqueue, chain: DescriptorChain) -> Ticket | None:
        """Ask the drive's throttle about a request without blocking this I/O thread (which serves other
        devices too); None when the drive is not throttled or the request is not throttled (a flush, a
        malformed request: :meth:`_serve` refuses it). Write-zeroes count as writes of their length, as in
        QEMU (a guest cannot zero its way around a bps limit); discards only under a ``throttle`` filter
        node, whose QEMU driver counts them -- drive-level limits leave them alone (blk_co_pdiscard)."""
        if not self._throttles or self.backend.throttle_member() is None \
                or chain.readable_length < HEADER.size or chain.writable_length < 1:
            return None
        kind = HEADER.unpack(chain.read(self.context.dma, 0, HEADER.size))[0]  # type: ignore[union-attr]
        if kind == T_IN:
            nbytes, is_write = chain.writable_length - 1, False
        elif kind == T_OUT:
            nbytes, is_write = chain.readable_length - HEADER.size, True
        elif kind == T_WRITE_ZEROES or (kind == T_DISCARD and getattr(self.backend, "throttle", None) is None):
            feature = F_DISCARD if kind == T_DISCARD else F_WRITE_ZEROES
            if not self.context.driver_features & feature:  # type: ignore[union-attr]
                return None  # refused by _serve
            segments = self._segments(chain)
            if segments is None:
                return None
            nbytes, is_write = sum(count for _sector, count, _flags in segments) * SECTOR, True
        else:
            return None
        context, index = self.context, queue.index
        assert context is not None
        return self.backend.admit(is_write, nbytes, lambda: context.kick_queue(index))

    def reset(self) -> None:
        """Requests held by the throttle belong to the old queues: withdraw their tickets."""
        held, self._held = self._held, {}
        member = self.backend.throttle_member() if self._throttles else None
        for _chain, ticket in held.values():
            if member is not None:
                member.cancel(ticket)

    def _serve(self, queue: Virtqueue, chain: DescriptorChain) -> int:
        """Perform one request; returns the bytes written into the guest's buffers (data + status)."""
        dma = self.context.dma  # type: ignore[union-attr]
        writable = chain.writable_length
        if writable < 1:
            raise VirtqueueError(queue.index, f"block request {chain.head} has no status byte")
        if chain.readable_length < HEADER.size:
            raise VirtqueueError(queue.index, f"block request {chain.head} header is {chain.readable_length} bytes")
        kind, _reserved, sector = HEADER.unpack(chain.read(dma, 0, HEADER.size))
        self._requests_in_python += 1
        status, data_written = self._dispatch(queue, chain, kind, sector)
        # The push reports the first data_written + 1 bytes; the status byte is among them when it follows
        # the data directly (reads, and writes with a one-byte writable part: every request Linux makes).
        chain.write(dma, bytes([status]), writable - 1, report=data_written + 1 < writable)
        if status != S_OK:
            self.errors += 1
        return data_written + 1

    def _dispatch(self, queue: Virtqueue, chain: DescriptorChain, kind: int, sector: int) -> tuple[int, int]:
        dma = self.context.dma  # type: ignore[union-attr]
        backend = self.backend
        try:
            if kind == T_IN:
                length = chain.writable_length - 1
                if not self._in_range(sector, length):
                    return S_IOERR, 0
                self._transfer(T_IN, sector * SECTOR, chain.views(dma, writable=True, length=length))
                return S_OK, length
            if kind == T_OUT:
                length = chain.readable_length - HEADER.size
                if backend.read_only or not self._in_range(sector, length):
                    return S_IOERR, 0
                self._transfer(T_OUT, sector * SECTOR, chain.views(dma, writable=False, start=HEADER.size))
                return S_OK, 0
            if kind == T_FLUSH:
                backend.flush()
                return S_OK, 0
            if kind == T_GET_ID:
                if chain.writable_length - 1 < ID_BYTES:
                    return S_IOERR, 0
                chain.write(dma, self.config.serial.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0"))
                return S_OK, ID_BYTES
            if kind in (T_DISCARD, T_WRITE_ZEROES):
                return self._discard_or_zero(chain, kind), 0
        except BlockError as exc:
            code = getattr(exc, "errno", errno.EIO)
            log.log("guest_errors", f"virtio-blk {self.config.drive_id}: request type {kind} at sector "
                                    f"{sector}: {exc} (errno {code})")
            return S_IOERR, 0
        return S_UNSUPP, 0

    def _transfer(self, kind: int, offset: int, views: ByteViews) -> None:
        """The host side of a read (T_IN) or write (T_OUT). A throttled request was admitted by _admit
        (a test double takes no keyword)."""
        if kind == T_IN:
            if self._throttles:
                self.backend.preadv(offset, views, admitted=True)
            else:
                self.backend.preadv(offset, views)
        elif self._throttles:
            self.backend.pwritev(offset, views, admitted=True)
        else:
            self.backend.pwritev(offset, views)

    def _in_range(self, sector: int, length: int) -> bool:
        if length % SECTOR:
            log.log("guest_errors", f"virtio-blk {self.config.drive_id}: {length}-byte request is not whole sectors")
            return False
        if sector * SECTOR + length > self.backend.size():
            log.log("guest_errors", f"virtio-blk {self.config.drive_id}: sector {sector}+{length // SECTOR} "
                                    "is past the end of the disk")
            return False
        return True

    def _discard_or_zero(self, chain: DescriptorChain, kind: int) -> int:
        feature = F_DISCARD if kind == T_DISCARD else F_WRITE_ZEROES
        if not self.context.driver_features & feature or self.backend.read_only:  # type: ignore[union-attr]
            return S_UNSUPP if not self.backend.read_only else S_IOERR
        segments = self._segments(chain)
        if segments is None:
            return S_IOERR
        for sector, count, flags in segments:
            if count > MAX_DISCARD_SECTORS or not self._in_range(sector, count * SECTOR):
                return S_IOERR
            if kind == T_DISCARD:
                if flags:
                    return S_UNSUPP
                if self._throttles:  # admitted by _admit when throttled (a test double takes no keyword)
                    self.backend.discard(sector * SECTOR, count * SECTOR, admitted=True)
                else:
                    self.backend.discard(sector * SECTOR, count * SECTOR)
            else:
                if flags & ~WRITE_ZEROES_UNMAP:
                    return S_UNSUPP
                unmap = bool(flags & WRITE_ZEROES_UNMAP)
                if self._throttles:
                    self.backend.write_zeroes(sector * SECTOR, count * SECTOR, may_unmap=unmap, admitted=True)
                else:
                    self.backend.write_zeroes(sector * SECTOR, count * SECTOR, may_unmap=unmap)
        return S_OK

    def _segments(self, chain: DescriptorChain) -> list[tuple[int, int, int]] | None:
        """A discard / write-zeroes request's (sector, count, flags) segments; None when the payload is
        malformed. The size is checked before anything is copied: an indirect table can make the payload
        gigabytes long."""
        size = chain.readable_length - HEADER.size
        if size <= 0 or size % SEGMENT_STRUCT.size or size // SEGMENT_STRUCT.size > MAX_DISCARD_SEGMENTS:
            return None
        payload = chain.read(self.context.dma, HEADER.size, size)  # type: ignore[union-attr]
        return list(SEGMENT_STRUCT.iter_unpack(payload))

    def close(self) -> None:
        self.backend.close()
