"""A minimal virtio-mmio *driver* in Python, for testing device models without booting a guest.

It does what Linux's virtio_mmio + virtio_ring do, through the same register window a guest uses:
reset, ACKNOWLEDGE/DRIVER, feature negotiation, queue set-up in guest RAM, DRIVER_OK, then requests as
descriptor chains in a split ring, kicks through QueueNotify and completions read from the used ring.
Its rings live in a scratch area of guest RAM handed to it, so tests can also corrupt them on purpose.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from pyemu.hw.virtio import mmio as regs
from pyemu.hw.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from pyemu.hw.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE
from pyemu.system.bus import BusDevice
from pyemu.system.memory import GuestMemory


class DriverTimeout(AssertionError):
    """The device did not complete a request in time."""


@dataclass
class DriverQueue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    next_desc: int = 0
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)


class Allocator:
    """A bump allocator over a region of guest RAM."""

    def __init__(self, base: int, size: int) -> None:
        self.cursor = base
        self.end = base + size

    def take(self, size: int, align: int = 16) -> int:
        start = (self.cursor + align - 1) // align * align
        if start + size > self.end:
            raise MemoryError("test driver scratch area exhausted")
        self.cursor = start + size
        return start


class VirtioTestDriver:
    """Drives one transport (any object with ``read``/``write`` at window offsets)."""

    def __init__(self, window: BusDevice, memory: GuestMemory, scratch: int, scratch_size: int = 1 << 20) -> None:
        self.window = window
        self.memory = memory
        self.alloc = Allocator(scratch, scratch_size)
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0

    # -- registers ----------------------------------------------------------------------------------------
    def reg(self, offset: int) -> int:
        return self.window.read(offset, 4)

    def set_reg(self, offset: int, value: int) -> None:
        self.window.write(offset, 4, value)

    @property
    def status(self) -> int:
        return self.reg(regs.REG_STATUS)

    def device_features(self) -> int:
        self.set_reg(regs.REG_DEVICE_FEATURES_SEL, 0)
        low = self.reg(regs.REG_DEVICE_FEATURES)
        self.set_reg(regs.REG_DEVICE_FEATURES_SEL, 1)
        return low | self.reg(regs.REG_DEVICE_FEATURES) << 32

    def initialise(self, *, want: int | None = None, event_idx: bool = False, indirect: bool = True,
                   queues: dict[int, int] | None = None) -> int:
        """Reset and bring the device to DRIVER_OK with ``queues`` ({index: size}); returns the features."""
        self.set_reg(regs.REG_STATUS, 0)
        self.set_reg(regs.REG_STATUS, regs.STATUS_ACKNOWLEDGE)
        self.set_reg(regs.REG_STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER)
        offered = self.device_features()
        features = offered if want is None else offered & want
        features |= F_VERSION_1
        if not event_idx:
            features &= ~F_EVENT_IDX
        if not indirect:
            features &= ~F_INDIRECT_DESC
        for sel in (0, 1):
            self.set_reg(regs.REG_DRIVER_FEATURES_SEL, sel)
            self.set_reg(regs.REG_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        status = regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER | regs.STATUS_FEATURES_OK
        self.set_reg(regs.REG_STATUS, status)
        if not self.status & regs.STATUS_FEATURES_OK:
            raise AssertionError("device refused the features")
        self.features = features
        for index, size in (queues or {0: 16}).items():
            self.setup_queue(index, size)
        self.set_reg(regs.REG_STATUS, status | regs.STATUS_DRIVER_OK)
        return features

    def setup_queue(self, index: int, size: int) -> DriverQueue:
        self.set_reg(regs.REG_QUEUE_SEL, index)
        maximum = self.reg(regs.REG_QUEUE_NUM_MAX)
        if size > maximum:
            raise AssertionError(f"queue {index}: size {size} > max {maximum}")
        desc = self.alloc.take(16 * size, 16)
        avail = self.alloc.take(6 + 2 * size, 2)
        used = self.alloc.take(6 + 8 * size, 4)
        for addr, length in ((desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
            self.memory.fill(addr, length, 0)
        self.set_reg(regs.REG_QUEUE_NUM, size)
        for low, addr in ((regs.REG_QUEUE_DESC_LOW, desc), (regs.REG_QUEUE_DRIVER_LOW, avail),
                          (regs.REG_QUEUE_DEVICE_LOW, used)):
            self.set_reg(low, addr & 0xFFFFFFFF)
            self.set_reg(low + 4, addr >> 32)
        self.set_reg(regs.REG_QUEUE_READY, 1)
        queue = DriverQueue(index, size, desc, avail, used, free=list(range(size)))
        self.queues[index] = queue
        return queue

    # -- requests -----------------------------------------------------------------------------------------
    def buffer(self, data: bytes | int, align: int = 16) -> int:
        """A guest buffer holding ``data`` (or ``data`` zero bytes), starting at a multiple of ``align``."""
        size = data if isinstance(data, int) else len(data)
        addr = self.alloc.take(max(size, 1), align)
        if isinstance(data, int):
            self.memory.fill(addr, size, 0)
        else:
            self.memory.write(addr, data)
        return addr

    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.memory.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def submit(self, index: int, segments: list[tuple[int, int, bool]], *, indirect: bool = False,
               kick: bool = True) -> int:
        """Offer a chain of ``(gpa, length, writable)`` segments; returns the head descriptor."""
        queue = self.queues[index]
        if indirect:
            table = self.alloc.take(16 * len(segments), 16)
            for i, (addr, length, writable) in enumerate(segments):
                flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if i + 1 < len(segments) else 0)
                self.write_desc(table, i, addr, length, flags, i + 1 if i + 1 < len(segments) else 0)
            head = queue.free.pop(0)
            self.write_desc(queue.desc, head, table, 16 * len(segments), DESC_F_INDIRECT, 0)
        else:
            ids = [queue.free.pop(0) for _ in segments]
            for i, (addr, length, writable) in enumerate(segments):
                last = i + 1 == len(segments)
                flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
                self.write_desc(queue.desc, ids[i], addr, length, flags, 0 if last else ids[i + 1])
            head = ids[0]
        self.offer(index, head)
        if kick:
            self.kick(index)
        return head

    def offer(self, index: int, head: int) -> None:
        """Put ``head`` in the available ring and publish the new index."""
        queue = self.queues[index]
        self.memory.write_u16(queue.avail + 4 + 2 * (queue.avail_idx % queue.size), head)
        queue.avail_idx = (queue.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(queue.avail + 2, queue.avail_idx)

    def kick(self, index: int) -> None:
        self.set_reg(regs.REG_QUEUE_NOTIFY, index)

    def used(self, index: int) -> list[tuple[int, int]]:
        """Newly used ``(head, written)`` entries (descriptors are returned to the free list)."""
        queue = self.queues[index]
        result = []
        used_idx = self.memory.read_u16(queue.used + 2)
        while queue.last_used != used_idx:
            head, written = struct.unpack("<II", self.memory.read(queue.used + 4 + 8 * (queue.last_used % queue.size), 8))
            result.append((head, written))
            queue.last_used = (queue.last_used + 1) & 0xFFFF
            self._free_chain(queue, head)
        return result

    def _free_chain(self, queue: DriverQueue, head: int) -> None:
        index = head
        for _ in range(queue.size):
            if index in queue.free:
                return
            queue.free.append(index)
            _addr, _length, flags, nxt = struct.unpack("<QIHH", self.memory.read(queue.desc + 16 * index, 16))
            if not flags & DESC_F_NEXT:
                return
            index = nxt

    def wait_used(self, index: int, count: int = 1, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Wait until ``count`` more chains were used (polling: the device runs on its I/O thread)."""
        done: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(done) < count:
            done += self.used(index)
            if len(done) >= count:
                break
            if time.monotonic() > deadline:
                raise DriverTimeout(f"queue {index}: {len(done)} of {count} requests completed in {timeout} s "
                                    f"(status {self.status:#x})")
            time.sleep(0.0005)
        return done

    def ack_interrupt(self) -> int:
        status = self.reg(regs.REG_INTERRUPT_STATUS)
        self.set_reg(regs.REG_INTERRUPT_ACK, status)
        return status
