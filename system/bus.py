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


FastPathSink = Callable[[int, "int | None", bool], None]


class RegisterFastPath:
    """What an accelerator may do with one byte register without calling its device, as the device says
    from moment to moment (KVM's coalesced PIO and QEMU's, generalised a little):

    * ``read_value``: what a read returns while reading has no side effect (None: the read must reach the
      device -- it would clear something, say);
    * ``posted_writes``: one-byte writes may wait in a per-vCPU queue and reach the device together
      (``ExitDispatcher.io_out_burst``: the device's ``write_burst(offset, data)`` if it has one, else one
      write each), in order, before the vCPU's next access that is neither such a write nor such a read,
      when it reads such a register twice in a row (polls), and before the vCPU's run ends. The device
      allows it only while such a write changes nothing another access could observe sooner (no
      interrupt, no register that is not itself read through ``read_value``).

    Why: a 16550 console costs the guest an LSR read and a THR write per byte (~16,000 of each in a boot to
    /init, ~2 us each through the software CPU's exit path). The device stays the authority: it publishes
    after every change, under the lock its accesses run under. An accelerator that does not bind the bus's
    fast paths (KVM) never looks."""

    __slots__ = ("address", "read_value", "posted_writes", "_sink")

    def __init__(self, address: int) -> None:
        self.address = address
        self.read_value: int | None = None
        self.posted_writes = False
        self._sink: FastPathSink | None = None

    def publish_read(self, value: int | None) -> None:
        if value == self.read_value:
            return
        if value is not None and not 0 <= value <= 0xFF:
            raise ValueError(f"a byte register reads as one byte, not {value:#x}")
        self.read_value = value
        self._send()

    def post_writes(self, allowed: bool) -> None:
        if allowed == self.posted_writes:
            return
        self.posted_writes = allowed
        self._send()

    def clear(self) -> None:
        """Neither: every access reaches the device again."""
        self.read_value = None
        self.posted_writes = False
        self._send()

    def _send(self) -> None:
        sink = self._sink
        if sink is not None:
            sink(self.address, self.read_value, self.posted_writes)


class Bus:
    """An address space of devices (``name`` is "pio" or "mmio" in messages)."""

    def __init__(self, name: str, address_limit: int) -> None:
        self.name = name
        self.address_limit = address_limit
        self._starts: list[int] = []
        self._ranges: list[BusRange] = []
        self._fast_paths: dict[int, RegisterFastPath] = {}
        self._fast_path_sink: FastPathSink | None = None

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
        """Remove every range ``device`` occupies (and the fast paths inside them)."""
        keep = [r for r in self._ranges if r.device is not device]
        for gone in (r for r in self._ranges if r.device is device):
            for address in [a for a in self._fast_paths if gone.base <= a < gone.end]:
                self._fast_paths.pop(address).clear()
        self._ranges = keep
        self._starts = [r.base for r in keep]

    # -- fast paths ---------------------------------------------------------------------------------
    def fast_path(self, address: int) -> RegisterFastPath:
        """The fast path of the byte register at ``address`` (one per address), for its device to publish."""
        if not 0 <= address < self.address_limit:
            raise BusError(f"{self.name}: fast path at {address:#x} outside the bus")
        path = self._fast_paths.get(address)
        if path is None:
            path = self._fast_paths[address] = RegisterFastPath(address)
            path._sink = self._fast_path_sink
        return path

    def bind_fast_paths(self, sink: FastPathSink | None) -> None:
        """Send every fast path's settings, now and after each change, to ``sink(address, read_value,
        posted_writes)`` (an accelerator's table); None unbinds."""
        self._fast_path_sink = sink
        for path in self._fast_paths.values():
            path._sink = sink
            if sink is not None:
                path._send()

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
