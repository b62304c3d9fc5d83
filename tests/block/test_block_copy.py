"""Block-copy (pyemu.block.block_copy): each cluster copied once, in-flight copies waited for only by
overlapping copiers, zero extents written as write-zeroes, errors by side, timeouts, and the set operations a
backup job uses (next_dirty, reset, skip_unallocated, to_copy_extents)."""

from __future__ import annotations

import errno
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memdisk import KiB, MiB, WAIT, MemDisk, pattern
from pyemu.block.block_copy import BlockCopy, BlockCopyError, BlockCopyTimeout
from pyemu.block.dirty_bitmap import DirtyBitmap
from pyemu.block.errors import BlockConfigError, BlockIOError

C = 64 * KiB


def pair(size: int = 2 * MiB, **target_kw: object) -> tuple[MemDisk, MemDisk]:
    return MemDisk(size, data=pattern(size)), MemDisk(size, **target_kw)  # type: ignore[arg-type]


def test_copies_everything_once() -> None:
    src, dst = pair()
    bcs = BlockCopy(src, dst)
    assert (bcs.cluster_size, bcs.size, bcs.remaining()) == (C, 2 * MiB, 2 * MiB)
    assert bcs.copy(0, 2 * MiB) == 2 * MiB
    assert dst.data == src.data and bcs.remaining() == 0 and bcs.copied_bytes == 2 * MiB
    assert bcs.copy(0, 2 * MiB) == 0 and bcs.next_dirty(0) is None
    assert len(dst.log) == 2  # two 1 MiB chunks, nothing twice


def test_unaligned_request_copies_whole_clusters_and_a_short_last_one() -> None:
    size = 3 * C + 512
    src, dst = MemDisk(size, data=pattern(size)), MemDisk(size)
    bcs = BlockCopy(src, dst)
    assert bcs.copy(C + 10, 5) == C
    assert dst.data[C:2 * C] == src.data[C:2 * C] and not any(dst.data[:C])
    assert bcs.copy(size - 1, 1) == 512 and dst.data[3 * C:] == src.data[3 * C:]
    assert list(bcs.to_copy_extents()) == [(0, C), (2 * C, C)]
    assert bcs.next_dirty(C) == (2 * C, C) and bcs.next_dirty(0) == (0, C)


def test_sizes_cluster_size_and_requests_are_checked() -> None:
    with pytest.raises(BlockConfigError, match="Source and target image have different sizes"):
        BlockCopy(MemDisk(MiB), MemDisk(2 * MiB))
    assert BlockCopy(MemDisk(MiB), MemDisk(MiB, cluster_size=256 * KiB)).cluster_size == 256 * KiB
    assert BlockCopy(MemDisk(MiB), MemDisk(MiB, cluster_size=4 * KiB)).cluster_size == C
    assert BlockCopy(MemDisk(MiB), MemDisk(MiB), cluster_size=4096).cluster_size == 4096
    with pytest.raises(BlockConfigError):
        BlockCopy(MemDisk(MiB), MemDisk(MiB), cluster_size=3000)
    bcs = BlockCopy(MemDisk(MiB), MemDisk(MiB))
    for offset, length in ((-1, 1), (0, MiB + 1), (MiB, 1), (2 ** 64 - 1, 2)):
        with pytest.raises(BlockIOError) as info:
            bcs.copy(offset, length)
        assert info.value.errno == errno.EINVAL


def test_bitmap_limits_the_copy_and_is_read_once() -> None:
    src, dst = pair()
    bitmap = DirtyBitmap("b", 2 * MiB, 4096)
    bitmap.set_range(C + 4096, 10)        # one granule inside cluster 1
    bitmap.set_range(5 * C - 1, 2)        # straddles clusters 4 and 5
    bcs = BlockCopy(src, dst, bitmap=bitmap)
    bitmap.set_range(10 * C, C)           # later changes do not matter
    assert list(bcs.to_copy_extents()) == [(C, C), (4 * C, 2 * C)] and bcs.remaining() == 3 * C
    assert bcs.copy(0, 2 * MiB) == 3 * C
    assert [(e[1], e[2]) for e in dst.log] == [(C, C), (4 * C, 2 * C)]
    assert dst.data[C:2 * C] == src.data[C:2 * C] and not any(dst.data[10 * C:11 * C])


def test_zero_extents_become_write_zeroes_or_plain_zeros() -> None:
    size = 4 * C
    data = bytearray(pattern(size))
    data[C:3 * C] = bytes(2 * C)
    src = MemDisk(size, data=bytes(data))
    dst = MemDisk(size, data=b"\xff" * size)
    BlockCopy(src, dst).copy(0, size)
    assert dst.data == data
    assert [e for e in dst.log] == [("write", 0, C), ("zeroes", C, 2 * C), ("write", 3 * C, C)]
    plain = MemDisk(size, data=b"\xff" * size, write_zeroes=False)
    BlockCopy(src, plain).copy(0, size)
    assert plain.data == data and {e[0] for e in plain.log} == {"write"}


@pytest.mark.parametrize("op,side", [("read", "read"), ("write", "write"), ("status", "read")])
def test_errors_name_the_side_and_leave_clusters_to_copy(op: str, side: str) -> None:
    src, dst = pair(4 * C)
    (src if side == "read" else dst).fail[op] = errno.ENOSPC
    bcs = BlockCopy(src, dst)
    with pytest.raises(BlockCopyError) as info:
        bcs.copy(C, C)
    assert info.value.side == side and info.value.errno == errno.ENOSPC
    assert isinstance(info.value, BlockIOError)
    assert bcs.remaining() == 4 * C and bcs.copied_bytes == 0
    src.fail.clear()
    dst.fail.clear()
    assert bcs.copy(C, C) == C and dst.data[C:2 * C] == src.data[C:2 * C]


def test_timeout_raises_and_the_copy_finishes_in_the_background() -> None:
    src, dst = pair(4 * C)
    bcs = BlockCopy(src, dst)
    held = dst.hold("write", 0, C)
    with pytest.raises(BlockCopyTimeout) as info:
        bcs.copy(0, C, timeout=0.2)
    assert info.value.errno == errno.ETIMEDOUT and info.value.side == "write"
    assert held.entered.is_set() and bcs.remaining() == 4 * C
    held.release.set()
    bcs.drain()
    assert bcs.remaining() == 3 * C and dst.data[:C] == src.data[:C]
    assert bcs.copy(0, C, timeout=WAIT) == 0  # nothing left: no helper thread, no wait


def test_in_flight_copies_block_only_overlapping_copiers() -> None:
    src, dst = pair(8 * C)
    bcs = BlockCopy(src, dst)
    held = dst.hold("write", 0, C)
    results: dict[str, int] = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", bcs.copy(0, C)))
    first.start()
    assert held.entered.wait(WAIT)
    # Another region is copied while cluster 0 is stuck in flight.
    assert bcs.copy(4 * C, C) == C
    # A copier of cluster 0 waits for the first, and does not copy it again.
    same = threading.Thread(target=lambda: results.__setitem__("same", bcs.copy(0, 2 * C)))
    same.start()
    same.join(0.3)
    assert same.is_alive() and "same" not in results
    held.release.set()
    first.join(WAIT)
    same.join(WAIT)
    assert results == {"first": C, "same": C}  # "same" copied only cluster 1
    assert len(dst.writes_in(0, C)) == 1


def test_reset_waits_for_in_flight_and_skip_unallocated() -> None:
    size = 8 * C
    src = MemDisk(size, data=pattern(size), unallocated=[(C, 3 * C + 100), (7 * C, C)])
    dst = MemDisk(size)
    bcs = BlockCopy(src, dst)
    # [C, 4C+100) unallocated: clusters 1..3 whole; cluster 4 only partly -> kept. The last cluster too.
    assert bcs.skip_unallocated(0, size) == 4 * C
    assert list(bcs.to_copy_extents()) == [(0, C), (4 * C, 3 * C)]
    held = dst.hold("write", 0, C)
    copier = threading.Thread(target=bcs.copy, args=(0, C))
    copier.start()
    assert held.entered.wait(WAIT)
    resetter = threading.Thread(target=bcs.reset, args=(0, 2 * C))
    resetter.start()
    resetter.join(0.3)
    assert resetter.is_alive()
    held.release.set()
    copier.join(WAIT)
    resetter.join(WAIT)
    assert not resetter.is_alive() and bcs.next_dirty(0) == (4 * C, 3 * C)
    bcs.reset(4 * C + 1, 1)
    assert bcs.remaining() == 2 * C and bcs.copy(0, size) == 2 * C


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 31), st.integers(1, 8)), min_size=2, max_size=12))
def test_concurrent_copiers_copy_each_cluster_exactly_once(ranges: list[tuple[int, int]]) -> None:
    size = 32 * 16 * KiB
    src, dst = MemDisk(size, data=pattern(size)), MemDisk(size)
    bcs = BlockCopy(src, dst, cluster_size=16 * KiB)
    totals: list[int] = []
    lock = threading.Lock()

    def run(first: int, count: int) -> None:
        n = bcs.copy(first * 16 * KiB, min(count, 32 - first) * 16 * KiB)
        with lock:
            totals.append(n)

    threads = [threading.Thread(target=run, args=r) for r in ranges]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    covered = set()
    for first, count in ranges:
        covered.update(range(first, min(32, first + count)))
    assert sum(totals) == len(covered) * 16 * KiB == bcs.copied_bytes
    written = [c for _, off, n in dst.log for c in range(off // (16 * KiB), (off + n) // (16 * KiB))]
    assert sorted(written) == sorted(covered)  # each once
    for c in covered:
        assert dst.data[c * 16 * KiB:(c + 1) * 16 * KiB] == src.data[c * 16 * KiB:(c + 1) * 16 * KiB]
