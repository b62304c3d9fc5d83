"""The code map's bulk question for device DMA (``CodeMap.ranges_with_code``): which of a request's written
ranges may hold translated code. Answered in C for a whole request; it must name exactly the ranges the
per-range :meth:`CodeMap.has_code` names, whatever the ranges (several pages, empty, past the end of RAM,
at the top of the 64-bit space)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyemu.accel.tcg.block_gate import load_gate_module
from pyemu.accel.tcg.tlb_fill import CodeMap
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
