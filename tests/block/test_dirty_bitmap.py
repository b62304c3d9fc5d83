"""Unit tests of the in-memory dirty bitmap and the per-node bitmap set (no image files)."""

from __future__ import annotations

import random

import pytest

from pyemu.block.dirty_bitmap import BitmapError, BitmapSet, DirtyBitmap, check_granularity


def _model_extents(bits: list[bool], g: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i, dirty in enumerate(bits):
        if not dirty:
            continue
        start, end = i * g, min(size, (i + 1) * g)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, end - start))
    return out


@pytest.mark.parametrize("granularity", [512, 4096, 65536])
def test_random_ranges_match_a_model(granularity: int) -> None:
    rng = random.Random(granularity)
    size = 3 * 1024 * 1024 + 1234  # a partial last granule
    bitmap = DirtyBitmap("b", size, granularity)
    model = [False] * bitmap.nbits
    for _ in range(300):
        offset = rng.randrange(size)
        length = rng.randrange(1, 300_000)
        value = rng.random() < 0.6
        (bitmap.set_range if value else bitmap.reset_range)(offset, length)
        for i in range(offset // granularity, -(-min(size, offset + length) // granularity)):
            model[i] = value
    expected = _model_extents(model, granularity, size)
    assert list(bitmap.dirty_extents()) == expected
    assert bitmap.count() == sum(length for _, length in expected)
    # clipped windows
    for _ in range(50):
        lo = rng.randrange(size)
        hi = rng.randrange(lo, size + 1)
        want = [(max(s, lo), min(s + n, hi) - max(s, lo)) for s, n in expected if s < hi and s + n > lo]
        assert list(bitmap.dirty_extents(lo, hi - lo)) == want


def test_extent_at_and_get() -> None:
    bitmap = DirtyBitmap("b", 1 << 20, 4096)
    bitmap.set_range(8192, 1)
    assert bitmap.extent_at(0, 1 << 20) == (False, 8192)
    assert bitmap.extent_at(8192, 1 << 20) == (True, 4096)
    assert bitmap.extent_at(9000, 100) == (True, 100)
    assert bitmap.get(12287) and not bitmap.get(12288)


def test_sparse_scan_of_a_large_bitmap_is_fast() -> None:
    bitmap = DirtyBitmap("big", 1 << 36, 512)  # 64 GiB at 512 B: 16 MiB of bits, scanned in C-speed chunks
    assert bitmap.serialized_size() == 16 << 20
    bitmap.set_range((1 << 36) - 4096, 100)
    assert list(bitmap.dirty_extents()) == [((1 << 36) - 4096, 512)]
    bitmap.set_range(0, 1 << 36)
    assert list(bitmap.dirty_extents()) == [(0, 1 << 36)] and bitmap.count() == 1 << 36
    bitmap.clear()
    assert list(bitmap.dirty_extents()) == [] and bitmap.count() == 0


def test_serialisation_is_qcow2_layout() -> None:
    bitmap = DirtyBitmap("b", 64 * 512, 512)
    bitmap.set_range(0, 512)          # bit 0 -> byte 0 bit 0
    bitmap.set_range(9 * 512, 512)    # bit 9 -> byte 1 bit 1
    assert bitmap.serialize(0, 4) == bytes([1, 2, 0, 0])
    other = DirtyBitmap("c", 64 * 512, 512)
    other.deserialize(0, bitmap.serialize(0, 8))
    assert list(other.dirty_extents()) == list(bitmap.dirty_extents())
    # bits past the end are dropped
    tail = DirtyBitmap("t", 3 * 512, 512)
    tail.deserialize(0, b"\xff")
    assert tail.count() == 3 * 512


def test_merge_same_and_different_granularity() -> None:
    a = DirtyBitmap("a", 1 << 20, 4096)
    b = DirtyBitmap("b", 1 << 20, 65536)
    a.set_range(0, 1)
    b.set_range(200_000, 1)
    a.merge_from(b)
    assert list(a.dirty_extents()) == [(0, 4096), (196608, 65536)]
    c = DirtyBitmap("c", 1 << 20, 4096)
    c.set_range(500_000, 1)
    a.merge_from(c)
    assert (499712, 4096) in list(a.dirty_extents())
    with pytest.raises(BitmapError):
        a.merge_from(DirtyBitmap("d", 1 << 21, 4096))


@pytest.mark.parametrize("bad", [0, 256, 100, 3 * 4096, 1 << 32, True])
def test_granularity_rules(bad: int) -> None:
    with pytest.raises(BitmapError):
        check_granularity(bad)


class _Node:
    name = "raw"
    filename = "x.img"

    def size(self) -> int:
        return 1 << 20


def test_set_marks_only_enabled_bitmaps_and_refuses_what_qemu_refuses() -> None:
    node = _Node()
    bitmaps = BitmapSet(node)
    on = bitmaps.create("on", granularity=4096)
    off = bitmaps.create("off", granularity=4096, enabled=False)
    with pytest.raises(BitmapError, match="Bitmap already exists: on"):
        bitmaps.create("on", granularity=4096)
    with pytest.raises(BitmapError, match="Bitmap name cannot be empty"):
        bitmaps.create("", granularity=4096)
    with pytest.raises(BitmapError, match="Can't store persistent bitmaps to drive0: Operation not supported"):
        bitmaps.create("p", granularity=4096, persistent=True, node_label="drive0")
    bitmaps.mark(0, 10)
    assert on.count() == 4096 and off.count() == 0
    bitmaps.set_enabled("off", True)
    bitmaps.set_enabled("on", False)
    bitmaps.mark(8192, 1)
    assert on.count() == 4096 and off.count() == 4096
    on.busy = True
    with pytest.raises(BitmapError, match="currently in use"):
        bitmaps.clear("on")
    on.busy = False
    on.readonly = True
    with pytest.raises(BitmapError, match="Bitmap 'on' is readonly and cannot be modified"):
        bitmaps.clear("on")
    off.inconsistent = True
    bitmaps.refresh()
    with pytest.raises(BitmapError, match="inconsistent"):
        bitmaps.set_enabled("off", True)
    bitmaps.mark(0, 1 << 20)
    assert off.count() == 4096  # inconsistent bitmaps record nothing
    bitmaps.remove("off")  # but can be removed
    with pytest.raises(BitmapError, match="Dirty bitmap 'off' not found"):
        bitmaps.remove("off")


def test_memory_is_bounded() -> None:
    with pytest.raises(BitmapError, match="use a larger granularity"):
        DirtyBitmap("huge", 8 << 40, 512)  # 2 GiB of bits for an 8 TiB disk at 512 B
    assert DirtyBitmap("ok", 8 << 40, 65536).serialized_size() == 16 << 20


def test_concurrent_marking_loses_no_bits() -> None:
    """Writers on several threads mark neighbouring granules that share bitmap bytes (the read-modify-write
    of a byte is under the bitmap's lock), while another thread adds, toggles and removes bitmaps."""
    import threading

    node = _Node()
    bitmaps = BitmapSet(node)
    target = bitmaps.create("t", granularity=512)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(k, 2048, 4):  # granules k, k+4, ...: every byte is shared by all writers
                bitmaps.mark(i * 512, 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def manager() -> None:
        n = 0
        while not stop.is_set():
            name = f"x{n % 3}"
            try:
                bitmaps.create(name, granularity=4096)
                bitmaps.set_enabled(name, False)
                bitmaps.remove(name)
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)
            n += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    boss = threading.Thread(target=manager)
    boss.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    boss.join(60)
    assert not errors
    assert list(target.dirty_extents()) == [(0, 2048 * 512)]
