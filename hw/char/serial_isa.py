"""The ISA binding of the 16550 core: which ports and which ISA IRQ a COM port uses on a PC.

Kept apart from the core (as QEMU's serial-isa.c is from serial.c) so the same register machine can sit
on an MMIO bus on other boards; this object only carries the PC resources, which the board needs twice:
to register the ports and to describe the device to the guest (ACPI ``PNP0501`` _CRS, kernel command line).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.errors import ConfigError
from pyemu.hw.char.serial import LSR, REGISTER_COUNT, THR, Serial16550, TransmitCallback
from pyemu.hw.core.irq import IrqLine
from pyemu.system.bus import Bus, BusRange
from pyemu.system.timers import TimerQueue

#: The conventional PC COM1..COM4 resources (I/O base, ISA IRQ), as firmware and Linux assume them.
ISA_SERIAL_RESOURCES: tuple[tuple[int, int], ...] = ((0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3))


@dataclass
class IsaSerial:
    """A 16550 core placed at ``iobase`` (8 ports) and wired to ISA ``irq``."""

    core: Serial16550
    iobase: int = 0x3F8
    irq: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.iobase <= 0x10000 - REGISTER_COUNT:
            raise ConfigError(f"isa-serial: iobase {self.iobase:#x} outside the I/O port space")
        if not 0 <= self.irq <= 15:
            raise ConfigError(f"isa-serial: ISA IRQ {self.irq} out of range 0-15")

    @classmethod
    def create(
        cls,
        irq_line: IrqLine,
        timers: TimerQueue,
        transmit: TransmitCallback | None = None,
        *,
        index: int = 0,
    ) -> "IsaSerial":
        """COM``index+1`` with its standard resources; ``irq_line`` must be the line of that ISA IRQ."""
        if not 0 <= index < len(ISA_SERIAL_RESOURCES):
            raise ConfigError(f"isa-serial: at most {len(ISA_SERIAL_RESOURCES)} ISA serial ports")
        iobase, irq = ISA_SERIAL_RESOURCES[index]
        core = Serial16550(irq_line, timers, transmit, out2_gates_irq=True, name=f"serial{index}")
        return cls(core, iobase, irq)

    def register(self, pio: Bus) -> BusRange:
        """Place the eight registers on the port-I/O bus, with LSR's and THR's fast paths."""
        entry = pio.register(self.iobase, REGISTER_COUNT, self.core, f"serial@{self.iobase:#x}")
        self.add_fast_paths(pio)
        return entry

    def add_fast_paths(self, pio: Bus) -> None:
        """Give LSR and THR their fast paths on ``pio`` (see :meth:`Serial16550.set_fast_paths`; for a board
        that registers the ranges itself)."""
        self.core.set_fast_paths(pio.fast_path(self.iobase + LSR), pio.fast_path(self.iobase + THR))
