"""Port-I/O and MMIO buses: devices registered on address ranges, accesses dispatched by range.

A device sees only the offset into its own range (QEMU's MemoryRegion ops, rust-vmm's BusDevice), so a
16550 model does not know whether it sits at 0x3f8 or 0x2f8. Lookup is a bisect over sorted range starts.
Unassigned reads return all-ones (what an undriven ISA/PCI bus returns), unassigned writes are dropped;
both are logged under ``-d unimp``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

from pyemu.errors import BusError
from pyemu.system import log


class BusDevice(Protocol):
    """What a bus needs from a device: register reads and writes at an offset into its range."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    device: BusDevice
    name: str
    own_lock: bool = False
    """The device serialises its own accesses: the dispatcher calls it without the board's big lock."""
    owner: object = None
    """The board device this range belongs to (told when an access fails), if any."""

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """An address space of devices (``name`` is "pio" or "mmio" in messages)."""

    def __init__(self, name: str, address_limit: int) -> None:
        self.name = name
        self.address_limit = address_limit
        self._starts: list[int] = []
        self._ranges: list[BusRange] = []

    def register(self, base: int, length: int, device: BusDevice, name: str | None = None, *,
                 own_lock: bool = False, owner: object = None) -> BusRange:
        """Place ``device`` on ``[base, base+length)``; overlapping an existing device is an error."""
        label = name or type(device).__name__
        if length <= 0 or base < 0 or base + length > self.address_limit:
            raise BusError(f"{self.name}: invalid range {base:#x}+{length:#x} for {label}")
        index = bisect.bisect_left(self._starts, base)
        for neighbour in self._ranges[max(0, index - 1) : index + 1]:
            if neighbour.base < base + length and base < neighbour.end:
                raise BusError(
                    f"{self.name}: {label} at {base:#x}+{length:#x} overlaps "
                    f"{neighbour.name} at {neighbour.base:#x}+{neighbour.length:#x}"
                )
        entry = BusRange(base, length, device, label, own_lock, owner)
        self._starts.insert(index, base)
        self._ranges.insert(index, entry)
        return entry

    def unregister(self, device: BusDevice) -> None:
        """Remove every range ``device`` occupies."""
        keep = [r for r in self._ranges if r.device is not device]
        self._ranges = keep
        self._starts = [r.base for r in keep]

    def find(self, addr: int) -> BusRange | None:
        """The range containing ``addr``, or None."""
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0:
            entry = self._ranges[index]
            if addr < entry.end:
                return entry
        return None

    def ranges(self) -> tuple[BusRange, ...]:
        return tuple(self._ranges)

    def read(self, addr: int, size: int) -> int:
        entry = self.find(addr)
        if entry is None:
            if log.enabled("unimp"):
                log.log("unimp", f"{self.name} read of unassigned {addr:#x} size {size}")
            return (1 << (8 * size)) - 1
        return entry.device.read(addr - entry.base, size)

    def write(self, addr: int, size: int, value: int) -> None:
        entry = self.find(addr)
        if entry is None:
            if log.enabled("unimp"):
                log.log("unimp", f"{self.name} write of unassigned {addr:#x} size {size} value {value:#x}")
            return
        entry.device.write(addr - entry.base, size, value)


def pio_bus() -> Bus:
    """The x86 port-I/O space (64 KiB)."""
    return Bus("pio", 0x10000)


def mmio_bus() -> Bus:
    """The guest-physical MMIO space (52-bit physical addresses)."""
    return Bus("mmio", 1 << 52)
