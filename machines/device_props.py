"""Reading ``-device DRIVER,key=value,...`` properties the way QEMU reports problems with them.

A builder takes the properties it knows one by one; whatever is left at :meth:`PropReader.finish` is an
unknown property and an error (``Property 'virtio-blk-device.foo' not found``), so a typo never passes
silently. Values are parsed with QEMU's rules (on/off/yes/no/true/false, decimal or 0x numbers).

``-global DRIVER.PROP=VALUE`` defaults arrive with the device (:attr:`DeviceOptions.globals`): they fill
properties the ``-device`` does not set, and a global the driver does not know is QEMU's "can't apply
global" error when such a device is created. :func:`check_globals` handles the globals of drivers that
are not created through ``-device`` (the virtio-mmio transport, board devices) and unknown drivers.
"""

from __future__ import annotations

from typing import Callable, Collection

from pyemu.errors import ConfigError
from pyemu.system.config import DeviceOptions, parse_on_off
from pyemu.system.global_options import GlobalProp

COMMON_PROPS = ("id", "iothread")


class PropReader:
    def __init__(self, device: DeviceOptions) -> None:
        self.driver = device.driver
        self._props = dict(device.props)
        if len(self._props) != len(device.props):
            duplicates = sorted({k for k, _ in device.props if [p[0] for p in device.props].count(k) > 1})
            raise ConfigError(f"-device {self.driver}: property '{duplicates[0]}' given twice", option="-device")
        # -global defaults: a later -global for the same property wins, the -device's own value wins over all.
        self._from_global = {key: value for key, value in device.globals if key not in self._props}
        self._props.update(self._from_global)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"-device {self.driver}: {message}", option="-device")

    def text(self, name: str, default: str | None = None) -> str | None:
        return self._props.pop(name, default)

    def required(self, name: str) -> str:
        value = self._props.pop(name, None)
        if not value:
            raise self.error(f"Property '{name}' is required")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._props.pop(name, None)
        if value is None:
            return default
        return parse_on_off(value, f"{self.driver}.{name}")

    def integer(self, name: str, default: int, *, low: int = 0, high: int = (1 << 63) - 1) -> int:
        value = self._props.pop(name, None)
        if value is None:
            return default
        try:
            number = int(value, 0)
        except ValueError:
            raise self.error(f"Parameter '{name}' expects an integer, not '{value}'") from None
        if not low <= number <= high:
            raise self.error(f"Parameter '{name}' must be between {low} and {high}")
        return number

    def finish(self) -> None:
        """Every property must have been taken by now."""
        for name, value in self._props.items():
            missing = f"Property '{self.driver}.{name}' not found"
            if name in self._from_global and self._from_global[name] == value:
                raise self.error(f"can't apply global {self.driver}.{name}={value}: {missing}")
            raise self.error(missing)


def _bool_value(value: str) -> bool | None:
    try:
        return parse_on_off(value, "")
    except ConfigError:
        return None


def _check_force_legacy(value: str) -> str | None:
    legacy = _bool_value(value)
    if legacy is None:
        return "Parameter 'force-legacy' expects 'on' or 'off'"
    return "pyemu's virtio-mmio transport is virtio 1.x (version 2) only" if legacy else None


def _check_bool(name: str) -> Callable[[str], str | None]:
    return lambda value: None if _bool_value(value) is not None else f"Parameter '{name}' expects 'on' or 'off'"


def _check_tick_policy(value: str) -> str | None:
    return None if value in ("discard", "delay", "slew") else f"Parameter 'lost_tick_policy' does not accept " \
        f"value '{value}'"


#: Globals for drivers the board creates itself: property -> check (an error text, or None when accepted).
#: ``lost_tick_policy`` is what libvirt writes for a clock's tick policy; pyemu's timers do not re-inject
#: lost ticks, so every policy behaves like ``discard``.
BOARD_GLOBALS: dict[str, dict[str, Callable[[str], str | None]]] = {
    "virtio-mmio": {"force-legacy": _check_force_legacy, "ioeventfd": _check_bool("ioeventfd"),
                    "format_transport_address": _check_bool("format_transport_address")},
    "kvm-pit": {"lost_tick_policy": _check_tick_policy},
    "isa-pit": {},
    "mc146818rtc": {"lost_tick_policy": _check_tick_policy},
    "isa-serial": {}, "i8042": {}, "ioapic": {}, "kvm-ioapic": {}, "apic": {}, "kvm-apic": {}, "i8259": {},
    "isa-i8259": {}, "kvm-i8259": {},
}


def check_globals(globals_: Collection[GlobalProp], is_device_driver: Callable[[str], bool]) -> list[str]:
    """Check the ``-global`` entries the ``-device`` path will not see. Returns QEMU's warnings (for an
    unknown driver, which QEMU only warns about); raises ConfigError for a bad property or value of a
    board driver."""
    warnings: list[str] = []
    for prop in globals_:
        if is_device_driver(prop.driver):
            continue  # checked by PropReader when such a device is created, as in QEMU
        checks = BOARD_GLOBALS.get(prop.driver)
        if checks is None:
            warnings.append(f"global {prop.driver}.{prop.property} has invalid class name")
            continue
        check = checks.get(prop.property)
        problem = (f"Property '{prop.driver}.{prop.property}' not found" if check is None
                   else check(prop.value))
        if problem:
            raise ConfigError(f"can't apply global {prop}: {problem}", option="-global")
    return warnings
