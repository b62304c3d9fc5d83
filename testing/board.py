"""A fake board for guest-program tests: guest RAM, PIO/MMIO buses, the exit dispatcher and three devices.

* :class:`DebugExit` at port 0xf4 (QEMU's ``isa-debug-exit`` semantics: a write ends the program; QEMU's
  process exit code would be ``(value << 1) | 1``). Its ``on_exit`` callback is wired to
  ``vcpu.request_stop`` by the runner, so the vCPU returns ``Stopped`` right after the OUT.
* :class:`DebugConsole` at port 0xe9 (``-debugcon``): bytes written become ``console`` text.
* :class:`InterruptTrigger` at port 0x520 (only with an interrupt controller): the guest writes a vector
  and it becomes pending, like a self-IPI.
* :class:`RecordingDevice` on ports 0x510..0x51f and MMIO 0x2000_0000..+4 KiB: logs every access with the
  offset the bus passed, returns a programmable value for reads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.system.bus import Bus, mmio_bus, pio_bus
from pyemu.system.memory import GuestMemory
from pyemu.testing.environment import (
    CONSOLE_PORT,
    EXIT_PORT,
    IRQ_PORT,
    RECORD_MMIO,
    RECORD_MMIO_SIZE,
    RECORD_PORT,
    RECORD_PORT_SIZE,
)

if TYPE_CHECKING:
    from pyemu.testing.interrupts import FakeInterruptController

DEFAULT_RAM_SIZE = 4 << 20


@dataclass(frozen=True)
class Access:
    """One device access as the device saw it."""

    space: str          # "pio" or "mmio"
    kind: str           # "read" or "write"
    offset: int
    size: int
    value: int


@dataclass
class RecordingDevice:
    """Logs accesses; reads return ``read_value(offset, size)`` (default: ``0x1000 + offset``)."""

    space: str
    log: list[Access] = field(default_factory=list)
    read_value: Callable[[int, int], int] = lambda offset, size: 0x1000 + offset

    def read(self, offset: int, size: int) -> int:
        value = self.read_value(offset, size) & ((1 << (8 * size)) - 1)
        self.log.append(Access(self.space, "read", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(Access(self.space, "write", offset, size, value))


class DebugExit:
    """isa-debug-exit: the first write records the value and calls ``on_exit``."""

    def __init__(self) -> None:
        self.value: int | None = None
        self.on_exit: Callable[[], None] | None = None

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if self.value is None:
            self.value = value
        if self.on_exit is not None:
            self.on_exit()


class InterruptTrigger:
    """A write of ``vector`` raises it on the fake interrupt controller (which kicks the vCPU)."""

    def __init__(self, controller: "FakeInterruptController") -> None:
        self._controller = controller

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        self._controller.raise_vector(value & 0xFF)


class DebugConsole:
    def __init__(self) -> None:
        self.output = bytearray()

    def read(self, offset: int, size: int) -> int:
        return 0xE9

    def write(self, offset: int, size: int, value: int) -> None:
        self.output += (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


@dataclass(frozen=True)
class DeviceMapping:
    """Your own device model on the test board: ``device`` (any object with ``read(offset, size)`` and
    ``write(offset, size, value)``, the bus protocol every pyemu device speaks) at ``base`` in ``space``
    ("pio" or "mmio") for ``size`` bytes. Pass a list to ``run_program(..., devices=[...])``."""

    space: str
    base: int
    size: int
    device: object
    name: str = "device-under-test"

    def __post_init__(self) -> None:
        if self.space not in ("pio", "mmio"):
            raise ValueError(f"DeviceMapping.space must be 'pio' or 'mmio', not {self.space!r}")


class TestBoard:
    """RAM at 0 (``ram_size`` bytes) plus the test devices."""

    __test__ = False

    def __init__(self, ram_size: int = DEFAULT_RAM_SIZE) -> None:
        self.memory = GuestMemory([(0, ram_size)], name="pyemu-test-ram")
        self.pio: Bus = pio_bus()
        self.mmio: Bus = mmio_bus()
        self.lock = threading.RLock()
        self.dispatcher = ExitDispatcher(self.pio, self.mmio, self.lock)
        self.exit_device = DebugExit()
        self.console = DebugConsole()
        self.port_device = RecordingDevice("pio")
        self.mmio_device = RecordingDevice("mmio")
        self.pio.register(EXIT_PORT, 4, self.exit_device, "debug-exit")
        self.pio.register(CONSOLE_PORT, 1, self.console, "debugcon")
        self.pio.register(RECORD_PORT, RECORD_PORT_SIZE, self.port_device, "recorder")
        self.mmio.register(RECORD_MMIO, RECORD_MMIO_SIZE, self.mmio_device, "recorder")

    def add_device(self, mapping: DeviceMapping) -> None:
        """Map a device under test; an overlap with the board's own devices raises the bus's error."""
        bus = self.pio if mapping.space == "pio" else self.mmio
        bus.register(mapping.base, mapping.size, mapping.device, mapping.name)  # type: ignore[arg-type]

    def attach_interrupt_trigger(self, controller: "FakeInterruptController") -> None:
        self.pio.register(IRQ_PORT, 4, InterruptTrigger(controller), "irq-trigger")

    @property
    def traffic(self) -> list[Access]:
        return self.port_device.log + self.mmio_device.log

    def close(self) -> None:
        self.memory.close()
