"""Device access to guest RAM (DMA), with the one duty that plain memoryviews forget.

Device models read and write guest RAM zero-copy through :class:`~pyemu.system.memory.GuestMemory`
views, which are bounds-checked (an address outside RAM raises ``GuestMemoryError``, never touches host
memory). What a view cannot do is tell the software CPU that RAM changed behind its back: Unicorn keeps
translations of code pages that a device overwrote (a disk read loading a program), so a device reports
every range it wrote with :meth:`DmaMemory.wrote` and the accelerator drops stale code from it
(``Accelerator.invalidate_code``; a no-op under KVM, where the hardware keeps caches coherent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from pyemu.system.memory import GuestMemory

Invalidate = Callable[[int, int], None]
InvalidateRanges = Callable[[Sequence[tuple[int, int]]], None]


class WriteScreen(NamedTuple):
    """A C function that tells a device's C code which of its written ranges the accelerator must hear
    of: ``int64_t function(const void *state, const uint64_t *pairs, uint64_t count)`` over ``count``
    ``(gpa, size)`` pairs returns the index of the first range to report (every one from there on is
    reported) or -1 for none. It runs without the GIL on any thread.

    Why: a 1 MiB disk read writes 256 scattered guest pages, almost never code; turning them into Python
    tuples only for the accelerator to find no code in them cost the I/O thread ~90 µs per request under
    the software CPU (measured 2026-12-07). Addresses are plain integers so device code needs nothing of
    the accelerator's."""

    function: int
    state: int


ScreenSource = Callable[[], "WriteScreen | None"]


class DmaMemory:
    """Guest RAM as devices see it. ``invalidate(gpa, size)`` is called for every range written, or
    ``invalidate_ranges(ranges)`` once for a request's ranges when the accelerator offers it (a block
    request writes up to 256 scattered pages, and one call for all of them is far cheaper). ``screen()``
    gives a device's C code the accelerator's :class:`WriteScreen`, or None when every range must be
    reported."""

    __slots__ = ("memory", "_invalidate", "_invalidate_ranges", "_screen", "spans")

    def __init__(self, memory: GuestMemory, invalidate: Invalidate | None = None,
                 invalidate_ranges: InvalidateRanges | None = None, screen: ScreenSource | None = None) -> None:
        self.memory = memory
        self._invalidate = invalidate
        self._invalidate_ranges = invalidate_ranges
        self._screen = screen
        self.spans = memory.spans
        """RAM as ``(start, end)`` pairs: a hot loop (the virtqueue walk) checks bounds inline with them."""

    @classmethod
    def wired_to(cls, memory: GuestMemory, accelerator: object) -> DmaMemory:
        """Guest RAM as a board hands it to its devices, with whichever of ``invalidate_code``,
        ``invalidate_code_ranges`` and ``dma_write_screen`` the accelerator offers (by name: device code
        never imports an accelerator)."""
        return cls(memory, getattr(accelerator, "invalidate_code", None),
                   getattr(accelerator, "invalidate_code_ranges", None),
                   getattr(accelerator, "dma_write_screen", None))

    def write_screen(self) -> WriteScreen | None:
        """The accelerator's screen for ranges a device's C code wrote (asked when the device sets its C
        code up: the accelerator may make it only with its first vCPU), or None: report every range."""
        return self._screen() if self._screen is not None else None

    def contains(self, gpa: int, size: int) -> bool:
        return size >= 0 and self.memory.contains(gpa, max(size, 1))

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of ``[gpa, gpa+size)``; ``GuestMemoryError`` if not wholly in one RAM region.
        A device that writes through it must call :meth:`wrote` afterwards."""
        return self.memory.view(gpa, size)

    def views(self, ranges: Sequence[tuple[int, int]]) -> list[memoryview]:
        """Views of several ranges at once (all checked before any is returned); same rules as :meth:`view`."""
        return self.memory.views(ranges)

    def read(self, gpa: int, size: int) -> bytes:
        return self.memory.read(gpa, size)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.memory.write(gpa, data)
        self.wrote(gpa, len(data))

    def wrote(self, gpa: int, size: int) -> None:
        """``[gpa, gpa+size)`` was written by a device: translated code from it must go."""
        if size > 0:
            self.wrote_ranges(((gpa, size),))

    def wrote_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Every ``(gpa, size)`` in ``ranges`` was written by a device (one report for a whole request)."""
        if self._invalidate_ranges is not None:
            self._invalidate_ranges(ranges)
        elif self._invalidate is not None:
            for gpa, size in ranges:
                if size > 0:
                    self._invalidate(gpa, size)
