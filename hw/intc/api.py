"""The two interfaces between interrupt controllers and the rest of the machine.

* :class:`InterruptController` is what a software vCPU asks at an instruction boundary: is an external
  interrupt pending, and which vector does acknowledging it give? The userspace local APIC implements it
  (consulting the PIC through LINT0 in ExtINT mode); a bare PIC implements it too for tiny boards.
* :class:`MsiSink` receives MSI-style messages (address, data): the IOAPIC turns pin changes into them and
  the accelerator delivers them (software CPU: the userspace LAPICs; KVM: ``KVM_SIGNAL_MSI``).
"""

from __future__ import annotations

from typing import Protocol


class InterruptController(Protocol):
    def interrupt_pending(self) -> bool:
        """True if a maskable external interrupt is ready to be taken (the CPU still checks RFLAGS.IF)."""
        ...

    def acknowledge_interrupt(self) -> int | None:
        """Take the highest-priority pending interrupt (INTA cycle) and return its vector, or None if it
        vanished meanwhile. The controller moves it to in-service; the guest ends it with an EOI."""
        ...


class MsiSink(Protocol):
    def deliver_msi(self, address: int, data: int) -> None:
        """Deliver one MSI message: ``address`` 0xFEExxxxx (destination, mode), ``data`` (vector, delivery
        mode, trigger)."""
        ...
