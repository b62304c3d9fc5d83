"""The virtio-mmio transport, version 2 ("modern"; virtio 1.x section 4.2): one 512-byte register
window per device, feature negotiation, the device status machine, queue set-up, notifications and the
interrupt.

Threads and locks -- why three:

* vCPU threads access the registers. The window is registered on the MMIO bus with its own lock
  (``own_lock``), so a register access never waits for the board's big lock, and never for disk I/O.
* The device's I/O thread serves the queues. A queue notification is an :class:`EventNotifier` per
  queue: under KVM the kernel signals it directly (an ioeventfd on QueueNotify, :meth:`queue_notifiers`),
  under the software CPU the register write sets it. The I/O thread processes a queue holding only that
  queue's lock.
* Interrupt status is a word that both sides change atomically (:mod:`pyemu.system.shared_word`; under
  the software CPU the guest's InterruptStatus reads and InterruptACK writes are served in C from it),
  and the interrupt counters have a small leaf lock of their own, so an I/O thread reporting a used buffer
  never waits for a vCPU's register access, and a reset (register lock, then each queue lock) cannot
  deadlock with it.

Guest mistakes -- a malformed ring, rings outside RAM, a bad request -- never escape: the device is
marked DEVICE_NEEDS_RESET, a configuration-change interrupt tells the driver (Linux then logs the
device as broken), the reason goes to ``-d guest_errors``, and every other device keeps running.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.core.irq import EdgeInterrupt
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.hw.intc.apic_core import NativeRoute, native_route
from pyemu.hw.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, TRANSPORT_FEATURES, VirtioDevice
from pyemu.hw.virtio.queue import Virtqueue
from pyemu.system import log
from pyemu.system.event_notifier import EventNotifier
from pyemu.system.iothread import IoThread
from pyemu.system.shared_word import SharedWord, shared_word

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU", as QEMU's and Firecracker's devices report
WINDOW_SIZE = 0x200

REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_CONFIG_GENERATION = 0x0FC
REG_CONFIG = 0x100

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2


@dataclass(frozen=True)
class VirtqueueState(DeviceState):
    VERSION = 1
    size: int = 0
    ready: bool = False
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    last_avail: int = 0
    used_idx: int = 0


@dataclass(frozen=True)
class VirtioMmioState(DeviceState):
    """The transport's registers and queue positions (a device type's own state is separate)."""

    VERSION = 1
    status: int = 0
    driver_features: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    queue_sel: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    broken: bool = False
    queues: tuple[VirtqueueState, ...] = ()


class VirtioMmio:
    """A virtio-mmio window carrying ``device``. ``interrupt`` is an edge per notification."""

    def __init__(self, device: VirtioDevice, dma: DmaMemory, interrupt: EdgeInterrupt, iothread: IoThread,
                 *, name: str = "virtio-mmio") -> None:
        self.device = device
        self.dma = dma
        self.name = name
        self._interrupt = interrupt
        self._iothread = iothread
        self._lock = threading.RLock()
        self._irq_lock = threading.Lock()
        self._status = shared_word()
        self.queues = [Virtqueue(i, size) for i, size in enumerate(device.queue_sizes)]
        self.notifiers = [EventNotifier(f"{name}-q{i}") for i in range(len(self.queues))]
        self.offered_features = device.device_features() | TRANSPORT_FEATURES
        self._clear_registers()
        self.config_generation = 0
        self.broken_reason: str | None = None
        self.interrupts = 0
        self._edge_target: Callable[[], tuple[object, int] | None] | None = getattr(
            interrupt, "edge_target", None)
        """Where the interrupt's edge lands now (a PulseInterrupt's), for :meth:`interrupt_route`."""
        self._route: NativeRoute | None = None
        self._route_tried = False
        device.bind(self)
        for index, notifier in enumerate(self.notifiers):
            iothread.add_reader(notifier, self._kick_handler(index), self.fail_from,
                                polled=device.kicks_worth_polling,
                                native=device.native_kick_handler(self.queues[index], notifier.fd))

    def _clear_registers(self) -> None:
        self.status = 0
        self._driver_features = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.interrupt_status = 0

    @property
    def interrupt_status(self) -> int:
        """InterruptStatus: set by the I/O threads, cleared by the guest's InterruptACK (atomically on both
        sides: under the software CPU the ACK may clear it in C, see :meth:`interrupt_status_word`)."""
        return self._status.load()

    @interrupt_status.setter
    def interrupt_status(self, value: int) -> None:
        self._status.store(value)

    def interrupt_status_word(self) -> tuple[int, SharedWord]:
        """``(offset of InterruptStatus, its word)``: an accelerator may serve reads of the register and
        writes of InterruptACK (the next word) from the word itself, as it binds ioeventfds."""
        return REG_INTERRUPT_STATUS, self._status

    # -- VirtioContext for the device ---------------------------------------------------------------------
    @property
    def driver_features(self) -> int:
        return self._driver_features

    def notify_queue(self, queue: Virtqueue) -> None:
        if queue.should_interrupt(self.dma):
            self._raise(INT_USED_BUFFER)

    def notify_config(self) -> None:
        with self._irq_lock:  # a leaf lock: callable from a queue handler (see the module docstring)
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._raise(INT_CONFIG_CHANGE)

    def kick_queue(self, index: int) -> None:
        self.notifiers[index].set()

    def _raise(self, bits: int) -> None:
        route = self._route
        if route is not None and bits == INT_USED_BUFFER:
            if route.post():  # status bit and IRR in C, as the pulse below would leave them
                self.interrupt_posted()
                return
        with self._irq_lock:
            self._status.set_bits(bits)
            self.interrupts += 1
        self._interrupt.trigger()
        if route is not None and route.stale and self._edge_target is not None:
            route.aim(self._edge_target())  # the pulse's route now, for the next post

    def interrupt_route(self) -> NativeRoute | None:
        """A route the device's C code may post its used-buffer interrupts through (virtio-blk's data plane),
        or None: the interrupt is not a pulse to an APIC the models can name, or the APIC core is Python's.
        Made at the first call; aimed again after any interrupt the models had to deliver."""
        if not self._route_tried:
            self._route_tried = True
            # Only with the status register in C memory, which the post sets as _raise does here.
            if self._edge_target is not None and self._status.address is not None:
                self._route = native_route(self._status.address, INT_USED_BUFFER)
                if self._route is not None:
                    self._route.aim(self._edge_target())
        return self._route

    def interrupt_posted(self) -> None:
        """A used-buffer interrupt went out through :meth:`interrupt_route` (C or :meth:`_raise`): count it
        and wake the vCPU it is for."""
        with self._irq_lock:
            self.interrupts += 1
        assert self._route is not None
        self._route.kick()

    def interrupts_kicked_elsewhere(self, count: int) -> None:
        with self._irq_lock:
            self.interrupts += count

    # -- failure ------------------------------------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Mark the device broken (DEVICE_NEEDS_RESET) and tell the driver; the VM runs on."""
        with self._irq_lock:
            first = self.broken_reason is None
            self.broken_reason = self.broken_reason or reason
        if first:
            self.device.stop_native_service()
            log.log("guest_errors", f"{self.name} ({self.device.name}): {reason}; device needs reset")
            if self.status & STATUS_DRIVER_OK:
                self.notify_config()

    def fail_from(self, exc: BaseException) -> None:
        self.fail(f"{type(exc).__name__}: {exc}")

    @property
    def broken(self) -> bool:
        return self.broken_reason is not None

    # -- queue service (I/O thread) -----------------------------------------------------------------------
    def queue_notifiers(self) -> list[tuple[int, int, EventNotifier]]:
        """``(offset in the window, value written, notifier)`` for each queue: what an accelerator binds
        as an ioeventfd so a notification never leaves the kernel."""
        return [(REG_QUEUE_NOTIFY, index, notifier) for index, notifier in enumerate(self.notifiers)]

    def _kick_handler(self, index: int):  # type: ignore[no-untyped-def]
        notifier = self.notifiers[index]

        def handle() -> None:
            notifier.test_and_clear()
            self.process(index)
        return handle

    def process(self, index: int) -> None:
        """Serve queue ``index`` (on the I/O thread)."""
        if self.broken or not self.status & STATUS_DRIVER_OK:
            return
        queue = self.queues[index]
        with queue.lock:
            if queue.ready:
                self.device.process_queue(queue)

    # -- registers (vCPU threads) -------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= REG_CONFIG:
            with self._lock:
                return self.device.read_config(offset - REG_CONFIG, size)
        if size != 4 or offset % 4:
            log.log("guest_errors", f"{self.name}: {size}-byte read at {offset:#x} (registers are 32-bit)")
            return 0
        with self._lock:
            return self._read_register(offset) & 0xFFFFFFFF

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == REG_MAGIC:
            return MAGIC
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            return self.offered_features >> (32 * self.device_features_sel) if self.device_features_sel < 2 else 0
        if offset == REG_QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == REG_QUEUE_READY:
            return int(queue.ready) if queue is not None else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status | (STATUS_DEVICE_NEEDS_RESET if self.broken else 0)
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        if queue is not None:
            for low, attr in ((REG_QUEUE_DESC_LOW, "desc_addr"), (REG_QUEUE_DRIVER_LOW, "avail_addr"),
                              (REG_QUEUE_DEVICE_LOW, "used_addr")):
                if offset in (low, low + 4):
                    return int(getattr(queue, attr)) >> (32 if offset == low + 4 else 0)
        if offset == REG_QUEUE_NUM:
            return queue.size if queue is not None else 0
        log.log("guest_errors", f"{self.name}: read of write-only or unknown register {offset:#x}")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= REG_CONFIG:
            with self._lock:
                self.device.write_config(offset - REG_CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            log.log("guest_errors", f"{self.name}: ignored {size}-byte write at {offset:#x}")
            return
        value &= 0xFFFFFFFF
        if offset == REG_QUEUE_NOTIFY:
            # The only hot register: no lock, one eventfd write (KVM does this in the kernel instead).
            if value < len(self.notifiers):
                self.notifiers[value].set()
            else:
                log.log("guest_errors", f"{self.name}: notify of nonexistent queue {value}")
            return
        if offset == REG_INTERRUPT_ACK:
            self._status.clear_bits(value)
            return
        with self._lock:
            self._write_register(offset, value)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            if self.status & STATUS_FEATURES_OK:
                log.log("guest_errors", f"{self.name}: driver features written after FEATURES_OK")
            elif self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                mask = 0xFFFFFFFF << shift
                self._driver_features = (self._driver_features & ~mask) | (value << shift)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_STATUS:
            self._write_status(value)
        elif offset in (REG_QUEUE_NUM, REG_QUEUE_READY, REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH,
                        REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH):
            self._write_queue_register(offset, value)
        elif offset == REG_SHM_SEL:
            pass
        else:
            log.log("guest_errors", f"{self.name}: write to read-only or unknown register {offset:#x}")

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            log.log("guest_errors", f"{self.name}: queue register {offset:#x} with nonexistent queue {self.queue_sel}")
            return
        if offset == REG_QUEUE_READY:
            if value & 1:
                self._enable_queue(queue)
            else:
                with queue.lock:
                    queue.ready = False
            return
        if queue.ready:
            log.log("guest_errors", f"{self.name}: queue {queue.index} register {offset:#x} written while ready")
            return
        if offset == REG_QUEUE_NUM:
            queue.size = value
            return
        for low, attr in ((REG_QUEUE_DESC_LOW, "desc_addr"), (REG_QUEUE_DRIVER_LOW, "avail_addr"),
                          (REG_QUEUE_DEVICE_LOW, "used_addr")):
            if offset in (low, low + 4):
                old = int(getattr(queue, attr))
                shift = 32 if offset == low + 4 else 0
                setattr(queue, attr, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _enable_queue(self, queue: Virtqueue) -> None:
        problem = queue.ring_problem(self.dma)
        if problem is not None:
            self.fail(f"queue {queue.index}: {problem}")
            return
        with queue.lock:
            queue.activate(event_idx=bool(self._driver_features & F_EVENT_IDX),
                           indirect=bool(self._driver_features & F_INDIRECT_DESC))

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= 0xFF & ~STATUS_DEVICE_NEEDS_RESET
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            unknown = self._driver_features & ~self.offered_features
            if unknown or not self._driver_features & F_VERSION_1:
                why = (f"unoffered bits {unknown:#x}" if unknown else "no VIRTIO_F_VERSION_1 (legacy drivers "
                       "are not supported)")
                log.log("guest_errors", f"{self.name}: features {self._driver_features:#x} refused: {why}")
                value &= ~STATUS_FEATURES_OK
        was_ok = self.status & STATUS_DRIVER_OK
        if was_ok and not value & STATUS_DRIVER_OK:
            self.device.stop_native_service()  # process() serves nothing now; nor may C
        self.status = value
        if value & STATUS_DRIVER_OK and not was_ok:
            self.device.activate(self.queues)
            for index, queue in enumerate(self.queues):
                if queue.ready:
                    self.notifiers[index].set()  # buffers made available before DRIVER_OK

    def reset(self) -> None:
        """Driver reset (status 0) or machine reset: registers, queues and the device start over. Waits
        for a queue the I/O thread is serving, so no request completes into a reset queue."""
        with self._lock:
            self._clear_registers()
            for queue in self.queues:
                with queue.lock:
                    queue.reset()
            with self._irq_lock:
                self.interrupt_status = 0
                self.broken_reason = None
            self.device.reset()

    # -- state --------------------------------------------------------------------------------------------
    def state(self) -> VirtioMmioState:
        with self._lock:
            return VirtioMmioState(
                status=self.status, driver_features=self._driver_features,
                device_features_sel=self.device_features_sel, driver_features_sel=self.driver_features_sel,
                queue_sel=self.queue_sel, interrupt_status=self.interrupt_status,
                config_generation=self.config_generation, broken=self.broken,
                queues=tuple(self._queue_state(q) for q in self.queues))

    @staticmethod
    def _queue_state(q: Virtqueue) -> VirtqueueState:
        with q.lock:  # its indices are right only under the lock (a C lease folds in there)
            return VirtqueueState(size=q.size, ready=q.ready, desc_addr=q.desc_addr, avail_addr=q.avail_addr,
                                  used_addr=q.used_addr, last_avail=q.last_avail, used_idx=q.used_idx)

    def from_state(self, state: DeviceState) -> None:
        saved = check_state(self.name, state, VirtioMmioState)
        if len(saved.queues) != len(self.queues):
            raise StateError(self.name, f"{len(saved.queues)} queues saved, the device has {len(self.queues)}")
        check_range(self.name, "status", saved.status, 0, 0xFF)
        check_range(self.name, "interrupt_status", saved.interrupt_status, 0, 3)
        check_range(self.name, "driver_features", saved.driver_features, 0, (1 << 64) - 1)
        if saved.driver_features & ~self.offered_features:
            raise StateError(self.name, "saved driver features include bits this device does not offer")
        for q, s in zip(self.queues, saved.queues):
            check_state(self.name, s, VirtqueueState)
            check_range(self.name, f"queue {q.index} size", s.size, 0, q.max_size)
            for field in ("last_avail", "used_idx"):
                check_range(self.name, f"queue {q.index} {field}", getattr(s, field), 0, 0xFFFF)
            for field in ("desc_addr", "avail_addr", "used_addr"):
                check_range(self.name, f"queue {q.index} {field}", getattr(s, field), 0, (1 << 64) - 1)
            if s.ready:
                probe = Virtqueue(q.index, q.max_size)
                probe.size, probe.desc_addr, probe.avail_addr, probe.used_addr = (
                    s.size, s.desc_addr, s.avail_addr, s.used_addr)
                problem = probe.ring_problem(self.dma)
                if problem is not None:
                    raise StateError(self.name, f"queue {q.index}: {problem}")
        with self._lock:
            self.status, self._driver_features = saved.status, saved.driver_features
            self.device_features_sel, self.driver_features_sel = saved.device_features_sel, saved.driver_features_sel
            self.queue_sel, self.config_generation = saved.queue_sel, saved.config_generation
            with self._irq_lock:
                self.interrupt_status = saved.interrupt_status
                self.broken_reason = "restored as broken" if saved.broken else None
            for q, s in zip(self.queues, saved.queues):
                with q.lock:
                    q.reset()
                    q.size, q.desc_addr, q.avail_addr, q.used_addr = s.size, s.desc_addr, s.avail_addr, s.used_addr
                    if s.ready:
                        q.activate(event_idx=bool(saved.driver_features & F_EVENT_IDX),
                                   indirect=bool(saved.driver_features & F_INDIRECT_DESC))
                        q.last_avail, q.used_idx = s.last_avail, s.used_idx
            if self.status & STATUS_DRIVER_OK:
                self.device.activate(self.queues)

    def close(self) -> None:
        """The device first: its backends (chardev threads, sockets) may still kick a queue notifier."""
        self.device.close()
        for notifier in self.notifiers:
            self._iothread.remove_reader(notifier)
            notifier.close()
