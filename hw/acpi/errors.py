"""Typed errors of the ACPI package.

Everything here is built from board configuration, so every error is a configuration mistake caught before
the guest runs (a name that is not a valid AML NameSeg, an IRQ out of range, tables that do not fit the
address window). They derive from :class:`~pyemu.errors.ConfigError` so the CLI reports them as such.
"""

from __future__ import annotations

from pyemu.errors import ConfigError


class AcpiError(ConfigError):
    """Root of the ACPI errors."""


class AmlError(AcpiError):
    """A value cannot be encoded as AML (bad name, integer out of range, string with a NUL...)."""

    def __init__(self, message: str, *, value: object = None) -> None:
        super().__init__(message)
        self.value = value


class AcpiLayoutError(AcpiError):
    """The ACPI tables do not fit the guest-physical window the board gave them, or it is misaligned."""

    def __init__(self, message: str, *, address: int, size: int) -> None:
        super().__init__(message)
        self.address = address
        self.size = size
