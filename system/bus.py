"""Port-I/O and MMIO buses: devices registered on address ranges, accesses dispatched by range.

A device sees only the offset into its own range (QEMU's MemoryRegion ops, rust-vmm's BusDevice), so a
16550 model does not know whether it sits at 0x3f8 or 0x2f8. Lookup is a bisect over sorted range starts.
Unassigned reads return all-ones (what an undriven ISA/PCI bus returns), unassigned writes are dropped;
both are logged under ``-d unimp``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Protocol

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


ShadowSink = Callable[[int, "int | None"], None]


class ReadShadow:
    """What a one-byte register reads as, published by its device whenever reading it has no side effect
    (None while a read must reach the device: it would clear something, say).

    Why: an accelerator that can answer such a read itself spares the guest an exit into Python. A 16550's
    line status register is read before every byte a Linux console writes (~16,000 reads in a boot to
    /init, ~2 us each through the software CPU's exit path). The device stays the authority: it publishes
    after every change, under the same lock as its accesses, and a read it does not shadow goes to it as
    before. An accelerator that does not bind the bus's shadows (KVM) simply never looks."""

    __slots__ = ("address", "value", "_sink")

    def __init__(self, address: int) -> None:
        self.address = address
        self.value: int | None = None
        self._sink: ShadowSink | None = None

    def publish(self, value: int | None) -> None:
        if value == self.value:
            return
        if value is not None and not 0 <= value <= 0xFF:
            raise ValueError(f"a read shadow holds one byte, not {value:#x}")
        self.value = value
        sink = self._sink
        if sink is not None:
            sink(self.address, value)


class Bus:
    """An address space of devices (``name`` is "pio" or "mmio" in messages)."""

    def __init__(self, name: str, address_limit: int) -> None:
        self.name = name
        self.address_limit = address_limit
        self._starts: list[int] = []
        self._ranges: list[BusRange] = []
        self._shadows: dict[int, ReadShadow] = {}
        self._shadow_sink: ShadowSink | None = None

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
        """Remove every range ``device`` occupies (and the read shadows inside them)."""
        keep = [r for r in self._ranges if r.device is not device]
        for gone in (r for r in self._ranges if r.device is device):
            for address in [a for a in self._shadows if gone.base <= a < gone.end]:
                self._shadows.pop(address).publish(None)
        self._ranges = keep
        self._starts = [r.base for r in keep]

    # -- read shadows ---------------------------------------------------------------------------------
    def read_shadow(self, address: int) -> ReadShadow:
        """The shadow of the byte register at ``address`` (one per address), for its device to publish."""
        if not 0 <= address < self.address_limit:
            raise BusError(f"{self.name}: read shadow at {address:#x} outside the bus")
        shadow = self._shadows.get(address)
        if shadow is None:
            shadow = self._shadows[address] = ReadShadow(address)
            shadow._sink = self._shadow_sink
        return shadow

    def bind_shadows(self, sink: ShadowSink | None) -> None:
        """Send every shadow's value, now and after each change, to ``sink(address, value)`` (an
        accelerator's table); None unbinds."""
        self._shadow_sink = sink
        for shadow in self._shadows.values():
            shadow._sink = sink
            if sink is not None:
                sink(shadow.address, shadow.value)

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
