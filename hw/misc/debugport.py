"""The POST / debug port at 0x80, as Cloud Hypervisor uses it: boot-progress codes with timestamps.

Firmware and boot loaders write progress codes to port 0x80; Cloud Hypervisor's guests also write
markers there to time the boot (the code ranges below follow its convention). Each write is logged under
``-d boot`` with the time since VM start and kept in a bounded history that tests and QMP can read.
Linux also uses the port as an I/O delay (``outb_p``), so the history is bounded and logging is off
unless asked for. Reads return the last code written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pyemu.system import log
from pyemu.system.bus import Bus, BusRange
from pyemu.system.timers import TimerQueue

DEBUG_PORT = 0x80
DEFAULT_HISTORY = 1024

_RANGES = ((0x00, 0x1F, "firmware"), (0x20, 0x3F, "bootloader"), (0x40, 0x5F, "kernel"),
           (0x60, 0x7F, "userspace"))


def describe_code(code: int) -> str:
    """Which boot stage a code belongs to by convention ("custom" above 0x7f)."""
    for low, high, name in _RANGES:
        if low <= code <= high:
            return name
    return "custom"


@dataclass
class DebugPortState:
    last: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)  # (ns since start, code)


class DebugPort:
    """``timers`` gives the clock; ``start_ns`` is the VM start (default: now, at construction)."""

    def __init__(self, timers: TimerQueue, *, start_ns: int | None = None, history: int = DEFAULT_HISTORY) -> None:
        self._timers = timers
        self.start_ns = timers.now() if start_ns is None else start_ns
        self._history: deque[tuple[int, int]] = deque(maxlen=history)
        self._last = 0

    @property
    def history(self) -> list[tuple[int, int]]:
        """(nanoseconds since VM start, code) for the most recent writes, oldest first."""
        return list(self._history)

    def read(self, offset: int, size: int) -> int:
        undriven = ((1 << (8 * size)) - 1) & ~0xFF  # bytes beyond the one-port range float high
        return undriven | self._last

    def write(self, offset: int, size: int, value: int) -> None:
        code = value & 0xFF
        elapsed = self._timers.now() - self.start_ns
        self._last = code
        self._history.append((elapsed, code))
        if log.enabled("boot"):
            log.log("boot", f"debug port: {describe_code(code)} code {code:#04x} at "
                            f"{elapsed / 1e9:.6f} s since start")

    def reset(self) -> None:
        """Machine reset: a new boot starts counting from now; the history is kept for inspection."""
        self.start_ns = self._timers.now()
        self._last = 0

    def state(self) -> DebugPortState:
        return DebugPortState(self._last, list(self._history))

    def restore(self, state: DebugPortState) -> None:
        self._last = state.last & 0xFF
        self._history.clear()
        self._history.extend(state.history)

    def register(self, pio: Bus, port: int = DEBUG_PORT) -> BusRange:
        return pio.register(port, 1, self, "debug-port")
