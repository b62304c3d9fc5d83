"""Typed errors of the interrupt-controller package.

Guest mistakes never raise: a bad register write is ignored or logged under ``-d guest_errors``, because a
real chip does not stop the machine either. What raises is the *board's* mistakes, found while the machine
is being built or restored: a pin number the chip does not have, an impossible property, a saved state that
does not fit. They derive from :class:`~pyemu.errors.ConfigError` so the CLI reports them in one line.
"""

from __future__ import annotations

from pyemu.errors import ConfigError


class InterruptControllerError(ConfigError):
    """Root of the interrupt-controller errors. ``device`` names the chip ("ioapic", "lapic", "pic")."""

    def __init__(self, message: str, *, device: str) -> None:
        super().__init__(message)
        self.device = device


class InvalidPinError(InterruptControllerError):
    """A board asked for an input pin the chip does not have."""

    def __init__(self, message: str, *, device: str, pin: int, pins: int) -> None:
        super().__init__(message, device=device)
        self.pin = pin
        self.pins = pins


class InvalidPropertyError(InterruptControllerError):
    """A constructor property is out of range (APIC ID above 255, zero crystal frequency...)."""

    def __init__(self, message: str, *, device: str, name: str, value: object) -> None:
        super().__init__(message, device=device)
        self.name = name
        self.value = value


class InvalidStateError(InterruptControllerError):
    """A saved state handed to ``restore()`` does not fit this chip (wrong pin count, bad field)."""
