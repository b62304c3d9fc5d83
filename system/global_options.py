"""``-global DRIVER.PROP=VALUE`` (or ``-global driver=D,property=P,value=V``): default property values
for every device of a driver.

As in QEMU, a global is a default: a property given on the ``-device`` itself wins, and a global is
checked when a device of its driver is created (an unknown property is then QEMU's "can't apply global"
error). What the board knows about drivers it never creates through ``-device`` (the virtio-mmio
transport, board devices) is in :mod:`pyemu.machines.device_props`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyemu.errors import ConfigError

_SHORT = re.compile(r"^([^.=]+)\.([^=]+)=(.*)$", re.DOTALL)


@dataclass(frozen=True)
class GlobalProp:
    driver: str
    property: str
    value: str

    def __str__(self) -> str:
        return f"{self.driver}.{self.property}={self.value}"


def parse_global(text: str, props: list[tuple[str, str]] | None = None) -> GlobalProp:
    """``text`` is the option argument; ``props`` its ``key=value`` split (for the long form)."""
    match = _SHORT.match(text)
    if match:
        return GlobalProp(match.group(1), match.group(2), match.group(3))
    values = dict(props or [])
    unknown = [key for key in values if key not in ("driver", "property", "value")]
    if unknown or not values:
        raise ConfigError(f"-global {text}: Invalid format (expected DRIVER.PROP=VALUE or "
                          "driver=DRIVER,property=PROP,value=VALUE)", option="-global")
    for key in ("driver", "property", "value"):
        if key not in values:
            raise ConfigError(f"-global {text}: Parameter '{key}' is missing", option="-global")
    return GlobalProp(values["driver"], values["property"], values["value"])
