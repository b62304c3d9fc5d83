"""block/buffers.py: aligned I/O buffers and the memcmp-speed comparisons convert, compare and rebase use."""

from __future__ import annotations

import ctypes
import mmap

from hypothesis import given, settings
from hypothesis import strategies as st

from pyemu.system.buffers import CACHE_LINE, io_buffer, is_zero, same_bytes


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_io_buffers_start_on_a_cache_line_and_read_as_zeros() -> None:
    for size in (1, 63, 4096, 65537, 1 << 20, 3 << 20):
        buf = io_buffer(size)
        assert buf.nbytes == size and not buf.readonly
        assert address(buf) % CACHE_LINE == 0
        assert bytes(buf) == bytes(size)


def test_an_io_buffer_of_nothing_is_empty() -> None:
    assert io_buffer(0).nbytes == 0


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 3 << 20), where=st.one_of(st.none(), st.integers(0, (3 << 20) - 1)),
       value=st.integers(1, 255))
def test_is_zero_matches_a_byte_by_byte_answer(size: int, where: int | None, value: int) -> None:
    buf = io_buffer(size)
    if where is not None and where < size:
        buf[where] = value
    expected = not any(bytes(buf))
    assert is_zero(buf) is expected
    assert is_zero(bytes(buf)) is expected
    assert is_zero(bytearray(buf)) is expected


def test_is_zero_reads_read_only_mappings() -> None:
    zeros = memoryview(mmap.mmap(-1, 2 << 20, prot=mmap.PROT_READ))
    assert is_zero(zeros) and is_zero(zeros[5:77])


@given(a=st.binary(max_size=5000), b=st.binary(max_size=5000))
def test_same_bytes_is_equality_of_contents(a: bytes, b: bytes) -> None:
    for left in (a, bytearray(a), memoryview(a)):
        for right in (b, bytearray(b), memoryview(b)):
            assert same_bytes(left, right) is (a == b)
    assert same_bytes(memoryview(a), memoryview(bytearray(a)))


def test_same_bytes_does_not_take_a_prefix_for_equal() -> None:
    assert not same_bytes(b"abc", b"ab")
    assert not same_bytes(memoryview(b"ab"), b"abc")
