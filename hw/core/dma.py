"""Device access to guest RAM (DMA), with the one duty that plain memoryviews forget.

Device models read and write guest RAM zero-copy through :class:`~pyemu.system.memory.GuestMemory`
views, which are bounds-checked (an address outside RAM raises ``GuestMemoryError``, never touches host
memory). What a view cannot do is tell the software CPU that RAM changed behind its back: Unicorn keeps
translations of code pages that a device overwrote (a disk read loading a program), so a device reports
every range it wrote with :meth:`DmaMemory.wrote` and the accelerator drops stale code from it
(``Accelerator.invalidate_code``; a no-op under KVM, where the hardware keeps caches coherent).
"""

from __future__ import annotations

from collections.abc import Callable

from pyemu.system.memory import GuestMemory

Invalidate = Callable[[int, int], None]


class DmaMemory:
    """Guest RAM as devices see it. ``invalidate(gpa, size)`` is called for every range written."""

    __slots__ = ("memory", "_invalidate")

    def __init__(self, memory: GuestMemory, invalidate: Invalidate | None = None) -> None:
        self.memory = memory
        self._invalidate = invalidate

    def contains(self, gpa: int, size: int) -> bool:
        return size >= 0 and self.memory.contains(gpa, max(size, 1))

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of ``[gpa, gpa+size)``; ``GuestMemoryError`` if not wholly in one RAM region.
        A device that writes through it must call :meth:`wrote` afterwards."""
        return self.memory.view(gpa, size)

    def read(self, gpa: int, size: int) -> bytes:
        return self.memory.read(gpa, size)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.memory.write(gpa, data)
        self.wrote(gpa, len(data))

    def wrote(self, gpa: int, size: int) -> None:
        """``[gpa, gpa+size)`` was written by a device: translated code from it must go."""
        if self._invalidate is not None and size > 0:
            self._invalidate(gpa, size)
