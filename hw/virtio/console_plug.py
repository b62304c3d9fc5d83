"""Building ``-device virtio-serial-device`` and plugging ``-device virtconsole`` / ``virtserialport``.

Why two functions, not one builder: in QEMU a port is not a virtio device but a device on the
``virtio-serial-bus`` that a ``virtio-serial-device`` provides. :func:`build_virtio_serial` is an ordinary
builder (it gets a virtio-mmio slot like any other virtio device); :func:`attach_virtconsole` takes no
slot: it finds the bus -- the one ``bus=ID.0`` names, else the most recently created
``virtio-serial-device``, as QEMU picks the last bus of the right type -- opens the ``-chardev`` the
port names, and adds the port to that device. Without a bus it fails like QEMU: ``No
'virtio-serial-bus' bus found for device 'virtconsole'``.

The port is returned as a :class:`~pyemu.hw.core.device.BoardDevice` without bus ranges, so it has an
id in the device manager (``-device virtconsole,id=con0``, ``info qtree``) and its backend is closed
with the board; its reset is the serial device's (the port's guest state belongs to the device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyemu.chardev.base import CharBackend
from pyemu.chardev.options import open_chardev_options
from pyemu.errors import ConfigError
from pyemu.hw.core.device import BoardDevice, DeviceManager
from pyemu.hw.virtio.console import (
    BAD_ID,
    DEFAULT_MAX_PORTS,
    MAX_PORTS_LIMIT,
    ConsolePort,
    SerialConfig,
    VirtioSerial,
)
from pyemu.hw.virtio.device import VirtioDevice

if TYPE_CHECKING:
    from pyemu.hw.virtio.mmio import VirtioMmio
    from pyemu.machines.device_props import PropReader
    from pyemu.machines.virtio_devices import Backends

SERIAL_DRIVER = "virtio-serial-device"
BUS_TYPE = "virtio-serial-bus"
#: ``-device`` drivers that plug into a virtio-serial bus instead of taking a virtio-mmio slot.
PORT_DRIVERS = ("virtconsole", "virtserialport")


def build_virtio_serial(props: PropReader, backends: Backends) -> VirtioDevice:
    """``-device virtio-serial-device[,max_ports=N][,emergency-write=on|off]`` (``iothread=`` and
    ``id=`` are taken by the plugger)."""
    max_ports = props.integer("max_ports", DEFAULT_MAX_PORTS, low=0, high=1 << 32)
    emergency_write = props.boolean("emergency-write", True)
    props.finish()
    if max_ports == 0:
        raise props.error("Maximum number of serial ports not specified")
    if max_ports > MAX_PORTS_LIMIT:
        raise props.error(f"maximum ports supported: {MAX_PORTS_LIMIT}")
    return VirtioSerial(SerialConfig(max_ports=max_ports, emergency_write=emergency_write))


def find_serial_bus(transports: Sequence[VirtioMmio], driver: str, bus: str | None) -> VirtioSerial:
    """The virtio-serial device a port goes on: ``bus`` (``ID.0`` or ``ID``) or the newest one."""
    if bus is not None:
        wanted = bus[:-2] if bus.endswith(".0") else bus
        for transport in transports:
            if transport.name == wanted:
                if isinstance(transport.device, VirtioSerial):
                    return transport.device
                raise ConfigError(f"-device {driver}: Device '{wanted}' has no '{BUS_TYPE}' bus "
                                  f"(it is a {transport.device.name})", option="-device")
        raise ConfigError(f"-device {driver}: Bus '{bus}' not found", option="-device")
    for transport in reversed(transports):
        if isinstance(transport.device, VirtioSerial):
            return transport.device
    raise ConfigError(f"-device {driver}: No '{BUS_TYPE}' bus found for device '{driver}'", option="-device")


def attach_virtconsole(props: PropReader, backends: Backends, transports: Sequence[VirtioMmio],
                       devices: DeviceManager | None = None, *,
                       connect_timeout: float | None = None) -> BoardDevice:
    """``-device virtconsole[,chardev=ID][,name=NAME][,nr=N][,id=ID][,bus=SERIAL.0]`` (and the same for
    ``virtserialport``): open the chardev, add the port to its bus, register it with ``devices``.

    ``connect_timeout`` bounds a ``-chardev socket`` that waits for its peer (None: wait as QEMU).
    Errors are ConfigError (user mistakes, named ``-device``/``-chardev``) or ChardevError (opening
    the backend failed); nothing stays open after an error."""
    driver = props.driver
    if driver not in PORT_DRIVERS:
        raise ConfigError(f"-device {driver}: not a {BUS_TYPE} port", option="-device")
    device_id = props.text("id")
    bus = props.text("bus")
    chardev_id = props.text("chardev")
    nr = props.integer("nr", BAD_ID, low=0, high=BAD_ID)
    name = props.text("name")
    serial = find_serial_bus(transports, driver, bus)
    props.finish()
    if devices is not None:
        device_id = device_id or devices.new_id(driver)
        if devices.get(device_id) is not None:
            raise ConfigError(f"Duplicate ID '{device_id}' for device", option="-device")
    device_id = device_id or driver
    backend: CharBackend | None = None
    if chardev_id:
        backend = open_chardev_options(backends.chardev(chardev_id, driver), connect_timeout=connect_timeout)
    try:
        port = ConsolePort(backend, console=driver == "virtconsole", nr=None if nr == BAD_ID else nr,
                           name=name or None, label=driver)
        serial.add_port(port)
        if backend is not None and chardev_id:
            # A console is open for its chardev from the start (QEMU's virtconsole); a serial port
            # once the guest's driver opens it.
            backends.chardevs.add(chardev_id, backend, frontend_open=lambda: port.console or port.guest_connected)
    except BaseException:
        if backend is not None:
            backend.close()
        raise
    board_device = BoardDevice(device_id, port, driver=driver, on_reset=lambda: None, on_close=port.close)
    if devices is not None:
        try:
            devices.add(board_device)
        except BaseException:
            serial.remove_port(port)
            port.close()
            raise
    return board_device
