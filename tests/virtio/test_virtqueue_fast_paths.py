"""The virtqueue walk's fast paths give exactly the general walk's verdict.

`Virtqueue._walk` takes two shortcuts: a one-buffer chain is returned after one unpack, and an indirect
table laid out as drivers lay it out is checked with whole-column operations (`_linear_table`). Each
shortcut must either give the same chain as the entry-by-entry walk or decline, so that every rule the
walk enforces (order of readable and writable buffers, RAM bounds, 32-bit totals, nesting, empty entries)
is still enforced. These tests build tables on both sides of every condition and compare the queue's
answer with the general walk, forced by making the table non-linear (same chain, an unused entry inside).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio.errors import VirtqueueError
from pyemu.hw.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DescriptorChain,
    Segment,
    Virtqueue,
    _linear_table,
)
from pyemu.system.memory import GuestMemory

RAM = 16 << 20
DESC = struct.Struct("<QIHH")
TABLE, AVAIL, USED, INDIRECT = 0x1000, 0x3000, 0x4000, 0x10000


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory([(0, RAM)], name="fast-path-test")
    yield mem
    mem.close()


def make_queue(memory: GuestMemory) -> tuple[Virtqueue, DmaMemory]:
    queue = Virtqueue(0, 256)
    queue.desc_addr, queue.avail_addr, queue.used_addr = TABLE, AVAIL, USED
    queue.activate(event_idx=False, indirect=True)
    return queue, DmaMemory(memory)


def offer(memory: GuestMemory, queue: Virtqueue, head: int) -> None:
    index = memory.read_u16(AVAIL + 2)
    memory.write_u16(AVAIL + 4 + 2 * (index % queue.size), head)
    memory.write_u16(AVAIL + 2, index + 1)


def indirect_chain(memory: GuestMemory, buffers: list[tuple[int, int, int]], *, spread: bool) -> int:
    """Write ``buffers`` ((addr, length, extra flags)) as an indirect table; returns the ring head (0).
    In order (entry i links to i+1) or ``spread``: the same chain with an unused entry at slot 1, so
    the links are not i -> i+1 and the walk must take its general path."""
    slots = [0] + [i + 1 for i in range(1, len(buffers))] if spread else list(range(len(buffers)))
    for index, (addr, length, flags) in enumerate(buffers):
        last = index + 1 == len(buffers)
        memory.write(INDIRECT + 16 * slots[index],
                     DESC.pack(addr, length, flags | (0 if last else DESC_F_NEXT), 0 if last else slots[index + 1]))
    entries = len(buffers) + (1 if spread else 0)
    memory.write(TABLE, DESC.pack(INDIRECT, 16 * entries, DESC_F_INDIRECT, 0))
    return 0


def pop_result(memory: GuestMemory, buffers: list[tuple[int, int, int]], *, spread: bool) -> object:
    memory.fill(INDIRECT, 16 * 300, 0)
    queue, dma = make_queue(memory)
    offer(memory, queue, indirect_chain(memory, buffers, spread=spread))
    try:
        chain = queue.pop(dma)
    except VirtqueueError:
        return "VirtqueueError"
    assert chain is not None
    return chain.head, chain.readable, chain.writable, chain.readable_length, chain.writable_length


PAGE = 4096
W = DESC_F_WRITE

CASES = {
    "block read": [(0x20000, 16, 0)] + [(0x100000 + i * 2 * PAGE, PAGE, W) for i in range(254)] + [(0x30000, 1, W)],
    "block write": [(0x20000, 16, 0)] + [(0x100000 + i * PAGE, PAGE, 0) for i in range(30)] + [(0x30000, 1, W)],
    "all readable": [(0x20000, 64, 0), (0x21000, 64, 0)],
    "one entry": [(0x20000, 64, W)],
    "readable after writable": [(0x20000, 16, 0), (0x21000, 64, W), (0x22000, 64, 0)],
    "readable between writables": [(0x20000, 16, 0), (0x21000, 64, W), (0x22000, 64, 0), (0x30000, 1, W)],
    "empty entry inside": [(0x20000, 16, 0), (0x21000, 0, W), (0x30000, 1, W)],  # valid: skipped, not refused
    "buffer past the end of RAM": [(0x20000, 16, 0), (RAM - 100, 200, W)],
    "buffer far outside RAM": [(0x20000, 16, 0), (1 << 40, 16, W)],
    "nested indirect": [(0x20000, 16, 0), (0x21000, 32, DESC_F_INDIRECT)],
    "32-bit overflow": [(0x20000, 16, 0)] + [(0x100000, 0xFFFF_FFFF, W), (0x100000, 2, W)],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_linear_table_matches_the_general_walk(memory: GuestMemory, name: str) -> None:
    buffers = CASES[name]
    fast = pop_result(memory, buffers, spread=False)
    general = pop_result(memory, buffers, spread=True)
    assert fast == general, name
    if name in ("block read", "block write", "all readable", "one entry", "empty entry inside"):
        assert fast != "VirtqueueError"
    else:
        assert fast == "VirtqueueError"


def test_linear_table_declines_what_it_does_not_check() -> None:
    base = [(0x20000, 16, DESC_F_NEXT, 1), (0x21000, 64, DESC_F_NEXT | W, 2), (0x30000, 1, W, 0)]
    flat = tuple(x for entry in base for x in entry)
    assert _linear_table(flat, 3, 0, RAM) == (((0x20000, 16),), ((0x21000, 64), (0x30000, 1)), 16, 65)
    assert _linear_table(flat, 3, 0, 0x21000) is None  # a buffer beyond the span: the general walk decides
    broken_link = flat[:3] + (2,) + flat[4:]
    assert _linear_table(broken_link, 3, 0, RAM) is None
    last_with_next = flat[:10] + (DESC_F_NEXT | W,) + flat[11:]
    assert _linear_table(last_with_next, 3, 0, RAM) is None


def test_one_buffer_chains(memory: GuestMemory) -> None:
    queue, dma = make_queue(memory)
    memory.write(TABLE + 16 * 3, DESC.pack(0x50000, 1500, W, 0))
    memory.write(TABLE + 16 * 4, DESC.pack(0x60000, 78, 0, 9))  # no NEXT flag: the link is ignored
    memory.write(TABLE + 16 * 5, DESC.pack(RAM - 10, 20, W, 0))  # outside RAM
    memory.write(TABLE + 16 * 6, DESC.pack(0x70000, 0, W, 0))  # empty: a chain with no buffers
    for head in (3, 4, 5, 6):
        offer(memory, queue, head)
    assert queue.pop(dma) == DescriptorChain.from_pieces(3, (), ((0x50000, 1500),), 0, 1500)
    assert queue.pop(dma) == DescriptorChain.from_pieces(4, ((0x60000, 78),), (), 78, 0)
    with pytest.raises(VirtqueueError, match="outside guest RAM"):
        queue.pop(dma)
    queue.last_avail += 1  # skip the bad one, as if the device had been reset past it
    assert queue.pop(dma) == DescriptorChain.from_pieces(6, (), (), 0, 0)


@settings(max_examples=400, deadline=None)
@given(sizes=st.lists(st.one_of(st.just(0), st.integers(1, 9000)), min_size=1, max_size=12), data=st.data())
def test_ranges_match_byte_by_byte_slicing(sizes: list[int], data: st.DataObject) -> None:
    """`DescriptorChain.ranges` searches for both ends of the asked bytes from the nearer end of the chain;
    whatever the pieces (empty ones included) it names exactly the bytes a byte-by-byte walk would."""
    pieces = [(0x100000 * (index + 1), size) for index, size in enumerate(sizes)]
    chain = DescriptorChain(7, [Segment(gpa, size, True) for gpa, size in pieces])
    total = sum(sizes)
    start = data.draw(st.integers(0, total))
    length = data.draw(st.integers(0, total - start))
    flat = [gpa + i for gpa, size in pieces for i in range(size)][start:start + length]
    got = chain.ranges(writable=True, start=start, length=length)
    assert all(size > 0 for _gpa, size in got) or length == 0 and got == []
    assert [gpa + i for gpa, size in got for i in range(size)] == flat
    with pytest.raises(VirtqueueError):
        chain.ranges(writable=True, start=start, length=total - start + 1)
