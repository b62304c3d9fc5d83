"""The Python side of ``vring.c``, the chain walk the C planes share (virtio-blk's data plane, virtio-net's
receive plane): its source, its structures for a plane's cdef, and the tables a plane's call carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyemu.hw.core.dma import DmaMemory

SOURCE = Path(__file__).with_name("vring.c")
CDEF = """
struct pyemu_vr_region { uint64_t gpa; uint64_t size; uint8_t *host; };
struct pyemu_vr_range { uint64_t start; uint64_t len; };
"""


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


def range_list(table: Any, count: int) -> list[tuple[int, int]]:
    """The first ``count`` entries of a ``pyemu_vr_range`` array as ``(start, length)`` pairs."""
    return [(table[i].start, table[i].len) for i in range(count)]
