"""HMP ``info qtree``: the board's devices as QEMU's qdev tree (``bus:``/``dev:`` lines, two spaces per
level), walked from the :class:`~pyemu.hw.core.device.DeviceManager`.

Every board device sits on ``main-system-bus`` with its address ranges (``mmio BASE/SIZE`` as QEMU's
sysbus prints them, ``pio`` likewise for port ranges). A virtio-mmio transport shows as QEMU's
``virtio-mmio`` with a ``virtio-mmio-bus.N`` holding the virtio device, and virtio-serial ports hang off
their device's ``virtio-serial-bus.0``, as in QEMU.
"""

from __future__ import annotations

from pyemu.hw.core.device import BoardDevice, DeviceManager


def _ranges(device: BoardDevice, indent: str) -> list[str]:
    return [f"{indent}{io.space} {io.base:016x}/{io.length:016x}" for io in device.ranges]


def _port_lines(port: BoardDevice, indent: str) -> list[str]:
    model = port.model
    lines = [f'{indent}dev: {port.driver}, id "{port.id}"']
    nr = getattr(model, "nr", None)
    if nr is not None:
        lines.append(f"{indent}  nr = {nr} (0x{nr:x})")
    lines.append(f'{indent}  name = "{getattr(model, "name", None) or ""}"')
    guest = "on" if getattr(model, "guest_connected", False) else "off"
    host = "on" if getattr(model, "host_connected", False) else "off"
    lines.append(f"{indent}  port {nr if nr is not None else 0}, guest {guest}, host {host}")
    return lines


def qtree(devices: DeviceManager) -> str:
    """The text of ``info qtree`` (``\\n`` line ends)."""
    all_devices = list(devices)
    ports = [d for d in all_devices if getattr(d.model, "console", None) is not None
             and hasattr(d.model, "guest_connected")]
    lines = ["bus: main-system-bus", "  type System"]
    mmio_bus = 0
    for device in all_devices:
        if device in ports:
            continue
        inner = getattr(device.model, "device", None)
        if inner is not None and hasattr(device.model, "queues"):  # a virtio-mmio transport
            lines.append('  dev: virtio-mmio, id ""')
            lines += _ranges(device, "    ")
            lines += [f"    bus: virtio-mmio-bus.{mmio_bus}", "      type virtio-mmio-bus",
                      f'      dev: {device.driver}, id "{device.id}"']
            mmio_bus += 1
            children = [p for p in ports if getattr(p.model, "device", None) is inner]
            if children or device.driver == "virtio-serial-device":
                lines += ["        bus: virtio-serial-bus.0", "          type virtio-serial-bus"]
                for port in children:
                    lines += _port_lines(port, "          ")
            continue
        lines.append(f'  dev: {device.driver}, id "{device.id}"')
        lines += _ranges(device, "    ")
        if device.failures:
            lines.append(f"    broken: {device.failures[-1]}")
    return "\n".join(lines) + "\n"
