"""virtio-console (virtio 1.x section 5.3) with VIRTIO_CONSOLE_F_MULTIPORT: QEMU's ``virtio-serial-device``
and the ports on its bus (``virtconsole``, ``virtserialport``).

Why multiport, as QEMU does, rather than the single-port legacy layout: it is how Linux learns which
port is a console (``/dev/hvc0``), what a port is called (``/dev/virtio-ports/NAME``) and whether the
host side is open; and it lets one device carry a console plus named channels (guest agents).

Queues: port 0 receive/transmit are 0 and 1 (backward compatible with single-port drivers), the
control receive/transmit queues are 2 and 3, port ``n >= 1`` uses ``2n + 2`` and ``2n + 3``. The
handshake Linux runs, and what this device answers:

====================================  ==================================================================
driver -> device                      device -> driver
====================================  ==================================================================
DEVICE_READY(1)                       PORT_ADD(n) for every port
PORT_READY(n, 1)                      CONSOLE_PORT(n) if a console, PORT_NAME(n, name) if named,
                                      PORT_OPEN(n, 1) if the host side is open
PORT_OPEN(n, 0|1)                     (the guest opened/closed the port: input may flow)
====================================  ==================================================================

Device-to-driver control messages wait in a bounded host-side queue until the driver posts receive
buffers on the control queue; QEMU drops them instead, which a guest that posts late would never
recover from.

Input (host to guest) follows the character backends' flow-control contract: the backend is attached
with this device's own lock (never the machine's big lock), asks :meth:`ConsolePort.can_receive` how
much fits -- the free space of receive buffers the guest has posted, and nothing while the guest has not
opened the port -- and keeps the rest until the port calls the room notifier. Nothing typed is lost
and nothing is buffered without bound. Receive buffers are popped from the ring as soon as the guest
posts them and kept in order, so the space is known without touching the ring from the backend's
thread; ``receive`` only stages the bytes and kicks the queue, and the I/O thread fills the buffers.

Locks: a queue handler holds its queue's lock and takes :attr:`VirtioSerial.lock` inside it; a backend
thread takes only :attr:`VirtioSerial.lock`; work for another queue is handed over with ``kick_queue``
(an eventfd write), so no thread ever holds two queue locks or waits for a queue lock while holding the
device lock.

Guest mistakes -- a control message shorter than its 8-byte header, a control receive buffer too small
for one, a receive buffer the device cannot write into -- raise VirtqueueError: the transport marks the
device DEVICE_NEEDS_RESET and the VM runs on. Messages QEMU tolerates (unknown port ids or events, a
driver reporting failure) are logged under ``-d guest_errors`` and ignored.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol

from pyemu.chardev.base import MachineLock
from pyemu.errors import ConfigError
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio.device import ID_CONSOLE, VirtioDevice, pack_config
from pyemu.hw.virtio.errors import VirtqueueError
from pyemu.hw.virtio.queue import DescriptorChain, Virtqueue
from pyemu.system import log

F_SIZE = 1 << 0
F_MULTIPORT = 1 << 1
F_EMERG_WRITE = 1 << 2

DATA_QUEUE_SIZE = 128  # QEMU's sizes
CONTROL_QUEUE_SIZE = 32
DEFAULT_MAX_PORTS = 31
MAX_PORTS_LIMIT = 511  # QEMU: VIRTIO_QUEUE_MAX / 2 - 1
BAD_ID = 0xFFFFFFFF

CONTROL_RX_QUEUE = 2
CONTROL_TX_QUEUE = 3

# Control events (virtio 1.x 5.3.6.2; Linux's names in parentheses).
DEVICE_READY = 0
DEVICE_ADD = 1  # (PORT_ADD)
DEVICE_REMOVE = 2  # (PORT_REMOVE)
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7
EVENT_NAMES = {DEVICE_READY: "DEVICE_READY", DEVICE_ADD: "DEVICE_ADD", DEVICE_REMOVE: "DEVICE_REMOVE",
               PORT_READY: "PORT_READY", CONSOLE_PORT: "CONSOLE_PORT", RESIZE: "RESIZE", PORT_OPEN: "PORT_OPEN",
               PORT_NAME: "PORT_NAME"}

CONTROL = struct.Struct("<IHH")  # struct virtio_console_control: id, event, value
#: Device-to-driver control messages held while the driver posts no control buffers. Legitimate traffic
#: is a few messages per port; the bound only stops a driver that loops on DEVICE_READY from growing it.
MAX_PENDING_CONTROL = 4096
#: Guest output is copied to the backend in pieces of this size (a guest descriptor may be huge).
TX_CHUNK = 1 << 16
MAX_NAME_BYTES = 1024


def rx_queue_index(nr: int) -> int:
    """The receive (host to guest) queue of port ``nr``."""
    return 0 if nr == 0 else 2 * nr + 2


def tx_queue_index(nr: int) -> int:
    """The transmit (guest to host) queue of port ``nr``."""
    return rx_queue_index(nr) + 1


def control_message(port_id: int, event: int, value: int, payload: bytes = b"") -> bytes:
    return CONTROL.pack(port_id & 0xFFFFFFFF, event, value) + payload


class HostBackend(Protocol):
    """What a port needs from a character backend (:class:`pyemu.chardev.base.CharBackend`)."""

    def write(self, data: bytes) -> None: ...

    def attach(self, frontend: "ConsolePort", lock: MachineLock) -> None: ...

    def detach(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SerialConfig:
    """``-device virtio-serial-device[,max_ports=N][,emergency-write=on|off]``."""

    max_ports: int = DEFAULT_MAX_PORTS
    emergency_write: bool = True

    def __post_init__(self) -> None:
        if self.max_ports < 1:
            raise ConfigError("-device virtio-serial-device: Maximum number of serial ports not specified",
                              option="-device")
        if self.max_ports > MAX_PORTS_LIMIT:
            raise ConfigError(f"-device virtio-serial-device: maximum ports supported: {MAX_PORTS_LIMIT}",
                              option="-device")


class ConsolePort:
    """One port on the bus: QEMU's ``virtconsole`` (``console=True``) or ``virtserialport``.

    The character-backend frontend (``can_receive``/``receive``/``set_rx_space_notifier``) is called
    holding the owning device's lock, which :meth:`VirtioSerial.add_port` hands to ``backend.attach``.
    ``nr`` None means "choose one" (QEMU's rule: the first console gets port 0, others the lowest free
    number from 1).
    """

    def __init__(self, backend: HostBackend | None, *, console: bool, nr: int | None = None,
                 name: str | None = None, label: str = "") -> None:
        if name is not None and len(name.encode()) > MAX_NAME_BYTES:
            raise ConfigError(f"-device: port name is longer than {MAX_NAME_BYTES} bytes", option="-device")
        self.backend = backend
        self.console = console
        self.nr = nr
        self.name = name
        self.label = label or ("virtconsole" if console else "virtserialport")
        # A console's host side is always open (QEMU: output goes wherever the chardev sends it); a
        # serial port's is open when it has a backend.
        self.host_connected = console or backend is not None
        self.device: VirtioSerial | None = None
        self._room_notifier: Callable[[], None] | None = None
        # Input taken from the backend and not yet in a guest buffer. It survives a device reset (the
        # backend already let go of it), and reaches the driver once it opens the port again.
        self.rx_pending = bytearray()
        self.bytes_to_guest = 0
        self.bytes_from_guest = 0
        self._clear_guest_state()

    def _clear_guest_state(self) -> None:
        """What the driver told us or gave us; gone on a device reset (the buffers are the driver's)."""
        self.guest_ready = False
        self.guest_connected = False
        self.rx_chains: deque[DescriptorChain] = deque()
        self.rx_space = 0

    # -- the character-backend frontend (called holding the device lock) ---------------------------------
    def can_receive(self) -> int:
        device = self.device
        if device is None or not device.active or not self.guest_connected:
            return 0
        return max(0, self.rx_space - len(self.rx_pending))

    def receive(self, data: bytes) -> None:
        device = self.device
        if device is None or not data:
            return
        self.rx_pending += data
        device.kick(rx_queue_index(self.nr or 0))

    def set_rx_space_notifier(self, callback: Callable[[], None] | None) -> None:
        self._room_notifier = callback

    def notify_room(self) -> None:
        """Input can flow again (buffers posted, port opened). Never blocks: a wake-pipe write."""
        notifier = self._room_notifier
        if notifier is not None:
            notifier()

    # -- output -----------------------------------------------------------------------------------------
    def write_to_host(self, data: bytes) -> None:
        self.bytes_from_guest += len(data)
        if self.backend is not None and data:
            self.backend.write(data)

    def close(self) -> None:
        """Release the backend (idempotent; the device and the board may both call it)."""
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()

    def __repr__(self) -> str:
        return f"<ConsolePort {self.label} nr={self.nr} console={self.console} name={self.name!r}>"


class VirtioSerial(VirtioDevice):
    """The virtio-serial device: its ports, the control protocol and the data queues."""

    device_id = ID_CONSOLE
    name = "virtio-serial"

    def __init__(self, config: SerialConfig = SerialConfig()) -> None:
        super().__init__(tuple(CONTROL_QUEUE_SIZE if index in (CONTROL_RX_QUEUE, CONTROL_TX_QUEUE)
                               else DATA_QUEUE_SIZE for index in range(2 * (config.max_ports + 1))))
        self.config = config
        self.lock = threading.Lock()
        self.ports: dict[int, ConsolePort] = {}
        self._queue_ports: dict[int, tuple[int, bool]] = {}  # queue index -> (port nr, is rx)
        self.control_out: deque[bytes] = deque()
        self.control_dropped = 0
        self.active = False
        self.multiport = False
        self.device_ready = False
        self.queues: list[Virtqueue] = []

    # -- ports ------------------------------------------------------------------------------------------
    def add_port(self, port: ConsolePort) -> ConsolePort:
        """Plug ``port`` (before or after the driver started) and attach its backend with this device's
        lock. Errors are QEMU's, as ConfigError."""
        def error(message: str) -> ConfigError:
            return ConfigError(f"-device {port.label}: {message}", option="-device")

        with self.lock:
            if port.nr is not None and port.nr in self.ports:
                raise error(f"virtio-serial-bus: A port already exists at id {port.nr}")
            if port.name is not None and any(p.name == port.name for p in self.ports.values()):
                raise error(f"virtio-serial-bus: A port already exists by name {port.name}")
            nr = port.nr
            if nr is None:
                if port.console and 0 not in self.ports:
                    nr = 0
                else:
                    nr = next((n for n in range(1, self.config.max_ports) if n not in self.ports), None)
                    if nr is None:
                        raise error("virtio-serial-bus: Maximum port limit for this device reached")
            if nr >= self.config.max_ports:
                raise error(f"virtio-serial-bus: Out-of-range port id specified, max. allowed: "
                            f"{self.config.max_ports - 1}")
            if nr == 0 and not port.console:
                raise error("Port number 0 on virtio-serial devices reserved for virtconsole devices for "
                            "backward compatibility.")
            port.nr = nr
            port.device = self
            self.ports[nr] = port
            self._queue_ports[rx_queue_index(nr)] = (nr, True)
            self._queue_ports[tx_queue_index(nr)] = (nr, False)
            if self.active and self.multiport and self.device_ready:
                self._send_control(nr, DEVICE_ADD, 1)  # hot-plug after the handshake
        if port.backend is not None:
            port.backend.attach(port, self.lock)
        return port

    def remove_port(self, port: ConsolePort) -> None:
        """Unplug ``port`` (undoing a failed plug; the driver is told if it had been)."""
        if port.backend is not None:
            port.backend.detach()
        with self.lock:
            if port.nr is None or self.ports.get(port.nr) is not port:
                return
            del self.ports[port.nr]
            self._queue_ports.pop(rx_queue_index(port.nr), None)
            self._queue_ports.pop(tx_queue_index(port.nr), None)
            if self.active and self.multiport and self.device_ready:
                self._send_control(port.nr, DEVICE_REMOVE, 1)
            port.device = None

    def port(self, nr: int) -> ConsolePort | None:
        return self.ports.get(nr)

    # -- description ------------------------------------------------------------------------------------
    def device_features(self) -> int:
        features = 0
        if self.config.max_ports > 1:
            features |= F_MULTIPORT  # as QEMU: a single-port device looks like a legacy console
        if self.config.emergency_write:
            features |= F_EMERG_WRITE
        return features

    def config_bytes(self) -> bytes:
        # cols, rows (no F_SIZE: the guest keeps its own idea of the window size), max_nr_ports, emerg_wr.
        return pack_config("HHII", 0, 0, self.config.max_ports, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """``emerg_wr`` (offset 8): one byte to the first open console, before any queue works -- how a
        driver prints when it cannot use the rings (QEMU's set_config)."""
        if offset != 8 or not self.config.emergency_write or not value & 0xFF:
            return
        with self.lock:
            target = next((p for _, p in sorted(self.ports.items()) if p.console and p.host_connected), None)
        if target is not None:
            target.write_to_host(bytes([value & 0xFF]))

    # -- life cycle (transport) ------------------------------------------------------------------------
    def activate(self, queues: list[Virtqueue]) -> None:
        assert self.context is not None
        with self.lock:
            self.queues = queues
            self.multiport = bool(self.context.driver_features & F_MULTIPORT)
            self.active = True
            if not self.multiport:
                # A single-port driver cannot say it opened the port: port 0 is the console and open
                # as soon as the driver is up (QEMU does the same).
                port0 = self.ports.get(0)
                if port0 is not None:
                    port0.guest_ready = True
                    port0.guest_connected = True

    def reset(self) -> None:
        with self.lock:
            self.active = False
            self.multiport = False
            self.device_ready = False
            self.control_out.clear()
            for port in self.ports.values():
                port._clear_guest_state()

    def kick(self, index: int) -> None:
        """Have queue ``index`` processed on the I/O thread (safe under the device lock)."""
        context = self.context
        if context is not None and self.active:
            context.kick_queue(index)

    def close(self) -> None:
        for port in list(self.ports.values()):
            port.close()

    # -- queues (I/O thread, holding queue.lock) ----------------------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
        index = queue.index
        if index == CONTROL_RX_QUEUE:
            self._flush_control(queue)
        elif index == CONTROL_TX_QUEUE:
            self._handle_control(queue)
        else:
            target = self._queue_ports.get(index)
            if target is None:
                if index % 2:
                    self._discard_output(queue)  # output on a port that does not exist (QEMU discards)
                return  # receive buffers for a port that does not exist stay with the driver
            nr, is_rx = target
            if is_rx:
                self._fill_rx(nr, queue)
            else:
                self._drain_tx(nr, queue)

    def _dma(self) -> DmaMemory:
        assert self.context is not None
        return self.context.dma

    def _fill_rx(self, nr: int, queue: Virtqueue) -> None:
        dma = self._dma()
        room = False
        with self.lock:
            port = self.ports.get(nr)
            if port is None:
                return  # unplugged meanwhile
            while True:
                chain = queue.pop(dma)
                if chain is None:
                    break
                if chain.writable_length == 0:
                    raise VirtqueueError(queue.index, f"receive buffer {chain.head} of port {nr} has no "
                                                      "device-writable bytes")
                port.rx_chains.append(chain)
                port.rx_space += chain.writable_length
                room = True
            served = 0
            while port.rx_pending and port.rx_chains:
                chain = port.rx_chains.popleft()
                size = chain.writable_length
                count = min(size, len(port.rx_pending))
                chain.write(dma, bytes(port.rx_pending[:count]))
                queue.push(dma, chain, count)
                del port.rx_pending[:count]
                port.rx_space -= size
                port.bytes_to_guest += count
                served += 1
        if served:
            self.context.notify_queue(queue)  # type: ignore[union-attr]
        if room:
            port.notify_room()

    def _drain_tx(self, nr: int, queue: Virtqueue) -> None:
        dma = self._dma()
        port = self.ports.get(nr)
        if port is None:
            self._discard_output(queue)
            return
        served = 0
        while True:
            chain = queue.pop(dma)
            if chain is None:
                break
            for view in chain.views(dma, writable=False):
                for start in range(0, len(view), TX_CHUNK):
                    port.write_to_host(bytes(view[start : start + TX_CHUNK]))
            queue.push(dma, chain, 0)
            served += 1
        if served:
            self.context.notify_queue(queue)  # type: ignore[union-attr]

    def _discard_output(self, queue: Virtqueue) -> None:
        dma = self._dma()
        served = 0
        while True:
            chain = queue.pop(dma)
            if chain is None:
                break
            queue.push(dma, chain, 0)
            served += 1
        if served:
            log.log("guest_errors", f"{self.name}: {served} output buffers on queue {queue.index}, which "
                                    "belongs to no port; discarded")
            self.context.notify_queue(queue)  # type: ignore[union-attr]

    # -- control queues ---------------------------------------------------------------------------------
    def _handle_control(self, queue: Virtqueue) -> None:
        """Driver-to-device control messages (c_ovq)."""
        dma = self._dma()
        served = 0
        try:
            while True:
                chain = queue.pop(dma)
                if chain is None:
                    break
                if chain.readable_length < CONTROL.size:
                    raise VirtqueueError(queue.index, f"control message {chain.head} is {chain.readable_length} "
                                                      f"bytes, shorter than its {CONTROL.size}-byte header")
                port_id, event, value = CONTROL.unpack(chain.read(dma, 0, CONTROL.size))
                queue.push(dma, chain, 0)
                served += 1
                with self.lock:
                    self._control_event(port_id, event, value)
        finally:
            if served:
                self.context.notify_queue(queue)  # type: ignore[union-attr]

    def _control_event(self, port_id: int, event: int, value: int) -> None:
        """One driver message (holding the device lock)."""
        what = EVENT_NAMES.get(event, f"event {event}")
        if event == DEVICE_READY:
            if not value:
                log.log("guest_errors", f"{self.name}: the driver failed to initialise the device")
                return
            self.device_ready = True
            for nr in sorted(self.ports):
                self._send_control(nr, DEVICE_ADD, 1)
            return
        port = self.ports.get(port_id)
        if port is None:
            log.log("guest_errors", f"{self.name}: {what} for unknown port id {port_id}; ignored")
            return
        if event == PORT_READY:
            if not value:
                log.log("guest_errors", f"{self.name}: the driver failed to add port {port_id}")
                return
            port.guest_ready = True
            if port.console:
                self._send_control(port_id, CONSOLE_PORT, 1)
            if port.name is not None:
                self._send_control(port_id, PORT_NAME, 1, port.name.encode() + b"\0")
            if port.host_connected:
                self._send_control(port_id, PORT_OPEN, 1)
        elif event == PORT_OPEN:
            was = port.guest_connected
            port.guest_connected = bool(value)
            if port.guest_connected and not was:
                self.kick(rx_queue_index(port_id))  # deliver staged input, then tell the backend
                port.notify_room()
        else:
            log.log("guest_errors", f"{self.name}: unexpected {what} from the driver for port {port_id}; ignored")

    def _send_control(self, port_id: int, event: int, value: int, payload: bytes = b"") -> None:
        """Queue a device-to-driver message and have the control receive queue served (device lock held)."""
        if len(self.control_out) >= MAX_PENDING_CONTROL:
            self.control_dropped += 1
            log.log("guest_errors", f"{self.name}: the driver posts no control buffers; "
                                    f"{EVENT_NAMES.get(event, event)} for port {port_id} dropped")
            return
        self.control_out.append(control_message(port_id, event, value, payload))
        self.kick(CONTROL_RX_QUEUE)

    def _flush_control(self, queue: Virtqueue) -> None:
        """Device-to-driver control messages into the driver's control buffers (c_ivq)."""
        dma = self._dma()
        served = 0
        try:
            with self.lock:
                while self.control_out:
                    chain = queue.pop(dma)
                    if chain is None:
                        break
                    if chain.writable_length < CONTROL.size:
                        raise VirtqueueError(queue.index, f"control buffer {chain.head} holds "
                                                          f"{chain.writable_length} bytes, less than a "
                                                          f"{CONTROL.size}-byte message")
                    message = self.control_out.popleft()
                    if len(message) > chain.writable_length:
                        log.log("guest_errors", f"{self.name}: control buffer of {chain.writable_length} bytes "
                                                f"truncates a {len(message)}-byte message")
                        message = message[: chain.writable_length]
                    chain.write(dma, message)
                    queue.push(dma, chain, len(message))
                    served += 1
        finally:
            if served:
                self.context.notify_queue(queue)  # type: ignore[union-attr]
