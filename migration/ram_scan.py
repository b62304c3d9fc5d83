"""Finding the RAM a save has to write: the populated parts of a region, and the runs of pages in a chunk
that differ from what the destination already holds.

Every way of saving RAM (stop-and-copy, pre-copy's first round and its shadow comparison, the mapped-ram
file) walks RAM through these two functions, so the cost of the walk is paid in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol

from pyemu.migration.stream import RAM_CHUNK

if TYPE_CHECKING:
    from pyemu.system.memory import GuestMemory, RamRegion

PAGE = 4096
ZERO_PAGE = bytes(PAGE)


class ZeroPageCount(Protocol):
    zero_pages: int


def populated_chunks(memory: GuestMemory, region: RamRegion, stats: ZeroPageCount,
                     limit: int = RAM_CHUNK) -> Iterator[tuple[int, int]]:
    """``(gpa, size)`` pieces of at most ``limit`` bytes covering the parts of ``region`` that may hold
    data (:meth:`~pyemu.system.memory.GuestMemory.populated_spans`); the pages left out are holes, which
    read zero, and are counted as zero pages in ``stats`` (QEMU's ``duplicate``) without being touched."""
    covered = 0
    for gpa, size in memory.populated_spans(region):
        covered += size
        for start in range(0, size, limit):
            yield gpa + start, min(limit, size - start)
    stats.zero_pages += (region.size - covered) // PAGE


def changed_runs(chunk: bytes, reference: bytes | memoryview | None = None) -> Iterator[tuple[int, int]]:
    """``(start, end)`` byte offsets of the runs of whole pages of ``chunk`` that differ from
    ``reference`` (zero pages when it is None), in order. ``chunk`` is ``bytes`` so each page compares
    at memcmp speed."""
    size = len(chunk)
    run_start: int | None = None
    for page in range(0, size, PAGE):
        if reference is None:
            changed = chunk[page:page + PAGE] != ZERO_PAGE
        else:
            changed = chunk[page:page + PAGE] != reference[page:page + PAGE]
        if changed:
            if run_start is None:
                run_start = page
        elif run_start is not None:
            yield run_start, page
            run_start = None
    if run_start is not None:
        yield run_start, size
