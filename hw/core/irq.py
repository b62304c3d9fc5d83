"""Interrupt lines as injected objects.

A device model holds an :class:`IrqLine` and sets its level; it never knows who listens. The board wires
the line to an interrupt controller input (IOAPIC pin, PIC pin, or both through :func:`fanout`). This is
QEMU's qemu_irq: a callback taking the new level.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from pyemu.system.event_notifier import EventNotifier

IrqHandler = Callable[[int], None]


class IrqLine:
    """One interrupt wire. ``handler(level)`` is called on every :meth:`set_level`, even if unchanged,
    because edge-triggered controllers count pulses."""

    __slots__ = ("name", "_handler", "level")

    def __init__(self, handler: IrqHandler | None = None, name: str = "irq") -> None:
        self.name = name
        self._handler = handler
        self.level = 0

    def connect(self, handler: IrqHandler | None) -> None:
        """Attach (or detach with None) the receiving end."""
        self._handler = handler

    def set_level(self, level: int | bool) -> None:
        self.level = 1 if level else 0
        if self._handler is not None:
            self._handler(self.level)

    def raise_irq(self) -> None:
        self.set_level(1)

    def lower_irq(self) -> None:
        self.set_level(0)

    def pulse(self) -> None:
        """Raise then lower: an edge for edge-triggered inputs."""
        self.set_level(1)
        self.set_level(0)


def fanout(*lines: IrqLine, name: str = "fanout") -> IrqLine:
    """A line that drives several others, e.g. an ISA IRQ wired to both the PIC and the IOAPIC."""

    def drive(level: int) -> None:
        for line in lines:
            line.set_level(level)

    return IrqLine(drive, name)


class EdgeInterrupt(Protocol):
    """An interrupt a device signals by events rather than levels (virtio-mmio on microvm, as Firecracker
    wires it): each :meth:`trigger` is one edge. Thread-safe: I/O threads call it."""

    def trigger(self) -> None: ...


class PulseInterrupt:
    """An edge on an :class:`IrqLine` (to the userspace IOAPIC), pulsed under ``lock``: the interrupt
    controller models are register machines serialised by the board's lock, so an I/O thread takes it
    for the pulse alone, never for its queue work.

    ``edge_target``: where the pulse would land now, ``(apic, vector)`` for a fixed edge to one APIC
    (the IOAPIC's :meth:`~pyemu.hw.intc.ioapic.IoApic.edge_route` of the pin), or None; a device whose C
    code posts interrupts itself aims its route with it (:class:`~pyemu.hw.intc.apic_core.NativeRoute`)."""

    __slots__ = ("_line", "_lock", "count", "edge_target")

    def __init__(self, line: IrqLine, lock: AbstractContextManager[object],
                 edge_target: Callable[[], tuple[Any, int] | None] | None = None) -> None:
        self._line = line
        self._lock = lock
        self.count = 0
        self.edge_target = edge_target

    def trigger(self) -> None:
        with self._lock:
            self._line.pulse()
        self.count += 1


class NotifierInterrupt:
    """An edge through an event notifier that the accelerator reads itself (a KVM irqfd): injecting
    costs one eventfd write on the I/O thread and no lock at all."""

    __slots__ = ("_notifier", "count")

    def __init__(self, notifier: "EventNotifier") -> None:
        self._notifier = notifier
        self.count = 0

    def trigger(self) -> None:
        self._notifier.set()
        self.count += 1
