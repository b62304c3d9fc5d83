"""convert's zero detection (-S): the quick tests in front of the block walk never change its answer.

``_runs`` answers "all data" without walking when no block can be all zeros, judged by each whole block's
first eight bytes and the partial blocks at either end; these properties hold it to the walk itself on
buffers made of zero blocks, data blocks, data blocks whose first word is zero, and blocks with one non-zero
byte anywhere, at aligned and odd offsets."""

from __future__ import annotations

import mmap

from hypothesis import given, settings
from hypothesis import strategies as st

from pyemu.img.convert import _runs, _walk

PIECES = {
    "zero": lambda size, at: bytes(size),
    "data": lambda size, at: bytes((7 * i + 1) % 251 + 1 for i in range(size)),
    "zero head": lambda size, at: bytes(min(8, size)) + b"\x5a" * max(0, size - 8),
    "one byte": lambda size, at: bytes(at % size) + b"\x01" + bytes(size - at % size - 1),
}


@st.composite
def buffers(draw: st.DrawFn) -> tuple[bytearray, int, int, int, int]:
    block = draw(st.sampled_from([512, 1024, 4096, 1000, 12]))
    sizes = st.one_of(st.integers(1, 2 * block), st.integers(1, 4).map(lambda k: k * block))
    pieces = draw(st.lists(st.tuples(st.sampled_from(sorted(PIECES)), sizes, st.integers(0, 1 << 16)),
                           min_size=1, max_size=12))
    data = bytearray()
    for kind, size, at in pieces:
        data += PIECES[kind](size, at)
    lo = draw(st.integers(0, len(data) - 1))
    hi = draw(st.integers(lo + 1, len(data)))
    base = draw(st.one_of(st.just(0), st.integers(0, 4 * block).map(lambda x: x * 8), st.integers(0, 1 << 20)))
    return data, lo, hi, block, base


@settings(max_examples=400, deadline=None)
@given(buffers())
def test_quick_answers_are_the_walks(case: tuple[bytearray, int, int, int, int]) -> None:
    data, lo, hi, block, base = case
    assert list(_runs(data, lo, hi, block, base)) == list(_walk(memoryview(data)[lo:hi], block, base))


def test_a_zero_block_behind_a_data_head_is_found_in_an_mmap_buffer() -> None:
    """The convert's buffers are page-aligned mmaps; a 4 KiB zero block between data blocks is reported
    wherever it sits, and only the data blocks are data."""
    size = 1 << 20
    buffer = mmap.mmap(-1, size)
    buffer[:] = bytes((i % 255) + 1 for i in range(256)) * (size // 256)
    hole = 77 * 4096
    buffer[hole:hole + 4096] = bytes(4096)
    assert list(_runs(buffer, 0, size, 4096, 0)) == [(0, hole, False), (hole, 4096, True),
                                                    (hole + 4096, size - hole - 4096, False)]
    # The same hole is not a whole block when the target offsets are shifted by 512: no zero run.
    assert list(_runs(buffer, 0, size, 4096, 512)) == [(0, size, False)]
