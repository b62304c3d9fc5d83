"""Typed errors of the timer-device package (PIT, RTC/CMOS).

As for every device model, the guest cannot make these raise: they report the *board's* mistakes (CMOS
contents outside the RAM bytes, an impossible clock rate, a saved state that does not fit), found while the
machine is built or restored. They derive from :class:`~pyemu.errors.ConfigError` for one-line CLI reports.
"""

from __future__ import annotations

from pyemu.errors import ConfigError


class TimerDeviceError(ConfigError):
    """Root of the timer-device errors. ``device`` names the chip ("pit", "rtc")."""

    def __init__(self, message: str, *, device: str) -> None:
        super().__init__(message)
        self.device = device


class CmosContentsError(TimerDeviceError):
    """Board-supplied CMOS contents name a byte outside RAM (0x0e-0x7f) or a value outside 0-255."""

    def __init__(self, message: str, *, index: int, value: int) -> None:
        super().__init__(message, device="rtc")
        self.index = index
        self.value = value


class InvalidTimerStateError(TimerDeviceError):
    """A saved state handed to ``restore()`` does not fit this device."""
