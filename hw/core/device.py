"""One device contract for every board device, and the device manager that walks them.

A board device is a device model (the register machine, e.g. a 16550 core or a virtio transport) plus
its binding to the board: an id (QEMU's ``-device ...,id=``, generated when the user gave none), the bus
ranges it answers, its ACPI description, how it resets, saves and restores, and how it releases host
resources. The :class:`DeviceManager` owns them in creation order -- QEMU's qdev tree, Cloud
Hypervisor's DeviceManager -- so ACPI generation, machine reset, snapshots and the monitor (``info
qtree``, ``qom-list``) walk one list instead of board attributes.

Device failures are the device's own business: the exit dispatcher and the I/O threads report an
exception escaping a device model to the device (:meth:`BoardDevice.fail`), which marks itself broken
(virtio: DEVICE_NEEDS_RESET); the VM keeps running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from pyemu.errors import ConfigError
from pyemu.hw.core.state import DeviceState, StateError
from pyemu.system import log
from pyemu.system.bus import Bus, BusDevice

Space = Literal["pio", "mmio"]


@dataclass(frozen=True)
class IoRange:
    """``length`` bytes at ``base`` of the port (``pio``) or memory (``mmio``) space, served by ``handler``.
    ``own_lock``: the handler serialises itself, so the dispatcher calls it without the board's lock."""

    space: Space
    base: int
    length: int
    handler: BusDevice
    own_lock: bool = False


@dataclass(eq=False)
class BoardDevice:
    """A device as a board holds it. ``model`` is the device core; ``reset``/``close`` default to the
    model's methods of those names when it has them; ``aml`` is its ACPI description (a DSDT term under
    ``\\_SB``), or None for devices ACPI does not describe."""

    id: str
    model: object
    ranges: tuple[IoRange, ...] = ()
    aml: bytes | None = None
    driver: str = ""
    on_reset: Callable[[], None] | None = None
    on_close: Callable[[], None] | None = None
    failures: list[str] = field(default_factory=list)

    def reset(self) -> None:
        handler = self.on_reset or getattr(self.model, "reset", None)
        if handler is not None:
            handler()

    def close(self) -> None:
        handler = self.on_close or getattr(self.model, "close", None)
        if handler is not None:
            handler()

    def state(self) -> DeviceState | None:
        """The model's state, or None for a stateless device."""
        getter = getattr(self.model, "state", None)
        return getter() if getter is not None else None

    def from_state(self, state: DeviceState) -> None:
        setter = getattr(self.model, "from_state", None)
        if setter is None:
            raise StateError(self.id, "this device keeps no state, but a saved state was given for it")
        setter(state)

    def fail(self, reason: str) -> None:
        """An exception escaped the model: record it, let the model mark itself broken, log it."""
        self.failures.append(reason)
        log.log("guest_errors", f"device {self.id}: {reason}")
        handler = getattr(self.model, "fail", None)
        if handler is not None:
            handler(reason)


class DeviceManager:
    """The board's devices in creation order, registered on the buses as they are added."""

    def __init__(self, pio: Bus, mmio: Bus) -> None:
        self._buses: dict[str, Bus] = {"pio": pio, "mmio": mmio}
        self._devices: dict[str, BoardDevice] = {}
        self._auto_ids: dict[str, int] = {}

    def new_id(self, driver: str) -> str:
        """An id for a device the user did not name (QEMU's ``/machine/unattached`` style)."""
        count = self._auto_ids.get(driver, 0)
        self._auto_ids[driver] = count + 1
        return f"{driver}{count}" if count or f"{driver}" in self._devices else driver

    def add(self, device: BoardDevice) -> BoardDevice:
        if device.id in self._devices:
            raise ConfigError(f"Duplicate ID '{device.id}' for device", option="-device")
        registered: list[tuple[Bus, BusDevice]] = []
        try:
            for io in device.ranges:
                bus = self._buses[io.space]
                bus.register(io.base, io.length, io.handler, device.id, own_lock=io.own_lock, owner=device)
                registered.append((bus, io.handler))
        except Exception:
            for bus, handler in registered:
                bus.unregister(handler)
            raise
        self._devices[device.id] = device
        return device

    def get(self, device_id: str) -> BoardDevice | None:
        return self._devices.get(device_id)

    def __iter__(self) -> Iterator[BoardDevice]:
        return iter(list(self._devices.values()))

    def __len__(self) -> int:
        return len(self._devices)

    def ids(self) -> list[str]:
        return list(self._devices)

    def reset_all(self) -> None:
        """Machine reset: every device, in creation order (interrupt controllers before their users)."""
        for device in self:
            device.reset()

    def aml(self) -> list[bytes]:
        """The DSDT device terms, in creation order."""
        return [device.aml for device in self if device.aml is not None]

    def states(self) -> dict[str, DeviceState]:
        """Every stateful device's state by id."""
        result: dict[str, DeviceState] = {}
        for device in self:
            state = device.state()
            if state is not None:
                result[device.id] = state
        return result

    def close_all(self) -> None:
        """Release host resources, last device first; one failing close does not skip the others."""
        for device in reversed(list(self._devices.values())):
            try:
                device.close()
            except Exception as exc:  # closing is best effort: report, go on
                log.log("guest_errors", f"device {device.id}: close failed: {exc}")
