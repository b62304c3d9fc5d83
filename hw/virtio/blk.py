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
from pyemu.block.throttle import Ticket
from pyemu.hw.virtio.device import ID_BLOCK, VirtioDevice, pack_config
from pyemu.hw.virtio.errors import VirtqueueError
from pyemu.hw.virtio.queue import DescriptorChain, Virtqueue
from pyemu.system import log

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

    def __init__(self, backend: BlockBackend, config: BlkConfig) -> None:
        super().__init__(tuple([config.queue_size] * config.num_queues))
        self.backend = backend
        self.config = config
        self.requests = 0
        self.errors = 0
        # A request the drive's throttle holds back, per queue: it is served when its ticket is granted
        # (the timer kicks the queue); the requests behind it stay in the guest's ring, in order.
        self._held: dict[int, tuple[DescriptorChain, Ticket]] = {}
        # A backend without throttling support (a test double) is served without admission.
        self._throttles = hasattr(backend, "admit")
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

    # -- requests ---------------------------------------------------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
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
        if served:
            self.context.notify_queue(queue)

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
        self.requests += 1
        status, data_written = self._dispatch(queue, chain, kind, sector)
        chain.write(dma, bytes([status]), writable - 1)
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
                views = chain.views(dma, writable=True, length=length)
                if self._throttles:
                    backend.preadv(sector * SECTOR, views, admitted=True)
                else:
                    backend.preadv(sector * SECTOR, views)
                return S_OK, length
            if kind == T_OUT:
                length = chain.readable_length - HEADER.size
                if backend.read_only or not self._in_range(sector, length):
                    return S_IOERR, 0
                data = chain.views(dma, writable=False, start=HEADER.size)
                if self._throttles:
                    backend.pwritev(sector * SECTOR, data, admitted=True)
                else:
                    backend.pwritev(sector * SECTOR, data)
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
