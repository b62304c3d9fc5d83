"""QEMU's ``isa-debug-exit``: a guest write ends the VM with a status derived from the value.

Test programs (and firmware test suites) use it to report pass/fail without a power-off path: writing V
requests exit status ``(V << 1) | 1``, so the status is always odd and cannot be confused with a clean
QEMU exit (0). The host process exit code is that status modulo 256, as with any exit(). Reads return
all-ones, what the bus returns for a port nobody drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

from pyemu.errors import ConfigError
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
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


#: The largest status a write can request: an 8-byte access of all ones.
MAX_EXIT_STATUS = exit_status((1 << 64) - 1)


@dataclass(frozen=True, kw_only=True)
class DebugExitState(DeviceState):
    """The device's only memory: the status the guest last requested (None: no write since reset). Kept so
    a restored machine reports the same result as the one it was saved from."""

    VERSION: ClassVar[int] = 1

    last_status: int | None = None


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

    def state(self) -> DebugExitState:
        """The last requested status."""
        return DebugExitState(last_status=self.last_status)

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state (checked first: a status no write could produce raises :class:`StateError`
        and changes nothing). Restoring does not call ``on_exit``: the request already happened."""
        s = check_state("isa-debug-exit", state, DebugExitState)
        if s.last_status is not None:
            check_range("isa-debug-exit", "last_status", s.last_status, 1, MAX_EXIT_STATUS)
            if not s.last_status & 1:
                raise StateError("isa-debug-exit", f"last_status={s.last_status:#x} is even; every status is odd")
        self.last_status = s.last_status

    def register(self, pio: Bus) -> BusRange:
        return pio.register(self.config.iobase, self.config.iosize, self, "isa-debug-exit")
