"""One path for every I/O exit: route port and MMIO accesses from any accelerator to the buses.

The dispatcher takes the machine's big lock around an access to a device that relies on it (the
register machines that also run on the timer thread: PIT, RTC, LAPIC, UARTs). A device registered with
``own_lock`` (virtio transports) serialises itself and is called without it, so a vCPU touching a virtio
register never waits behind another device's work.

A device model that raises is the device's problem, not the VM's: the exception is logged under
``-d guest_errors``, the device's owner is told (:meth:`pyemu.hw.core.device.BoardDevice.fail`, which
marks it broken), a read returns all-ones, and the vCPU goes on -- the same rule on both accelerators.
"""

from __future__ import annotations

import threading
from typing import Callable

from pyemu.accel.exits import Exit, IoIn, IoOut, MmioRead, MmioWrite
from pyemu.system import log
from pyemu.system.bus import Bus, BusRange


class ExitDispatcher:
    """Hands I/O exits to the PIO and MMIO buses under ``lock``."""

    def __init__(self, pio: Bus, mmio: Bus, lock: threading.RLock | None = None) -> None:
        self.pio = pio
        self.mmio = mmio
        self.lock = lock if lock is not None else threading.RLock()
        self.device_failures = 0

    def io_in(self, port: int, size: int) -> int:
        return self._read(self.pio, port, size)

    def io_out(self, port: int, size: int, value: int) -> None:
        self._write(self.pio, port, size, value)

    def io_out_burst(self, port: int, data: bytes) -> None:
        """One-byte writes of ``data`` to ``port``, in order, that waited in a vCPU's queue of posted
        writes (:class:`pyemu.system.bus.RegisterFastPath`): one call of the device's ``write_burst``
        when it has one, under one lock hold."""
        entry = self.pio.find(port)
        burst = getattr(entry.device, "write_burst", None) if entry is not None else None
        if entry is None or burst is None:
            for value in data:
                self._write(self.pio, port, 1, value)
            return
        self._write_to(self.pio, entry, port, burst, port - entry.base, data)

    def mmio_read(self, addr: int, size: int) -> int:
        return self._read(self.mmio, addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._write(self.mmio, addr, size, value)

    def _read(self, bus: Bus, addr: int, size: int) -> int:
        entry = bus.find(addr)
        if entry is None:
            with self.lock:
                return bus.read(addr, size)
        try:
            if entry.own_lock:
                return entry.device.read(addr - entry.base, size)
            with self.lock:
                return entry.device.read(addr - entry.base, size)
        except Exception as exc:  # device models must not take the vCPU down with them
            self._device_failed(bus, entry, "read", addr, exc)
            return (1 << (8 * size)) - 1

    def _write(self, bus: Bus, addr: int, size: int, value: int) -> None:
        entry = bus.find(addr)
        if entry is None:
            with self.lock:
                bus.write(addr, size, value)
            return
        self._write_to(bus, entry, addr, entry.device.write, addr - entry.base, size, value)

    def _write_to(self, bus: Bus, entry: BusRange, addr: int, write: Callable[..., None], *args: object) -> None:
        """``write(*args)`` on ``entry``'s device under the lock it needs; a raising device is marked failed."""
        try:
            if entry.own_lock:
                write(*args)
                return
            with self.lock:
                write(*args)
        except Exception as exc:
            self._device_failed(bus, entry, "write", addr, exc)

    def _device_failed(self, bus: Bus, entry: BusRange, kind: str, addr: int, exc: Exception) -> None:
        self.device_failures += 1
        reason = f"{bus.name} {kind} at {addr:#x} failed: {type(exc).__name__}: {exc}"
        fail = getattr(entry.owner, "fail", None)
        if fail is not None:
            fail(reason)
        else:
            log.log("guest_errors", f"{entry.name}: {reason}")

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
