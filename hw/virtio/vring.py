"""The Python side of ``vring.c``, the chain walk the C planes share (virtio-blk's data plane, virtio-net's
receive plane): its source, its structures for a plane's cdef, the tables and ring fields a plane's call
carries, and the build-at-first-use of a plane's module with its switch for comparisons."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio.queue import Virtqueue
from pyemu.system.native import OptionalNative

SOURCE = Path(__file__).with_name("vring.c")
CDEF = """
struct pyemu_vr_region { uint64_t gpa; uint64_t size; uint8_t *host; };
struct pyemu_vr_range { uint64_t start; uint64_t len; };
struct pyemu_vr_queue {
    const struct pyemu_vr_region *ram;
    uint32_t nram;
    uint64_t desc, avail, used;
    uint32_t size;
    int32_t indirect, event_idx;
};
"""


class NativePlane:
    """A plane's C module: ``vring.c`` followed by ``source``, built at first use (:class:`~pyemu.system.native.OptionalNative`) and
    loaded once per process. ``switch`` names the environment variable that turns the plane off (``0``)
    for comparisons with the Python path; ``what`` names the plane in messages."""

    def __init__(self, prefix: str, source: Path, cdef: str, *, what: str, switch: str) -> None:
        self._native = OptionalNative(prefix, [SOURCE, source], CDEF + cdef, what=what,
                                      without="the Python path serves")
        self._switch = switch

    def enabled(self) -> bool:
        """Whether devices use the plane (the switch unset, or anything but off)."""
        return os.environ.get(self._switch, "1") not in ("0", "no", "off", "false")

    def load(self) -> ModuleType | None:
        """The compiled plane, or None when it failed to build (logged once under ``-d unimp``; the Python
        path serves everything then)."""
        return self._native.get()

    def module_for_a_device(self) -> ModuleType | None:
        """What a device asks once, at its first use of the plane: the module, or None when the plane is
        switched off or cannot be built."""
        return self.load() if self.enabled() else None


def ring_fields(queue: Virtqueue) -> tuple[int, int, int, int, bool, bool]:
    """What a plane's call carries about ``queue``'s rings, in :func:`set_ring_fields`'s order (a call
    compares it with the last one's: setting a cffi field costs about as much as a Python call)."""
    return (queue.desc_addr, queue.avail_addr, queue.used_addr, queue.size, queue.indirect, queue.event_idx)


def set_ring_fields(queue: Any, fields: tuple[int, int, int, int, bool, bool]) -> None:
    """Store :func:`ring_fields` into a call's ``struct pyemu_vr_queue`` (``desc``, ``avail``, ``used``,
    ``size``, ``indirect``, ``event_idx``)."""
    queue.desc, queue.avail, queue.used, queue.size, queue.indirect, queue.event_idx = fields


def ram_regions(ffi: Any, dma: DmaMemory) -> Any:
    """Guest RAM's regions as the C array the walk checks every address against (made once: RAM stays
    mapped at one address for the VM's life)."""
    memory = dma.memory
    regions = memory.regions
    table = ffi.new("struct pyemu_vr_region[]", len(regions))
    for slot, region in zip(table, regions):
        slot.gpa = region.gpa
        slot.size = region.size
        slot.host = ffi.cast("uint8_t *", memory.host_address(region))
    return table


class WrittenRanges:
    """A plane's table of the guest ranges it wrote, and what of it the DMA layer must hear: only the
    ranges from the first that the accelerator's :class:`~pyemu.hw.core.dma.WriteScreen` picks (all of
    them without a screen). The screen reads the C table in place, so a request that wrote no code
    costs one C call instead of a Python tuple per page (~90 µs for a 1 MiB read's 256 pages)."""

    def __init__(self, ffi: Any, dma: DmaMemory, capacity: int) -> None:
        self.table = ffi.new("struct pyemu_vr_range[]", capacity)
        self._pairs = ffi.cast("const uint64_t *", self.table)
        screen = dma.write_screen()
        self._first: Any = None
        self._state: Any = None
        if screen is not None:
            self._first = ffi.cast("int64_t (*)(const void *, const uint64_t *, uint64_t)", screen.function)
            self._state = ffi.cast("const void *", screen.state)
        self.reported = 0
        self.screened = 0
        """Ranges handed to the DMA layer and ranges the screen kept from it (tests, benchmarks)."""

    def wire_screen(self, call: Any) -> None:
        """Hand the screen to a plane's call structure (its ``screen`` and ``screen_state`` fields), for a
        plane that publishes what nobody needs to hear of itself (NULL without a screen)."""
        if self._first is not None:
            call.screen = self._first
            call.screen_state = self._state

    def to_report(self, count: int) -> list[tuple[int, int]]:
        """Of the first ``count`` ranges written, those the DMA layer must be told of."""
        if count <= 0:
            return []
        first = 0 if self._first is None else int(self._first(self._state, self._pairs, count))
        if first < 0:
            first = count
        self.screened += first
        self.reported += count - first
        return range_list(self.table, count, first)


def range_list(table: Any, count: int, first: int = 0) -> list[tuple[int, int]]:
    """Entries ``first`` to ``count`` of a ``pyemu_vr_range`` array as ``(start, length)`` pairs."""
    return [(table[i].start, table[i].len) for i in range(first, count)]
