"""Reading ``-device DRIVER,key=value,...`` properties the way QEMU reports problems with them.

A builder takes the properties it knows one by one; whatever is left at :meth:`PropReader.finish` is an
unknown property and an error (``Property 'virtio-blk-device.foo' not found``), so a typo never passes
silently. Values are parsed with QEMU's rules (on/off/yes/no/true/false, decimal or 0x numbers).
"""

from __future__ import annotations

from pyemu.errors import ConfigError
from pyemu.system.config import DeviceOptions, parse_on_off

COMMON_PROPS = ("id", "iothread")


class PropReader:
    def __init__(self, device: DeviceOptions) -> None:
        self.driver = device.driver
        self._props = dict(device.props)
        if len(self._props) != len(device.props):
            duplicates = sorted({k for k, _ in device.props if [p[0] for p in device.props].count(k) > 1})
            raise ConfigError(f"-device {self.driver}: property '{duplicates[0]}' given twice", option="-device")

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
        for name in self._props:
            raise ConfigError(f"-device {self.driver}: Property '{self.driver}.{name}' not found", option="-device")
