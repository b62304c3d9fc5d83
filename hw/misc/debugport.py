"""The POST / debug port at 0x80, as Cloud Hypervisor uses it: boot-progress codes with timestamps.

Firmware and boot loaders write progress codes to port 0x80; Cloud Hypervisor's guests also write
markers there to time the boot (the code ranges below follow its convention). Each write is logged under
``-d boot`` with the time since VM start and kept in a bounded history that tests and QMP can read.
Linux also uses the port as an I/O delay (``outb_p``), so the history is bounded and logging is off
unless asked for. Reads return the last code written.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
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


#: Bound on a saved history timestamp (about 292 years of nanoseconds either side of the start).
_MAX_NS = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class DebugPortState(DeviceState):
    """``last`` is what the guest reads back; ``history`` the recorded (ns since start, code) pairs, oldest
    first, kept so the boot timeline survives a snapshot. The start time itself belongs to the machine
    that runs the port and is not saved."""

    VERSION: ClassVar[int] = 1

    last: int = 0
    history: tuple[tuple[int, int], ...] = ()


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
        """The last code and the history now."""
        return DebugPortState(last=self._last, history=tuple(self._history))

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state; a history longer than this port keeps is refused rather than silently cut.
        Checked first: on :class:`StateError` nothing changes."""
        s = check_state("debug-port", state, DebugPortState)
        check_range("debug-port", "last", s.last, 0, 0xFF)
        if not isinstance(s.history, tuple):
            raise StateError("debug-port", f"history must be a tuple, not {type(s.history).__name__}")
        capacity = self._history.maxlen
        if capacity is not None:
            check_range("debug-port", "len(history)", len(s.history), 0, capacity)
        for i, entry in enumerate(s.history):
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise StateError("debug-port", f"history[{i}]={entry!r} is not a (ns, code) pair")
            check_range("debug-port", f"history[{i}] time", entry[0], -_MAX_NS, _MAX_NS)
            check_range("debug-port", f"history[{i}] code", entry[1], 0, 0xFF)
        self._last = s.last
        self._history.clear()
        self._history.extend(s.history)

    def register(self, pio: Bus, port: int = DEBUG_PORT) -> BusRange:
        return pio.register(port, 1, self, "debug-port")
