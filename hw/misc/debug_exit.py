"""QEMU's ``isa-debug-exit``: a guest write ends the VM with a status derived from the value.

Test programs (and firmware test suites) use it to report pass/fail without a power-off path: writing V
requests exit status ``(V << 1) | 1``, so the status is always odd and cannot be confused with a clean
QEMU exit (0). The host process exit code is that status modulo 256, as with any exit(). Reads return
all-ones, what the bus returns for a port nobody drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from pyemu.errors import ConfigError
from pyemu.system.bus import Bus, BusRange

DEFAULT_IOBASE = 0x501  # QEMU's defaults
DEFAULT_IOSIZE = 2


@dataclass(frozen=True)
class DebugExitConfig:
    """``-device isa-debug-exit[,iobase=N][,iosize=N]``."""

    iobase: int = DEFAULT_IOBASE
    iosize: int = DEFAULT_IOSIZE

    def __post_init__(self) -> None:
        if self.iosize not in (1, 2, 4):
            raise ConfigError(f"isa-debug-exit: iosize must be 1, 2 or 4, not {self.iosize}", option="-device")
        if self.iobase < 0 or self.iobase + self.iosize > 0x10000:
            raise ConfigError(f"isa-debug-exit: iobase {self.iobase:#x} does not fit in the I/O space",
                              option="-device")

    @classmethod
    def from_properties(cls, props: Mapping[str, str]) -> "DebugExitConfig":
        """Build from ``-device`` properties (numbers in C notation: 0xf4, 244, 0o364)."""
        values: dict[str, int] = {}
        for key, text in props.items():
            if key not in ("iobase", "iosize"):
                raise ConfigError(f"isa-debug-exit: unknown property '{key}' (known: iobase, iosize)",
                                  option="-device")
            try:
                values[key] = int(text, 0)
            except ValueError:
                raise ConfigError(f"isa-debug-exit: property '{key}' expects a number, not '{text}'",
                                  option="-device") from None
        return cls(**values)


def exit_status(value: int) -> int:
    """The status a write of ``value`` requests."""
    return (value << 1) | 1


class IsaDebugExit:
    """``on_exit(status)`` is called under the machine lock on every write; it should request a VM
    shutdown (e.g. ``machine.request_shutdown(ShutdownCause.DEBUG_EXIT, status & 0xff)``), not block."""

    def __init__(self, on_exit: Callable[[int], None], config: DebugExitConfig = DebugExitConfig()) -> None:
        self.on_exit = on_exit
        self.config = config
        self.last_status: int | None = None

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        status = exit_status(value & ((1 << (8 * size)) - 1))
        self.last_status = status
        self.on_exit(status)

    def reset(self) -> None:
        self.last_status = None

    def state(self) -> dict[str, int | None]:
        return {"last_status": self.last_status}

    def restore(self, state: Mapping[str, int | None]) -> None:
        self.last_status = state.get("last_status")

    def register(self, pio: Bus) -> BusRange:
        return pio.register(self.config.iobase, self.config.iosize, self, "isa-debug-exit")
