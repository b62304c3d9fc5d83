"""One path for every I/O exit: route port and MMIO accesses from any accelerator to the buses.

The dispatcher takes the machine's big lock around each device access, because device models are plain
register machines that also run on the timer thread (PIT, RTC, LAPIC timer callbacks).
"""

from __future__ import annotations

import threading

from pyemu.accel.exits import Exit, IoIn, IoOut, MmioRead, MmioWrite
from pyemu.system.bus import Bus


class ExitDispatcher:
    """Hands I/O exits to the PIO and MMIO buses under ``lock``."""

    def __init__(self, pio: Bus, mmio: Bus, lock: threading.RLock | None = None) -> None:
        self.pio = pio
        self.mmio = mmio
        self.lock = lock if lock is not None else threading.RLock()

    def io_in(self, port: int, size: int) -> int:
        with self.lock:
            return self.pio.read(port, size)

    def io_out(self, port: int, size: int, value: int) -> None:
        with self.lock:
            self.pio.write(port, size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        with self.lock:
            return self.mmio.read(addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        with self.lock:
            self.mmio.write(addr, size, value)

    def dispatch(self, exit_: Exit) -> int | None:
        """Handle an I/O exit value; returns the value read for IoIn/MmioRead, else None."""
        if isinstance(exit_, IoIn):
            return self.io_in(exit_.port, exit_.size)
        if isinstance(exit_, IoOut):
            self.io_out(exit_.port, exit_.size, exit_.value)
            return None
        if isinstance(exit_, MmioRead):
            return self.mmio_read(exit_.addr, exit_.size)
        if isinstance(exit_, MmioWrite):
            self.mmio_write(exit_.addr, exit_.size, exit_.value)
            return None
        raise TypeError(f"not an I/O exit: {exit_!r}")
