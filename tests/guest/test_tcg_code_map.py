"""The code map's bulk question for device DMA (``CodeMap.ranges_with_code``, and the C planes' write screen
``CodeMap.write_screen``): which of a request's written ranges may hold translated code. Answered in C for a whole request; it must name exactly the ranges the
per-range :meth:`CodeMap.has_code` names, whatever the ranges (several pages, empty, past the end of RAM,
at the top of the 64-bit space)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyemu.accel.tcg.block_gate import load_gate_module
from pyemu.accel.tcg.tlb_fill import CodeMap
from pyemu.hw.core.dma import WriteScreen
from pyemu.hw.virtio import blk_plane
from pyemu.hw.virtio.vring import WrittenRanges
from pyemu.system.memory import GuestMemory

RAM = 1 << 20  # 256 pages
PAGES = RAM >> 12


@pytest.fixture(scope="module")
def code_map() -> Iterator[CodeMap]:
    memory = GuestMemory([(0, RAM)], name="code-map-test")
    yield CodeMap(memory, load_gate_module())
    memory.close()


addresses = st.one_of(st.integers(0, RAM + 0x3000), st.integers((1 << 64) - 0x3000, (1 << 64) - 1))
sizes = st.one_of(st.just(0), st.integers(1, 0x3000), st.just(4096))


@settings(max_examples=300, deadline=None)
@given(code_pages=st.sets(st.integers(0, PAGES - 1), max_size=6),
       ranges=st.lists(st.tuples(addresses, sizes), max_size=40))
def test_bulk_answer_matches_the_per_range_one(code_map: CodeMap, code_pages: set[int],
                                              ranges: list[tuple[int, int]]) -> None:
    owners = code_map._owner_bytes
    owners[:] = bytes(PAGES)
    for page in code_pages:
        owners[page] = 1
    ranges = [(gpa, min(size, (1 << 64) - gpa)) for gpa, size in ranges]  # inside the 64-bit space
    expected = [(gpa, size) for gpa, size in ranges if size > 0 and code_map.has_code(gpa, size)]
    assert code_map.ranges_with_code(ranges) == expected
    assert code_map.ranges_with_code(tuple(ranges)) == expected


def test_a_request_of_scattered_pages_without_code_has_none(code_map: CodeMap) -> None:
    owners = code_map._owner_bytes
    owners[:] = bytes(PAGES)
    owners[200] = 2
    pages = [(page << 12, 4096) for page in range(0, 200, 3)]
    assert code_map.ranges_with_code(pages) == []
    assert code_map.ranges_with_code(pages + [(200 << 12 | 0xFFF, 1)]) == [(200 << 12 | 0xFFF, 1)]
    assert code_map.ranges_with_code([(199 << 12, 4097)]) == [(199 << 12, 4097)]  # ends on the code page


class _Dma:
    """What :class:`~pyemu.hw.virtio.vring.WrittenRanges` asks of the DMA layer: the accelerator's screen."""

    def __init__(self, screen: WriteScreen | None) -> None:
        self._screen = screen

    def write_screen(self) -> WriteScreen | None:
        return self._screen


def _written(screen: WriteScreen | None, ranges: list[tuple[int, int]]) -> WrittenRanges:
    module = blk_plane.PLANE.load()
    assert module is not None
    written = WrittenRanges(module.ffi, _Dma(screen), max(len(ranges), 1))  # type: ignore[arg-type]
    for slot, (gpa, size) in zip(written.table, ranges):
        slot.start, slot.len = gpa, size
    return written


@settings(max_examples=200, deadline=None)
@given(code_pages=st.sets(st.integers(0, PAGES - 1), max_size=4),
       ranges=st.lists(st.tuples(st.integers(0, RAM + 0x3000), sizes), max_size=40))
def test_a_planes_screened_report_keeps_every_range_with_code(code_map: CodeMap, code_pages: set[int],
                                                              ranges: list[tuple[int, int]]) -> None:
    """A C plane's written ranges through the DMA write screen: what reaches the DMA layer is every range
    from the first with code on (so each range with code, in order), nothing when none has code."""
    owners = code_map._owner_bytes
    owners[:] = bytes(PAGES)
    for page in code_pages:
        owners[page] = 1
    with_code = [index for index, (gpa, size) in enumerate(ranges) if size > 0 and code_map.has_code(gpa, size)]
    written = _written(code_map.write_screen, ranges)
    expected = ranges[with_code[0]:] if with_code else []
    assert written.to_report(len(ranges)) == expected
    assert (written.screened, written.reported) == (len(ranges) - len(expected), len(expected))
    assert _written(None, ranges).to_report(len(ranges)) == ranges  # no screen: everything


def test_the_screen_reports_everything_while_the_dirty_log_runs(code_map: CodeMap) -> None:
    """Live migration must hear of every page a device wrote, code or not."""
    owners = code_map._owner_bytes
    owners[:] = bytes(PAGES)
    pages = [(page << 12, 4096) for page in range(0, 64, 2)]
    assert _written(code_map.write_screen, pages).to_report(len(pages)) == []
    code_map.dirty.set_logging(True)
    try:
        assert _written(code_map.write_screen, pages).to_report(len(pages)) == pages
    finally:
        code_map.dirty.set_logging(False)
    assert _written(code_map.write_screen, pages).to_report(0) == []
