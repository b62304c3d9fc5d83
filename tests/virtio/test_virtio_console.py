"""virtio-console with MULTIPORT (QEMU's virtio-serial-device + virtconsole), driven by the Python test
driver through the virtio-mmio window, with fake and real character backends on the host side.

What a guest driver relies on is checked the way Linux uses it: the control handshake (DEVICE_READY ->
PORT_ADD -> PORT_READY -> CONSOLE_PORT/PORT_NAME/PORT_OPEN), output reaching the backend, input
arriving only into buffers the guest posted with nothing lost in between (the backend holds it), and
malformed control traffic breaking only this device (DEVICE_NEEDS_RESET), never the I/O thread.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyemu.chardev.base import CharBackend, CharFrontend, MachineLock
from pyemu.chardev.file import FileBackend
from pyemu.chardev.null import NullBackend
from pyemu.chardev.options import ChardevConfig, open_chardev_options, parse_chardev_options
from pyemu.chardev.pty import PtyBackend, PtySpec
from pyemu.chardev.socket import SocketBackend
from pyemu.chardev.spec import FileSpec, NullSpec, SocketSpec, StdioSpec
from pyemu.errors import ConfigError
from pyemu.hw.virtio import console as con
from pyemu.hw.virtio import mmio as regs
from pyemu.hw.virtio.console import ConsolePort, SerialConfig, VirtioSerial
from pyemu.hw.virtio.console_plug import PORT_DRIVERS, attach_virtconsole, build_virtio_serial
from pyemu.hw.virtio.device import ID_CONSOLE
from pyemu.machines.device_props import PropReader
from pyemu.machines.virtio_devices import Backends
from pyemu.system.config import DeviceOptions, ObjectOptions, VmConfig
from pyemu.testing.virtio_driver import VirtioTestDriver

from .conftest import Rig, wait_for

TIMEOUT = 10.0


class FakeBackend(CharBackend):
    """A host side that records guest output and types input through the real CharBackend plumbing: the
    input waits in the backend until the frontend takes it, is re-offered on ``notify_room`` (and every
    INPUT_RETRY_INTERVAL), and is offered from the backend's own thread, as the real backends do."""

    def __init__(self) -> None:
        super().__init__("fake")
        self.output = bytearray()
        self.room_notifications = 0
        self.attached_lock: MachineLock | None = None
        self._inbox = bytearray()
        self._inbox_lock = threading.Lock()
        self._out_lock = threading.Lock()
        self._start_thread(self._run, "fake-chardev")

    def attach(self, frontend: CharFrontend, lock: MachineLock) -> None:
        self.attached_lock = lock
        super().attach(frontend, lock)

    def write(self, data: bytes) -> None:
        with self._out_lock:
            self.output += data

    def type(self, data: bytes) -> None:
        with self._inbox_lock:
            self._inbox += data
        self._wake.wake()

    def notify_room(self) -> None:
        self.room_notifications += 1
        super().notify_room()

    @property
    def held(self) -> int:
        """Typed bytes the frontend has not taken yet."""
        with self._inbox_lock:
            return len(self._inbox) + self.pending_input

    def _run(self) -> None:
        while not self._closed.is_set():
            with self._inbox_lock:
                if self._inbox and self._wants_input():
                    self._pending_input += bytes(self._inbox)
                    self._inbox.clear()
            self._offer_input()
            readable, _, _ = select.select([self._wake], [], [], self._select_timeout() or 0.05)
            if readable:
                self._wake.drain()


class ConsoleGuest:
    """The guest side of the multiport protocol on top of :class:`VirtioTestDriver`."""

    def __init__(self, driver: VirtioTestDriver) -> None:
        self.driver = driver
        self.buffers: dict[tuple[int, int], tuple[int, int]] = {}  # (queue, head) -> (gpa, size)

    def start(self, queues: dict[int, int], *, want: int | None = None) -> int:
        return self.driver.initialise(want=want, queues=queues)

    def post(self, queue: int, size: int) -> int:
        gpa = self.driver.buffer(size)
        head = self.driver.submit(queue, [(gpa, size, True)])
        self.buffers[(queue, head)] = (gpa, size)
        return head

    def received(self, queue: int, count: int = 1, timeout: float = TIMEOUT) -> list[bytes]:
        out = []
        for head, written in self.driver.wait_used(queue, count, timeout=timeout):
            gpa, _size = self.buffers.pop((queue, head))
            out.append(self.driver.memory.read(gpa, written))
        return out

    def control_messages(self, count: int) -> list[tuple[int, int, int, bytes]]:
        messages = []
        for raw in self.received(con.CONTROL_RX_QUEUE, count):
            port_id, event, value = struct.unpack_from("<IHH", raw)
            messages.append((port_id, event, value, raw[8:]))
        return messages

    def send(self, queue: int, data: bytes, *, wait: bool = True) -> None:
        gpa = self.driver.buffer(data)
        self.driver.submit(queue, [(gpa, len(data), False)])
        if wait:
            assert self.driver.wait_used(queue, timeout=TIMEOUT)[0][1] == 0

    def control(self, port_id: int, event: int, value: int) -> None:
        self.send(con.CONTROL_TX_QUEUE, struct.pack("<IHH", port_id, event, value))


def serial_with(ports: list[ConsolePort], max_ports: int = 4) -> VirtioSerial:
    device = VirtioSerial(SerialConfig(max_ports=max_ports))
    for port in ports:
        device.add_port(port)
    return device


def queues_for(max_ports: int, size: int = 16) -> dict[int, int]:
    return {index: size for index in range(2 * (max_ports + 1))}


def handshake(guest: ConsoleGuest, ports: int, *, control_buffers: int = 16) -> None:
    """DEVICE_READY, then PORT_READY for every port added, then PORT_OPEN from the guest for each."""
    for _ in range(control_buffers):
        guest.post(con.CONTROL_RX_QUEUE, 256)
    guest.control(0xFFFFFFFF, con.DEVICE_READY, 1)
    added = guest.control_messages(ports)
    for port_id, event, value, _ in added:
        assert (event, value) == (con.DEVICE_ADD, 1)
        guest.control(port_id, con.PORT_READY, 1)


@pytest.fixture
def backends() -> Iterator[list[CharBackend]]:
    opened: list[CharBackend] = []
    yield opened
    for backend in opened:
        backend.close()


def fake(backends: list[CharBackend]) -> FakeBackend:
    backend = FakeBackend()
    backends.append(backend)
    return backend


# -- the device as the guest sees it ------------------------------------------------------------------------


def test_identification_features_and_config(rig: Rig, backends: list[CharBackend]) -> None:
    device = serial_with([ConsolePort(fake(backends), console=True)], max_ports=4)
    transport, driver, _ = rig.plug(device)
    assert driver.reg(regs.REG_DEVICE_ID) == ID_CONSOLE
    features = driver.device_features()
    assert features & con.F_MULTIPORT and features & con.F_EMERG_WRITE and not features & con.F_SIZE
    cols, rows, max_nr_ports, emerg = struct.unpack("<HHII", bytes(transport.read(0x100 + i, 1) for i in range(12)))
    assert (cols, rows, max_nr_ports, emerg) == (0, 0, 4, 0)
    assert len(device.queue_sizes) == 10
    driver.set_reg(regs.REG_QUEUE_SEL, con.CONTROL_RX_QUEUE)
    assert driver.reg(regs.REG_QUEUE_NUM_MAX) == 32
    driver.set_reg(regs.REG_QUEUE_SEL, 4)
    assert driver.reg(regs.REG_QUEUE_NUM_MAX) == 128
    assert con.rx_queue_index(0) == 0 and con.tx_queue_index(0) == 1
    assert con.rx_queue_index(1) == 4 and con.tx_queue_index(3) == 9


def test_control_handshake_like_linux(rig: Rig, backends: list[CharBackend]) -> None:
    console = ConsolePort(fake(backends), console=True, name="org.pyemu.console")
    agent = ConsolePort(fake(backends), console=False, name="org.qemu.guest_agent.0")
    device = serial_with([console, agent])
    assert (console.nr, agent.nr) == (0, 1)
    assert console.backend.attached_lock is device.lock  # the device's lock, not the machine's
    _, driver, _ = rig.plug(device)
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    for _ in range(8):
        guest.post(con.CONTROL_RX_QUEUE, 256)
    guest.control(0xFFFFFFFF, con.DEVICE_READY, 1)
    assert [(m[0], m[1], m[2]) for m in guest.control_messages(2)] == [(0, con.DEVICE_ADD, 1), (1, con.DEVICE_ADD, 1)]
    guest.control(0, con.PORT_READY, 1)
    assert guest.control_messages(3) == [(0, con.CONSOLE_PORT, 1, b""),
                                         (0, con.PORT_NAME, 1, b"org.pyemu.console\0"),
                                         (0, con.PORT_OPEN, 1, b"")]
    guest.control(1, con.PORT_READY, 1)
    assert guest.control_messages(2) == [(1, con.PORT_NAME, 1, b"org.qemu.guest_agent.0\0"),
                                         (1, con.PORT_OPEN, 1, b"")]
    assert console.guest_ready and not console.guest_connected
    guest.control(0, con.PORT_OPEN, 1)
    assert wait_for(lambda: console.guest_connected)
    guest.control(0, con.PORT_OPEN, 0)
    assert wait_for(lambda: not console.guest_connected)


def test_control_messages_wait_for_control_buffers(rig: Rig, backends: list[CharBackend]) -> None:
    """Linux posts control buffers before DEVICE_READY, but a driver that posts late loses nothing."""
    device = serial_with([ConsolePort(fake(backends), console=True)])
    _, driver, _ = rig.plug(device)
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    guest.control(0xFFFFFFFF, con.DEVICE_READY, 1)
    guest.control(0, con.PORT_READY, 1)
    assert wait_for(lambda: len(device.control_out) == 3)
    for _ in range(3):
        guest.post(con.CONTROL_RX_QUEUE, 64)
    assert [m[1] for m in guest.control_messages(3)] == [con.DEVICE_ADD, con.CONSOLE_PORT, con.PORT_OPEN]


def test_output_reaches_the_backend(rig: Rig, backends: list[CharBackend]) -> None:
    host = fake(backends)
    device = serial_with([ConsolePort(host, console=True)])
    _, driver, interrupt = rig.plug(device)
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    handshake(guest, 1)
    guest.send(1, b"hello from the guest\r\n")
    # A chain of several segments is one stream, in order.
    parts = [driver.buffer(b"ab"), driver.buffer(b"cde"), driver.buffer(b"f")]
    driver.submit(1, [(parts[0], 2, False), (parts[1], 3, False), (parts[2], 1, False)])
    assert driver.wait_used(1)[0][1] == 0
    assert wait_for(lambda: bytes(host.output) == b"hello from the guest\r\nabcdef")
    assert wait_for(lambda: interrupt.count >= 1)


def test_input_is_held_until_the_guest_opens_the_port_and_posts_buffers(rig: Rig, backends: list[CharBackend]) -> None:
    host = fake(backends)
    port = ConsolePort(host, console=True)
    device = serial_with([port])
    _, driver, _ = rig.plug(device)
    host.type(b"typed before boot ")  # the guest is not even running yet
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    handshake(guest, 1)
    guest.control_messages(2)  # CONSOLE_PORT, PORT_OPEN
    first = guest.post(0, 4)   # a buffer, but the port is not open in the guest yet
    time.sleep(0.2)
    assert driver.used(0) == [] and host.held == 18
    guest.control(0, con.PORT_OPEN, 1)
    assert guest.received(0) == [b"type"]
    assert first not in [h for (q, h) in guest.buffers if q == 0]
    assert wait_for(lambda: host.held == 14)  # the rest stays with the backend: no buffer for it
    time.sleep(0.1)
    assert host.held == 14 and len(port.rx_pending) == 0
    guest.post(0, 64)
    assert guest.received(0) == [b"d before boot "]
    host.type(b"x" * 300)  # more than the posted buffers hold: delivered as buffers appear
    for _ in range(3):
        guest.post(0, 128)
    got = b"".join(guest.received(0, 3))
    assert got == b"x" * 300
    assert host.held == 0 and port.bytes_to_guest == 318
    assert host.room_notifications > 0


def test_input_to_a_closed_port_waits_and_nothing_is_lost_across_reopen(rig: Rig, backends: list[CharBackend]) -> None:
    host = fake(backends)
    device = serial_with([ConsolePort(host, console=True)])
    _, driver, _ = rig.plug(device)
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    handshake(guest, 1)
    guest.control(0, con.PORT_OPEN, 1)
    for _ in range(4):
        guest.post(0, 16)
    host.type(b"one")
    assert guest.received(0) == [b"one"]
    guest.control(0, con.PORT_OPEN, 0)
    host.type(b"two")
    time.sleep(0.2)
    assert driver.used(0) == [] and host.held == 3
    guest.control(0, con.PORT_OPEN, 1)
    assert guest.received(0) == [b"two"]


def test_single_port_driver_without_multiport(rig: Rig, backends: list[CharBackend]) -> None:
    """max_ports=1 looks like a legacy console (QEMU): no MULTIPORT, port 0 open at DRIVER_OK."""
    host = fake(backends)
    device = serial_with([ConsolePort(host, console=True)], max_ports=1)
    _, driver, _ = rig.plug(device)
    assert not driver.device_features() & con.F_MULTIPORT
    assert len(device.queue_sizes) == 4
    guest = ConsoleGuest(driver)
    guest.start({0: 8, 1: 8})
    guest.post(0, 32)
    host.type(b"ls\n")
    assert guest.received(0) == [b"ls\n"]
    guest.send(1, b"bin dev\n")
    assert wait_for(lambda: bytes(host.output) == b"bin dev\n")


def test_driver_that_declines_multiport(rig: Rig, backends: list[CharBackend]) -> None:
    host = fake(backends)
    device = serial_with([ConsolePort(host, console=True)], max_ports=4)
    _, driver, _ = rig.plug(device)
    guest = ConsoleGuest(driver)
    guest.start({0: 8, 1: 8}, want=0)
    assert not device.multiport and device.ports[0].guest_connected
    guest.post(0, 32)
    host.type(b"ok")
    assert guest.received(0) == [b"ok"]


def test_emergency_write_goes_to_the_console(rig: Rig, backends: list[CharBackend]) -> None:
    host = fake(backends)
    transport, driver, _ = rig.plug(serial_with([ConsolePort(host, console=True)]))
    ConsoleGuest(driver).start(queues_for(4))
    for char in b"SOS":
        transport.write(0x100 + 8, 4, char)
    assert bytes(host.output) == b"SOS"


@pytest.mark.parametrize("message", [b"\x00\x00\x00\x00", b"", b"\x01\x02\x03\x04\x05\x06\x07"])
def test_short_control_message_needs_reset_not_a_traceback(rig: Rig, backends: list[CharBackend],
                                                           message: bytes) -> None:
    host = fake(backends)
    transport, driver, interrupt = rig.plug(serial_with([ConsolePort(host, console=True)]))
    _, other, _ = rig.plug(serial_with([ConsolePort(fake(backends), console=True)]))
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    if message:
        guest.send(con.CONTROL_TX_QUEUE, message, wait=False)
    else:  # a chain with no device-readable byte at all
        guest.post(con.CONTROL_TX_QUEUE, 8)
    assert wait_for(lambda: bool(driver.status & regs.STATUS_DEVICE_NEEDS_RESET))
    assert "control message" in (transport.broken_reason or "")
    assert wait_for(lambda: interrupt.count >= 1)
    assert driver.reg(regs.REG_INTERRUPT_STATUS) & regs.INT_CONFIG_CHANGE
    # The I/O thread serves others, and a driver reset brings this device back.
    other_guest = ConsoleGuest(other)
    other_guest.start(queues_for(4))
    handshake(other_guest, 1)
    guest.start(queues_for(4))
    assert not transport.broken
    handshake(guest, 1)
    assert [m[1] for m in guest.control_messages(2)] == [con.CONSOLE_PORT, con.PORT_OPEN]


def test_control_buffer_too_small_for_a_message_needs_reset(rig: Rig, backends: list[CharBackend]) -> None:
    transport, driver, _ = rig.plug(serial_with([ConsolePort(fake(backends), console=True)]))
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    guest.post(con.CONTROL_RX_QUEUE, 4)
    guest.control(0xFFFFFFFF, con.DEVICE_READY, 1)
    assert wait_for(lambda: transport.broken)
    assert "control buffer" in (transport.broken_reason or "")


def test_receive_buffer_the_device_cannot_write_needs_reset(rig: Rig, backends: list[CharBackend]) -> None:
    transport, driver, _ = rig.plug(serial_with([ConsolePort(fake(backends), console=True)]))
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    guest.send(0, b"read-only", wait=False)
    assert wait_for(lambda: transport.broken)
    assert "no device-writable bytes" in (transport.broken_reason or "")


def test_unknown_port_ids_and_events_are_ignored_like_qemu(rig: Rig, backends: list[CharBackend]) -> None:
    transport, driver, _ = rig.plug(serial_with([ConsolePort(fake(backends), console=True)]))
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    guest.control(3, con.PORT_READY, 1)      # no port 3
    guest.control(0, 99, 1)                  # no such event
    guest.control(0, con.CONSOLE_PORT, 1)    # a device-to-driver event sent the wrong way
    guest.control(0xFFFFFFFF, con.DEVICE_READY, 0)  # the driver reports failure
    assert not transport.broken
    handshake(guest, 1)


def test_driver_reset_forgets_buffers_and_the_open_state(rig: Rig, backends: list[CharBackend]) -> None:
    host = fake(backends)
    port = ConsolePort(host, console=True)
    device = serial_with([port])
    _, driver, _ = rig.plug(device)
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    handshake(guest, 1)
    guest.control(0, con.PORT_OPEN, 1)
    guest.post(0, 64)
    assert wait_for(lambda: port.rx_space == 64)
    driver.set_reg(regs.REG_STATUS, 0)
    assert port.rx_space == 0 and not port.guest_connected and not device.active
    with device.lock:
        assert port.can_receive() == 0
    host.type(b"after reset")
    time.sleep(0.1)
    assert host.held == 11  # kept by the backend until a driver opens the port again
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    handshake(guest, 1)
    guest.control(0, con.PORT_OPEN, 1)
    guest.post(0, 64)
    assert guest.received(0) == [b"after reset"]


def test_output_on_a_queue_without_a_port_is_discarded(rig: Rig, backends: list[CharBackend]) -> None:
    transport, driver, _ = rig.plug(serial_with([ConsolePort(fake(backends), console=True)]))
    guest = ConsoleGuest(driver)
    guest.start(queues_for(4))
    guest.send(con.tx_queue_index(2), b"nobody listens")
    assert not transport.broken


# -- port numbering and plugging (QEMU's rules and messages) ----------------------------------------------


def test_port_numbers_follow_qemu() -> None:
    device = VirtioSerial(SerialConfig(max_ports=4))
    first = device.add_port(ConsolePort(None, console=True))
    serial_port = device.add_port(ConsolePort(None, console=False))
    second_console = device.add_port(ConsolePort(None, console=True))
    assert (first.nr, serial_port.nr, second_console.nr) == (0, 1, 2)
    with pytest.raises(ConfigError, match="A port already exists at id 2"):
        device.add_port(ConsolePort(None, console=False, nr=2))
    with pytest.raises(ConfigError, match="Out-of-range port id specified, max. allowed: 3"):
        device.add_port(ConsolePort(None, console=False, nr=4))
    device.add_port(ConsolePort(None, console=False, name="a"))
    with pytest.raises(ConfigError, match="Maximum port limit for this device reached"):
        device.add_port(ConsolePort(None, console=False))
    other = VirtioSerial(SerialConfig(max_ports=4))
    with pytest.raises(ConfigError, match="Port number 0 on virtio-serial devices reserved for virtconsole"):
        other.add_port(ConsolePort(None, console=False, nr=0))
    other.add_port(ConsolePort(None, console=False, name="dup"))
    with pytest.raises(ConfigError, match="A port already exists by name dup"):
        other.add_port(ConsolePort(None, console=False, name="dup"))


def test_serial_device_properties() -> None:
    def build(*props: tuple[str, str]) -> VirtioSerial:
        device = build_virtio_serial(PropReader(DeviceOptions("virtio-serial-device", props)), Backends(VmConfig()))
        assert isinstance(device, VirtioSerial)
        return device

    assert build().config.max_ports == 31 and len(build().queue_sizes) == 64
    assert build(("max_ports", "2")).config.max_ports == 2
    assert not build(("emergency-write", "off")).device_features() & con.F_EMERG_WRITE
    with pytest.raises(ConfigError, match="Maximum number of serial ports not specified"):
        build(("max_ports", "0"))
    with pytest.raises(ConfigError, match="maximum ports supported: 511"):
        build(("max_ports", "512"))
    with pytest.raises(ConfigError, match="Property 'virtio-serial-device.bogus' not found"):
        build(("bogus", "1"))


def port_props(driver: str, *props: tuple[str, str]) -> PropReader:
    return PropReader(DeviceOptions(driver, props))


def test_virtconsole_without_a_bus_fails_like_qemu() -> None:
    backends = Backends(VmConfig(chardevs=(ObjectOptions("null", "c0"),)))
    with pytest.raises(ConfigError) as error:
        attach_virtconsole(port_props("virtconsole", ("chardev", "c0")), backends, [])
    assert str(error.value) == "-device virtconsole: No 'virtio-serial-bus' bus found for device 'virtconsole'"
    assert error.value.option == "-device"


def test_virtconsole_goes_on_the_newest_bus_or_the_named_one(rig: Rig) -> None:
    chardevs = tuple(ObjectOptions("null", f"c{i}") for i in range(4))
    backends = Backends(VmConfig(chardevs=chardevs))
    first, _, _ = rig.plug(VirtioSerial())
    second, _, _ = rig.plug(VirtioSerial())
    board = attach_virtconsole(port_props("virtconsole", ("chardev", "c0")), backends, rig.transports)
    assert board.model in second.device.ports.values()  # type: ignore[attr-defined]
    attach_virtconsole(port_props("virtconsole", ("chardev", "c1"), ("bus", f"{first.name}.0")),
                       backends, rig.transports)
    assert 0 in first.device.ports  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="Bus 'nope.0' not found"):
        attach_virtconsole(port_props("virtconsole", ("chardev", "c2"), ("bus", "nope.0")), backends,
                           rig.transports)
    with pytest.raises(ConfigError, match="chardev 'c0' is already in use"):
        attach_virtconsole(port_props("virtconsole", ("chardev", "c0")), backends, rig.transports)
    with pytest.raises(ConfigError, match="Property 'virtconsole.chardev' can't find value 'c9'"):
        attach_virtconsole(port_props("virtconsole", ("chardev", "c9")), backends, rig.transports)
    with pytest.raises(ConfigError, match="Property 'virtconsole.iothread' not found"):
        attach_virtconsole(port_props("virtconsole", ("chardev", "c3"), ("iothread", "x")), backends,
                           rig.transports)
    named = attach_virtconsole(port_props("virtserialport", ("nr", "5"), ("name", "org.test")), backends,
                               rig.transports)
    assert named.model.nr == 5 and not named.model.console and named.model.name == "org.test"  # type: ignore[attr-defined]
    assert set(PORT_DRIVERS) == {"virtconsole", "virtserialport"}


def test_console_over_a_real_unix_socket_chardev(rig: Rig, tmp_path: Path) -> None:
    """``-chardev socket,path=,server=on,wait=off`` + ``-device virtconsole`` with the real backend."""
    path = str(tmp_path / "console.sock")
    backends = Backends(VmConfig(chardevs=(ObjectOptions("socket", "c0", (("path", path), ("server", "on"),
                                                                          ("wait", "off"))),)))
    transport, driver, _ = rig.plug(build_virtio_serial(port_props("virtio-serial-device"), backends))
    board = attach_virtconsole(port_props("virtconsole", ("chardev", "c0"), ("name", "org.pyemu.console")),
                               backends, rig.transports)
    port = board.model
    assert isinstance(port, ConsolePort) and isinstance(port.backend, SocketBackend)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(TIMEOUT)
        client.connect(path)
        assert port.backend.wait_connected(TIMEOUT)
        client.sendall(b"echo hi\n")  # typed before the guest driver exists
        guest = ConsoleGuest(driver)
        guest.start(queues_for(31, 16))
        handshake(guest, 1)
        assert [m[1] for m in guest.control_messages(3)] == [con.CONSOLE_PORT, con.PORT_NAME, con.PORT_OPEN]
        guest.control(0, con.PORT_OPEN, 1)
        guest.post(0, 64)
        assert guest.received(0) == [b"echo hi\n"]
        guest.send(1, b"hi\r\n# ")
        received = b""
        deadline = time.monotonic() + TIMEOUT
        while received != b"hi\r\n# " and time.monotonic() < deadline:
            received += client.recv(100)
        assert received == b"hi\r\n# "
        client.close()
    finally:
        transport.close()
    assert port.backend is None and not os.path.exists(path)  # the device closed the backend


def test_cli_end_to_end_through_the_virtio_plugger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real command line through ``VirtioPlugger`` (wired here the way machines/virtio_devices.py
    is meant to be wired, unless it already is)."""
    from pyemu.hw.core.device import DeviceManager
    from pyemu.hw.core.dma import DmaMemory
    from pyemu.hw.core.irq import IrqLine
    from pyemu.machines import virtio_devices as vd
    from pyemu.system.bus import Bus
    from pyemu.system.memory import GuestMemory
    from pyemu.system.options import parse_args

    if not ("virtio-serial-device" in vd.BUILDERS and vd.VirtioPlugger.handles(None, "virtconsole")):  # type: ignore[arg-type]
        monkeypatch.setitem(vd.BUILDERS, "virtio-serial-device", build_virtio_serial)
        original_add = vd.VirtioPlugger.add

        def add(self: vd.VirtioPlugger, options: DeviceOptions):  # type: ignore[no-untyped-def]
            if options.driver in PORT_DRIVERS:
                return attach_virtconsole(PropReader(options), self.backends, self.transports, self.devices)
            return original_add(self, options)
        monkeypatch.setattr(vd.VirtioPlugger, "add", add)
        monkeypatch.setattr(vd.VirtioPlugger, "handles", lambda self, driver: driver in vd.BUILDERS
                            or driver in PORT_DRIVERS)
    path = str(tmp_path / "s")
    config = parse_args(["-chardev", f"socket,id=c0,path={path},server=on,wait=off",
                         "-device", "virtio-serial-device,id=vser0", "-device", "virtconsole,chardev=c0,id=con0"])
    memory = GuestMemory([(0, 8 << 20)], name="cli-test")
    devices = DeviceManager(Bus("pio", 1 << 16), Bus("mmio", 1 << 48))
    plugger = vd.VirtioPlugger(config=config, devices=devices, dma=DmaMemory(memory, None),
                               irq_pin=lambda gsi: IrqLine(name=f"gsi{gsi}"), lock=threading.RLock(), accel=None)
    try:
        for device in config.devices:
            assert plugger.handles(device.driver)
            plugger.add(device)
        assert [d.driver for d in devices] == ["virtio-serial-device", "virtconsole"]
        port = devices.get("con0")
        assert port is not None and isinstance(port.model, ConsolePort) and port.model.nr == 0
        assert os.path.exists(path)
        bare = parse_args(["-chardev", "null,id=c1", "-device", "virtconsole,chardev=c1"])
        plugger2 = vd.VirtioPlugger(config=bare, devices=DeviceManager(Bus("pio", 1 << 16), Bus("mmio", 1 << 48)),
                                    dma=DmaMemory(memory, None), irq_pin=lambda gsi: IrqLine(),
                                    lock=threading.RLock(), accel=None)
        with pytest.raises(ConfigError, match="No 'virtio-serial-bus' bus found for device 'virtconsole'"):
            plugger2.add(bare.devices[0])
        plugger2.close()
    finally:
        plugger.close()
        devices.close_all()
        memory.close()
    assert not os.path.exists(path)


# -- -chardev options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "props", "expected"), [
    ("socket", (("path", "/tmp/s"), ("server", "on"), ("wait", "off")),
     SocketSpec("unix", path="/tmp/s", server=True, wait=False)),
    ("socket", (("path", "/tmp/s"), ("server", "on")), SocketSpec("unix", path="/tmp/s", server=True, wait=True)),
    ("socket", (("path", "/tmp/s"),), SocketSpec("unix", path="/tmp/s")),
    ("socket", (("host", "127.0.0.1"), ("port", "4444"), ("server", "on"), ("wait", "off"), ("nodelay", "on")),
     SocketSpec("tcp", host="127.0.0.1", port=4444, server=True, wait=False, nodelay=True)),
    ("socket", (("host", ""), ("port", "0"), ("server", "on"), ("wait", "off")),
     SocketSpec("tcp", host="", port=0, server=True, wait=False)),
    ("file", (("path", "/tmp/log"),), FileSpec("/tmp/log")),
    ("file", (("path", "/tmp/log"), ("append", "on")), FileSpec("/tmp/log", append=True)),
    ("stdio", (), StdioSpec()),
    ("stdio", (("mux", "off"),), StdioSpec()),
    ("pty", (), PtySpec("c0")),
    ("null", (), NullSpec()),
])
def test_chardev_options_map_to_specs(kind: str, props: tuple[tuple[str, str], ...], expected: object) -> None:
    assert parse_chardev_options(ObjectOptions(kind, "c0", props)).spec == expected


def test_stdio_signal_option() -> None:
    assert parse_chardev_options(ObjectOptions("stdio", "c0")).signal
    assert not parse_chardev_options(ObjectOptions("stdio", "c0", (("signal", "off"),))).signal


@pytest.mark.parametrize(("kind", "props", "message"), [
    ("socket", (), "-chardev socket,id=c0: chardev: socket: no host given"),
    ("socket", (("host", "localhost"),), "chardev: socket: no port given"),
    ("socket", (("host", "localhost"), ("port", "http")), "port 'http' is not a number"),
    ("socket", (("host", "localhost"), ("port", "70000"), ("server", "on")), "out of range"),
    ("socket", (("path", "/tmp/s"), ("host", "x"), ("port", "1")), "not both"),
    ("socket", (("path", "/tmp/s"), ("wait", "off")), "'wait' option is incompatible with socket in client"),
    ("socket", (("path", "/tmp/s"), ("server", "maybe")), "Parameter 'server' expects 'on' or 'off'"),
    ("socket", (("path", "/" + "x" * 200), ("server", "on")), "fit in a socket address"),
    ("socket", (("path", "/tmp/s"), ("telnet", "on")), "Parameter 'telnet' is a QEMU feature pyemu does not"),
    ("file", (), "chardev: file: no filename given"),
    ("stdio", (("mux", "on"),), "Parameter 'mux' is a QEMU feature"),
    ("null", (("colour", "blue"),), "-chardev null,id=c0,colour=blue: Invalid parameter 'colour'"),
    ("ringbuf", (), "chardev type 'ringbuf' is not supported by pyemu"),
    ("bogus", (), "'bogus' is not a valid char driver name"),
])
def test_chardev_option_errors(kind: str, props: tuple[tuple[str, str], ...], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_chardev_options(ObjectOptions(kind, "c0", props))
    assert message in str(error.value)
    assert error.value.option == "-chardev"


def test_open_chardev_options_opens_each_kind(tmp_path: Path) -> None:
    opened: list[CharBackend] = []
    try:
        log = tmp_path / "out.log"
        backend = open_chardev_options(ObjectOptions("file", "f", (("path", str(log)),)))
        opened.append(backend)
        assert isinstance(backend, FileBackend)
        backend.write(b"logged")
        assert log.read_bytes() == b"logged"
        null = open_chardev_options(ChardevConfig("n", NullSpec()))
        opened.append(null)
        assert isinstance(null, NullBackend)
        tcp = open_chardev_options(ObjectOptions("socket", "t", (("host", "127.0.0.1"), ("port", "0"),
                                                                 ("server", "on"), ("wait", "off"))))
        opened.append(tcp)
        assert isinstance(tcp, SocketBackend)
        host, port = tcp.address  # type: ignore[misc]
        with socket.create_connection((host, port), timeout=TIMEOUT):
            assert tcp.wait_connected(TIMEOUT)
    finally:
        for backend in opened:
            backend.close()


def test_pty_backend_announces_itself_and_moves_bytes_both_ways() -> None:
    notices: list[str] = []
    backend = open_chardev_options(ObjectOptions("pty", "c0"), notice=notices.append)
    assert isinstance(backend, PtyBackend)
    taken = bytearray()
    try:
        assert notices == [f"char device redirected to {backend.pty_name} (label c0)"]
        assert backend.pty_name.startswith("/dev/pts/")
        backend.write(b"dropped: nobody has the slave open")
        assert backend.bytes_dropped == len(b"dropped: nobody has the slave open")
        def take(data: bytes) -> int:
            taken.extend(data)
            return len(data)
        backend.set_receiver(take)
        fd = os.open(backend.pty_name, os.O_RDWR | os.O_NOCTTY)
        try:
            assert wait_for(lambda: backend.connected, TIMEOUT)
            backend.write(b"to the user\n")  # raw mode: no CR is added
            got = b""
            deadline = time.monotonic() + TIMEOUT
            while got != b"to the user\n" and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    got += os.read(fd, 100)
            assert got == b"to the user\n"
            os.write(fd, b"from the user\r")
            assert wait_for(lambda: bytes(taken) == b"from the user\r", TIMEOUT)  # no CR->LF mapping
        finally:
            os.close(fd)
        assert wait_for(lambda: not backend.connected, TIMEOUT)
    finally:
        backend.close()


def test_pty_default_notice_goes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    backend = PtyBackend(PtySpec("mycon"))
    try:
        err = capfd.readouterr().err
        assert f"char device redirected to {backend.pty_name} (label mycon)\n" in err
    finally:
        backend.close()
