"""The two interfaces between interrupt controllers and the rest of the machine.

* :class:`InterruptController` is what a software vCPU asks at an instruction boundary: is an external
  interrupt pending, and which vector does acknowledging it give? The userspace local APIC implements it
  (consulting the PIC through LINT0 in ExtINT mode); a bare PIC implements it too for tiny boards.
* :class:`ProcessorSignals` is the other half of what a software vCPU asks its local APIC: the events that
  are not vectored interrupts (NMI, INIT, start-up IPI). They are taken whatever RFLAGS.IF says, which is
  why they are separate from :class:`InterruptController` and why the APIC wakes the vCPU for them through
  its own callback (``event_kick``) rather than the one for maskable interrupts.
* :class:`MsiSink` receives MSI-style messages (address, data): the IOAPIC turns pin changes into them and
  the accelerator delivers them (software CPU: the userspace LAPICs, through the APIC bus when there are
  several CPUs; KVM: ``KVM_SIGNAL_MSI``).
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


class ProcessorSignals(Protocol):
    """Non-maskable processor events latched by a local APIC until its CPU takes them.

    Each ``take_*`` reports an event once and clears it, so a vCPU can poll them at every stop. When
    several are pending, take INIT first, then the start-up IPI: an INIT discards any start-up IPI that
    arrived before it (as on KVM), so a start-up vector still latched after an INIT came after it.
    """

    def take_nmi(self) -> bool:
        """True (once) if an NMI arrived since the last call; the CPU delivers vector 2 itself, unless it
        is already handling an NMI (NMI blocking is the CPU's business, not the APIC's)."""
        ...

    def take_init(self) -> bool:
        """True (once) if an INIT message arrived since the last call. The APIC has already performed its
        own INIT reset (registers back to power-up values, APIC ID kept); the CPU resets its registers and
        enters the wait-for-SIPI state (a boot CPU simply restarts at the reset vector)."""
        ...

    def take_startup(self) -> int | None:
        """The vector (0-255) of the latest start-up IPI received since the last call, once; None if none.
        A CPU in wait-for-SIPI starts real-mode execution at ``vector << 12``; any other CPU ignores it."""
        ...


class MsiSink(Protocol):
    def deliver_msi(self, address: int, data: int) -> None:
        """Deliver one MSI message: ``address`` 0xFEExxxxx (destination, mode), ``data`` (vector, delivery
        mode, trigger)."""
        ...
