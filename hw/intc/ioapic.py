"""I/O APIC (82093AA register interface, 24 pins) that turns pin levels into MSI messages.

One userspace model serves both accelerators: under KVM (split irqchip) its messages go to
``KVM_SIGNAL_MSI``; under the software CPU to the userspace :class:`~pyemu.hw.intc.lapic.LocalApic`. Either
way it only needs an :class:`~pyemu.hw.intc.api.MsiSink`, so it never knows which accelerator runs.

Registers: IOREGSEL at offset 0x00, IOWIN at 0x10 and, for version 0x20 (QEMU's default, which Linux uses
to end level-triggered interrupts explicitly), the EOI register at 0x40. The board maps 0x100 bytes at
0xfec00000.

Pin levels are *logical* (1 = asserted), the meaning :class:`~pyemu.hw.core.irq.IrqLine` gives them: a
device calls ``raise_irq()`` to request service whatever the wire's electrical polarity. So the polarity
bit of a redirection entry is stored and read back but does not invert the input, as in QEMU's IOAPIC;
the board's ACPI tables describe the electrical polarity to the guest.

Edges that arrive while a pin is masked are latched and delivered when it is unmasked (QEMU does the same,
and it saves a guest from losing a device interrupt that races its own reprogramming).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.hw.intc.api import MsiSink
from pyemu.hw.intc.apic_core import routes_changed
from pyemu.hw.intc.errors import InvalidPinError, InvalidPropertyError
from pyemu.system import log

IOAPIC_DEFAULT_BASE = 0xFEC00000
IOAPIC_MMIO_SIZE = 0x100
IOAPIC_PINS = 24

OFFSET_IOREGSEL = 0x00
OFFSET_IOWIN = 0x10
OFFSET_EOI = 0x40

INDEX_ID = 0x00
INDEX_VERSION = 0x01
INDEX_ARBITRATION = 0x02
INDEX_REDIRECTION = 0x10

# Redirection entry fields (low dword).
RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE_SHIFT = 8
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL_TRIGGER = 1 << 15
RTE_MASKED = 1 << 16
_RTE_LOW_WRITABLE = 0x1AFFF  # vector, delivery mode, dest mode, polarity, trigger, mask
_RTE_HIGH_WRITABLE = 0xFFFF0000  # destination (31:24) and the extended-destination byte QEMU keeps (23:16)

MSI_ADDRESS_BASE = 0xFEE00000
MSI_DEST_LOGICAL = 1 << 2
MSI_DATA_LEVEL_ASSERT = 1 << 14
MSI_DATA_LEVEL_TRIGGER = 1 << 15


#: Every bit a redirection entry can hold: what the guest may write plus remote IRR, which the IOAPIC sets.
_RTE_VALID = _RTE_LOW_WRITABLE | RTE_REMOTE_IRR | (_RTE_HIGH_WRITABLE << 32)


@dataclass(frozen=True, kw_only=True)
class IoApicState(DeviceState):
    """The IOAPIC as data. ``redirection`` holds the 64-bit entries; ``pin_levels`` the input levels (0/1);
    ``latched_edges`` one bit per pin for edges that arrived while it was masked."""

    VERSION: ClassVar[int] = 1

    ioregsel: int
    ioapic_id: int
    redirection: tuple[int, ...]
    pin_levels: tuple[int, ...]
    latched_edges: int


class IoApic:
    """24-pin IOAPIC. ``msi_sink`` receives one message per delivered interrupt."""

    def __init__(self, msi_sink: MsiSink, *, ioapic_id: int = 0, version: int = 0x20, pins: int = IOAPIC_PINS):
        if not 0 <= ioapic_id <= 0xF:
            raise InvalidPropertyError(f"ioapic: ID {ioapic_id} does not fit 4 bits", device="ioapic",
                                       name="ioapic_id", value=ioapic_id)
        if version not in (0x11, 0x20):
            raise InvalidPropertyError(f"ioapic: version {version:#x} is not 0x11 or 0x20", device="ioapic",
                                       name="version", value=version)
        if not 1 <= pins <= 240:
            raise InvalidPropertyError(f"ioapic: {pins} pins is out of range", device="ioapic", name="pins",
                                       value=pins)
        self.msi_sink = msi_sink
        self.version = version
        self.pins = pins
        self.initial_id = ioapic_id
        self._lines = tuple(IrqLine(partial(self.set_irq, n), f"ioapic-pin{n}") for n in range(pins))
        self.route_changed: Callable[[int, tuple[int, int] | None], None] | None = None
        """Told ``(pin, (address, data))`` or ``(pin, None)`` when masked, whenever the guest rewrites a
        redirection entry: an in-kernel LAPIC (KVM split irqchip) needs the routes to know which vectors
        are level-triggered and must exit on EOI."""
        self.reset()

    def reset(self) -> None:
        """Every entry masked, edge-triggered, vector 0; ID back to the board's value."""
        self.ioregsel = 0
        self.ioapic_id = self.initial_id
        self.redirection = [RTE_MASKED] * self.pins
        self._messages: list[tuple[int, int] | None] = [None] * self.pins
        """Each pin's MSI (:meth:`msi_message`) once computed, until its entry is rewritten."""
        self._levels = [0] * self.pins
        self._latched = 0  # edges that arrived while masked (bit per pin)
        routes_changed()

    @property
    def version_register(self) -> int:
        """Version register: maximum redirection entry in bits 23:16, version in 7:0 (0x170020 for 24)."""
        return ((self.pins - 1) << 16) | self.version

    # -- wiring ------------------------------------------------------------------------------------------
    def pin(self, n: int) -> IrqLine:
        """The input line of pin ``n`` (GSI n)."""
        if not 0 <= n < self.pins:
            raise InvalidPinError(f"ioapic: no pin {n} (pins 0-{self.pins - 1})", device="ioapic", pin=n,
                                  pins=self.pins)
        return self._lines[n]

    # -- bus interface -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == OFFSET_IOREGSEL:
            return self.ioregsel & ((1 << (8 * min(size, 4))) - 1)
        if offset == OFFSET_IOWIN:
            if size != 4:
                log.log("guest_errors", f"ioapic: {size}-byte read of IOWIN (must be 32-bit)")
            return self._read_indirect(self.ioregsel) & ((1 << (8 * min(size, 4))) - 1)
        log.log("guest_errors", f"ioapic: read of unimplemented offset {offset:#x}")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == OFFSET_IOREGSEL:
            self.ioregsel = value & 0xFF
        elif offset == OFFSET_IOWIN:
            if size != 4:
                log.log("guest_errors", f"ioapic: ignored {size}-byte write to IOWIN (must be 32-bit)")
                return
            self._write_indirect(self.ioregsel, value & 0xFFFFFFFF)
        elif offset == OFFSET_EOI and self.version >= 0x20:
            self.eoi(value & 0xFF)
        else:
            log.log("guest_errors", f"ioapic: write {value:#x} to unimplemented offset {offset:#x} ignored")

    def _read_indirect(self, index: int) -> int:
        if index == INDEX_ID:
            return self.ioapic_id << 24
        if index == INDEX_VERSION:
            return self.version_register
        if index == INDEX_ARBITRATION:
            return self.ioapic_id << 24  # loaded from the ID; only meaningful on the old serial APIC bus
        pin, high = self._entry_index(index)
        if pin is None:
            log.log("guest_errors", f"ioapic: read of unimplemented register index {index:#x}")
            return 0
        entry = self.redirection[pin]
        return (entry >> 32) if high else (entry & 0xFFFFFFFF)

    def _write_indirect(self, index: int, value: int) -> None:
        if index == INDEX_ID:
            self.ioapic_id = (value >> 24) & 0xF
            return
        if index in (INDEX_VERSION, INDEX_ARBITRATION):
            log.log("guest_errors", f"ioapic: write {value:#x} to read-only register {index:#x} ignored")
            return
        pin, high = self._entry_index(index)
        if pin is None:
            log.log("guest_errors", f"ioapic: write {value:#x} to unimplemented register {index:#x} ignored")
            return
        entry = self.redirection[pin]
        if high:
            entry = (entry & 0xFFFFFFFF) | ((value & _RTE_HIGH_WRITABLE) << 32)
        else:
            entry = (entry & ~_RTE_LOW_WRITABLE) | (value & _RTE_LOW_WRITABLE)
            if not entry & RTE_LEVEL_TRIGGER:
                # Switching to edge clears remote IRR: the 82093AA trick Linux uses to end a level
                # interrupt on version-0x11 IOAPICs that have no EOI register.
                entry &= ~RTE_REMOTE_IRR
        self.redirection[pin] = entry
        self._messages[pin] = None
        routes_changed()
        if self.route_changed is not None:
            self.route_changed(pin, None if entry & RTE_MASKED else self.msi_message(pin))
        self._service(pin)

    def _entry_index(self, index: int) -> tuple[int | None, bool]:
        if INDEX_REDIRECTION <= index < INDEX_REDIRECTION + 2 * self.pins:
            return (index - INDEX_REDIRECTION) >> 1, bool(index & 1)
        return None, False

    # -- pins and delivery -------------------------------------------------------------------------------
    def set_irq(self, n: int, level: int) -> None:
        """Input ``n`` changed to ``level`` (also the handler behind :meth:`pin`)."""
        if not 0 <= n < self.pins:
            log.log("guest_errors", f"ioapic: level change on nonexistent pin {n}")
            return
        level = 1 if level else 0
        old = self._levels[n]
        self._levels[n] = level
        entry = self.redirection[n]
        if entry & RTE_LEVEL_TRIGGER:
            if level:
                self._service(n)
        elif level and not old:
            if entry & RTE_MASKED:
                self._latched |= 1 << n
            else:
                self._send(n)

    def _service(self, n: int) -> None:
        """Deliver whatever pin ``n`` has to deliver now (after an unmask, an EOI or a level change)."""
        entry = self.redirection[n]
        if entry & RTE_MASKED:
            return
        if entry & RTE_LEVEL_TRIGGER:
            self._latched &= ~(1 << n)
            if self._levels[n] and not entry & RTE_REMOTE_IRR:
                self.redirection[n] = entry | RTE_REMOTE_IRR
                self._send(n)
        elif self._latched & (1 << n):
            self._latched &= ~(1 << n)
            self._send(n)

    def _send(self, n: int) -> None:
        message = self._messages[n]
        if message is None:
            message = self._messages[n] = self.msi_message(n)
        address, data = message
        if log.enabled("int"):
            log.log("int", f"ioapic: pin {n} -> MSI address {address:#x} data {data:#x}")
        self.msi_sink.deliver_msi(address, data)

    def edge_route(self, n: int) -> tuple[Any, int] | None:
        """``(apic, vector)`` when pin ``n`` delivers a fixed, edge-triggered interrupt to one APIC that
        accepts it (the sink's :meth:`fixed_target`), else None: what a device may post without the pulse
        (:class:`~pyemu.hw.intc.apic_core.NativeRoute`) until :func:`routes_changed` says otherwise."""
        entry = self.redirection[n]
        if entry & (RTE_MASKED | RTE_LEVEL_TRIGGER) or (entry >> RTE_DELIVERY_MODE_SHIFT) & 7:
            return None
        target = getattr(self.msi_sink, "fixed_target", None)
        if target is None:
            return None
        address, data = self.msi_message(n)
        apic = target(address, data)
        return None if apic is None else (apic, entry & RTE_VECTOR)

    def msi_message(self, n: int) -> tuple[int, int]:
        """The (address, data) pair pin ``n``'s redirection entry describes."""
        entry = self.redirection[n]
        destination = (entry >> 56) & 0xFF
        address = MSI_ADDRESS_BASE | (destination << 12)
        if entry & RTE_DEST_LOGICAL:
            address |= MSI_DEST_LOGICAL
        data = (entry & RTE_VECTOR) | (((entry >> RTE_DELIVERY_MODE_SHIFT) & 7) << 8)
        if entry & RTE_LEVEL_TRIGGER:
            data |= MSI_DATA_LEVEL_TRIGGER | MSI_DATA_LEVEL_ASSERT
        return address, data

    def eoi(self, vector: int) -> None:
        """A local APIC ended ``vector`` (EOI broadcast) or the guest wrote the EOI register: clear remote
        IRR of the level-triggered pins using it and re-deliver those whose input is still asserted."""
        for n, entry in enumerate(self.redirection):
            if entry & RTE_LEVEL_TRIGGER and entry & RTE_REMOTE_IRR and entry & RTE_VECTOR == vector:
                self.redirection[n] = entry & ~RTE_REMOTE_IRR
                self._service(n)

    # -- state -------------------------------------------------------------------------------------------
    def state(self) -> IoApicState:
        """The registers, input levels and latched edges now (the IOAPIC has no timers)."""
        return IoApicState(
            ioregsel=self.ioregsel,
            ioapic_id=self.ioapic_id,
            redirection=tuple(self.redirection),
            pin_levels=tuple(self._levels),
            latched_edges=self._latched,
        )

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state. It must describe an IOAPIC with this many pins and only values the registers
        can hold; otherwise :class:`StateError` and nothing changes. Nothing is delivered here: a restored
        state already records what was delivered (remote IRR) and what is waiting (latched edges)."""
        s = check_state("ioapic", state, IoApicState)
        check_range("ioapic", "ioregsel", s.ioregsel, 0, 0xFF)
        check_range("ioapic", "ioapic_id", s.ioapic_id, 0, 0xF)
        for field_name, values in (("redirection", s.redirection), ("pin_levels", s.pin_levels)):
            if not isinstance(values, tuple):
                raise StateError("ioapic", f"{field_name} must be a tuple, not {type(values).__name__}")
            if len(values) != self.pins:
                raise StateError("ioapic", f"{field_name} has {len(values)} entries, this IOAPIC has {self.pins} pins")
        for n, entry in enumerate(s.redirection):
            check_range("ioapic", f"redirection[{n}]", entry, 0, (1 << 64) - 1)
            if entry & ~_RTE_VALID:
                raise StateError("ioapic", f"redirection[{n}]={entry:#x} sets reserved bits")
        for n, level in enumerate(s.pin_levels):
            check_range("ioapic", f"pin_levels[{n}]", level, 0, 1)
        check_range("ioapic", "latched_edges", s.latched_edges, 0, (1 << self.pins) - 1)
        self.ioregsel = s.ioregsel
        self.ioapic_id = s.ioapic_id
        self.redirection = list(s.redirection)
        self._messages = [None] * self.pins
        self._levels = list(s.pin_levels)
        self._latched = s.latched_edges
        routes_changed()
