"""Typed errors of the guest-program test kit."""

from __future__ import annotations

from pyemu.errors import PyemuError


class TestingError(PyemuError):
    """Root of the test kit's errors."""

    __test__ = False  # not a pytest test class


class AssemblyError(TestingError):
    """A guest program does not assemble, or assembles into something the kit refuses to run."""

    def __init__(self, message: str, *, section: str) -> None:
        super().__init__(f"{section}: {message}")
        self.section = section


class LayoutError(TestingError):
    """A guest program does not fit the test environment's memory layout."""
