"""What a virtio device type implements, apart from the transport.

A device type (block, entropy, console, network, vsock) states its device ID, its feature bits, its
queue sizes and its configuration space, and processes its queues. It never sees registers: the
transport (:mod:`pyemu.hw.virtio.mmio`) negotiates features, sets the queues up and calls
:meth:`VirtioDevice.process_queue` on the device's I/O thread when the driver notifies a queue. A device
reports a used buffer through ``VirtioContext.notify_queue`` and a configuration change through
``VirtioContext.notify_config``; it raises :class:`~pyemu.hw.virtio.errors.VirtqueueError` (or
``DeviceBroken``) for guest mistakes, which the transport turns into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio.queue import Virtqueue
from pyemu.system.iothread_wait import NativeHandler

# Transport-independent feature bits (virtio 1.x section 6).
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1

# Device IDs (virtio 1.x section 5).
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_RNG = 4
ID_VSOCK = 19


class VirtioContext(Protocol):
    """What the transport offers the device it carries."""

    dma: DmaMemory

    def notify_queue(self, queue: Virtqueue) -> None:
        """Used buffers were pushed: interrupt the driver if it wants one."""
        ...

    def notify_config(self) -> None:
        """The configuration space changed: config-change interrupt (and new config generation)."""
        ...

    def kick_queue(self, index: int) -> None:
        """Process queue ``index`` again soon on the device's I/O thread (e.g. host data arrived)."""
        ...

    def interrupt_route(self) -> Any:
        """A :class:`~pyemu.hw.intc.apic_core.NativeRoute` C code may post used-buffer interrupts through,
        or None."""
        ...

    def interrupt_posted(self) -> None:
        """C code posted a used-buffer interrupt through :meth:`interrupt_route`: count it, wake the vCPU."""
        ...

    def interrupts_kicked_elsewhere(self, count: int) -> None:
        """C code posted ``count`` used-buffer interrupts through :meth:`interrupt_route` and woke the vCPU
        itself: count them."""
        ...

    @property
    def driver_features(self) -> int: ...


class VirtioDevice:
    """Base class with defaults; a device type overrides what it needs."""

    device_id: int = 0
    name: str = "virtio"
    kicks_worth_polling: bool = False
    """Whether its I/O thread should spin for this device's next kick
    (:meth:`pyemu.system.iothread.IoThread.add_reader`'s ``polled``): true for a device whose guest waits
    for each request to complete and whose host side is the I/O thread's own work (virtio-blk). Not for
    one whose host side is another process that needs the CPU a spinning thread would take (a network
    peer over TAP: TCP throughput fell by a quarter to a third when kicks and TAP reads were polled,
    2026-12-07)."""

    def __init__(self, queue_sizes: tuple[int, ...]) -> None:
        self.queue_sizes = queue_sizes
        self.context: VirtioContext | None = None

    # -- description ------------------------------------------------------------------------------------
    def device_features(self) -> int:
        """Device-specific feature bits (the transport adds VERSION_1, INDIRECT_DESC, EVENT_IDX)."""
        return 0

    def config_bytes(self) -> bytes:
        """The device-specific configuration space, little-endian as the driver reads it."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Driver writes to the configuration space; read-only by default (writes ignored)."""

    # -- life cycle -------------------------------------------------------------------------------------
    def bind(self, context: VirtioContext) -> None:
        self.context = context

    def activate(self, queues: list[Virtqueue]) -> None:
        """DRIVER_OK: features are final and the queues are set up."""
        self.queues = queues

    def reset(self) -> None:
        """The driver (or the machine) reset the device: drop in-flight state."""

    def process_queue(self, queue: Virtqueue) -> None:
        """On the I/O thread, holding ``queue.lock``: serve what the driver made available."""

    def native_kick_handler(self, queue: Virtqueue, notifier_fd: int) -> NativeHandler | None:
        """C code the I/O thread's wait may offer ``queue``'s kicks to before this device's Python
        (:meth:`pyemu.system.iothread.IoThread.add_reader`'s ``native``), or None (the default). A device
        that gives one keeps the queue's indices right under ``queue.lock``
        (:class:`~pyemu.hw.virtio.queue.QueueLock`'s ``settle``)."""
        return None

    def stop_native_service(self) -> None:
        """The device broke or stopped: C code given by :meth:`native_kick_handler` must serve no more."""

    def close(self) -> None:
        """Release host resources (files, sockets)."""


def pack_config(fmt: str, *values: int) -> bytes:
    """``struct.pack`` in little-endian, for configuration spaces."""
    return struct.pack("<" + fmt, *values)
