"""QEMU's ``pvpanic`` ISA device: the guest tells the host it panicked, so management sees a crash instead
of a VM that merely stopped answering.

One I/O port (0x505 by default, QEMU's ``ioport``). Reading it returns the events the device supports (bit 0
"panicked", bit 1 "crash loaded": a kdump kernel took over); the guest writes the event that happened.
Linux's ``pvpanic-mmio`` driver finds it through the ACPI device ``QEMU0001`` (an I/O resource works as
well as memory) and writes "panicked" from its panic notifier. What the VM does next is the board's
business (QEMU's ``-action panic=``); the device only reports, so it holds no state beyond its config.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

from pyemu.errors import ConfigError
from pyemu.hw.acpi.aml import Aml, device, name, string
from pyemu.hw.acpi.resources import io, resource_template
from pyemu.hw.core.state import DeviceState, check_state

DEFAULT_IOPORT = 0x505  # QEMU's default
ACPI_HID = "QEMU0001"


class PanicEvent(enum.IntFlag):
    """The event bits of the pvpanic protocol (QEMU's include/hw/misc/pvpanic.h values)."""

    PANICKED = 1
    CRASH_LOADED = 2


ALL_EVENTS = PanicEvent.PANICKED | PanicEvent.CRASH_LOADED


@dataclass(frozen=True)
class PvpanicConfig:
    """``-device pvpanic[,ioport=N][,events=N]``: ``events`` is the bitmask offered to the guest."""

    ioport: int = DEFAULT_IOPORT
    events: int = int(ALL_EVENTS)

    def __post_init__(self) -> None:
        if not 0 <= self.ioport <= 0xFFFF:
            raise ConfigError(f"pvpanic: ioport {self.ioport:#x} does not fit in the I/O space", option="-device")
        if self.events & ~int(ALL_EVENTS) or self.events < 0:
            raise ConfigError(f"pvpanic: events {self.events:#x} has unknown bits (known: 1 panicked, "
                              "2 crash-loaded)", option="-device")

    @classmethod
    def from_properties(cls, props: Mapping[str, str]) -> "PvpanicConfig":
        values: dict[str, int] = {}
        for key, text in props.items():
            if key not in ("ioport", "events"):
                raise ConfigError(f"pvpanic: unknown property '{key}' (known: ioport, events)", option="-device")
            try:
                values[key] = int(text, 0)
            except ValueError:
                raise ConfigError(f"pvpanic: property '{key}' expects a number, not '{text}'",
                                  option="-device") from None
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class PvpanicState(DeviceState):
    """Nothing to keep: a panic is reported the moment it is written."""

    VERSION: ClassVar[int] = 1


class Pvpanic:
    """``on_event(event)`` runs under the machine lock for every offered event bit the guest writes; it
    should request the board's panic action, not block. Bits the device does not offer are ignored."""

    def __init__(self, on_event: Callable[[PanicEvent], None], config: PvpanicConfig = PvpanicConfig()) -> None:
        self.on_event = on_event
        self.config = config

    def read(self, offset: int, size: int) -> int:
        return self.config.events

    def write(self, offset: int, size: int, value: int) -> None:
        offered = value & self.config.events
        # Panicked first: a guest writing both has panicked, and that is the event that changes the run state.
        for event in (PanicEvent.PANICKED, PanicEvent.CRASH_LOADED):
            if offered & event:
                self.on_event(event)

    def reset(self) -> None:
        pass

    def state(self) -> PvpanicState:
        return PvpanicState()

    def from_state(self, state: DeviceState) -> None:
        check_state("pvpanic", state, PvpanicState)

    def aml(self) -> Aml:
        """``Device (PEVT)`` with ``_HID "QEMU0001"`` and its one I/O port, as QEMU describes it."""
        port = self.config.ioport
        return device("PEVT", name("_HID", string(ACPI_HID)),
                      name("_CRS", resource_template(io(port, port, 1, 1))),
                      name("_STA", 0x0B))
