"""Property-based tests (hypothesis): hostile split virtqueues against :class:`Virtqueue` and whole devices.

Hypothesis builds descriptor tables and rings the way a hostile guest would -- descriptor addresses inside
RAM, straddling a region end, in the hole between regions, far outside, just below 2^64; lengths of 0, of
2^32-1, summing past 32 bits; any mix of NEXT/WRITE/INDIRECT and unknown flags; next indices outside the
table or looping back; indirect tables nested, empty, of a length that is not whole descriptors, with NEXT,
too long or outside RAM; available indices jumping ahead, heads outside the table; queue sizes that are
not powers of two; rings misaligned or outside RAM -- and feeds them

* straight into :meth:`Virtqueue.pop` / :meth:`Virtqueue.push`, compared step by step with a small
  independent reference walker written from the virtio 1.x rules (section 2.7), and
* into whole devices (virtio-rng, virtio-blk over a fake block backend) through the virtio-mmio transport
  and the running I/O thread.

Properties:

* ``pop`` returns exactly what the reference accepts, or raises ``VirtqueueError`` exactly when the
  reference finds a violation -- never any other exception (``GuestMemoryError`` included);
* a device ends either having served every available chain or marked DEVICE_NEEDS_RESET with a
  ``VirtqueueError`` reason (ring set-up problems: the ``queue N:`` reason), and it recovers after a reset;
* guest RAM changes only in the used ring and in the writable segments of chains that were accepted
  (whole RAM snapshot before/after), and every changed byte was reported to ``DmaMemory.wrote``;
* every ``DmaMemory.wrote`` range is inside RAM and inside an accepted writable segment;
* every memoryview handed out by guest memory is exactly the requested guest range of the one host
  mapping (a :class:`GuestMemory` subclass checks each view);
* after one device is broken another device on the same I/O thread keeps serving;
* valid chains (random splits, direct or indirect) are served exactly: virtio-rng writes the whole
  writable length, virtio-blk moves data between guest buffers and the backend as a model disk predicts.

Guest RAM here is two regions with a hole, [0, 2 MiB) and [3 MiB, 4 MiB), so "straddles a region end"
and "in the hole" are real cases.
"""

from __future__ import annotations

import ctypes
import errno
import random
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyemu.block.driver import BlockCapabilities, BlockStatus  # noqa: E402
from pyemu.block.errors import BlockIOError, ReadOnlyError  # noqa: E402
from pyemu.hw.core.dma import DmaMemory  # noqa: E402
from pyemu.hw.virtio import blk as vblk  # noqa: E402
from pyemu.hw.virtio import mmio as regs  # noqa: E402
from pyemu.hw.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1  # noqa: E402
from pyemu.hw.virtio.errors import VirtqueueError  # noqa: E402
from pyemu.hw.virtio.mmio import VirtioMmio  # noqa: E402
from pyemu.hw.virtio.queue import (  # noqa: E402
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    MAX_QUEUE_SIZE,
    DescriptorChain,
    Segment,
    Virtqueue,
)
from pyemu.hw.virtio.rng import MAX_REQUEST, EntropySource, RngConfig, VirtioRng  # noqa: E402
from pyemu.system.iothread import IoThread  # noqa: E402
from pyemu.system.memory import GuestMemory  # noqa: E402
from pyemu.testing.virtio_driver import VirtioTestDriver  # noqa: E402

from .conftest import CountingInterrupt, wait_for  # noqa: E402

M16, M32, M64 = 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1
DESC = struct.Struct("<QIHH")

R0_BASE, R0_SIZE = 0, 2 << 20
R1_BASE, R1_SIZE = 3 << 20, 1 << 20
RAM_END = R1_BASE + R1_SIZE
LAYOUT = [(R0_BASE, R0_SIZE), (R1_BASE, R1_SIZE)]

RING_END = 0x40000                          # [0, RING_END): the victim's rings
RING_FIXED = (0x1000, 0x20000, 0x30000)     # non-overlapping desc/avail/used for sizes up to 4096
TABLES = [(0x40000, 0x100000)]              # indirect tables
DATA = [(0x100000, R0_BASE + R0_SIZE), (R1_BASE, R1_BASE + 0xC0000)]  # request buffers
BYSTANDER = R1_BASE + 0xC0000               # 256 KiB for the healthy device's driver

DISK_SECTORS = 128
SECTOR = vblk.SECTOR
SERIAL = "pyemu-fuzz-serial-0123456789"
MAX_BYTES_PER_EXAMPLE = 16 << 20
"""Guard for device runs: a valid chain may ask for up to 4 GiB - 1 (see the report on host memory); the
tests stay below this, which also keeps every virtio-rng read under /dev/urandom's 32 MiB per read."""

SEEDED = st.integers(0, M32).map(random.Random)
"""Bulk random bytes (garbage tables, payloads) from one drawn seed: cheap for hypothesis to generate."""

BROKEN_REASON = re.compile(r"^(VirtqueueError: )?queue 0: ")

SETTINGS = dict(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------------------------
# Guest memory that checks every view it hands out, and the shared environment.
# ------------------------------------------------------------------------------------------------------
class CheckedMemory(GuestMemory):
    """GuestMemory whose every view is verified to be exactly the requested guest range of the mapping."""

    def __init__(self, layout: list[tuple[int, int]], name: str) -> None:
        super().__init__(layout, name=name)
        self.violations: list[str] = []

    def view(self, gpa: int, size: int) -> memoryview:
        result = super().view(gpa, size)  # GuestMemoryError for anything not wholly inside one region
        region = next((r for r in self.regions if size >= 0 and r.gpa <= gpa and gpa + size <= r.end), None)
        problem = None
        if region is None:
            problem = "granted although outside every RAM region"
        elif len(result) != size or result.obj is not self._mmap:
            problem = f"view of {len(result)} bytes of {result.obj!r}"
        elif size:
            host = ctypes.addressof(ctypes.c_char.from_buffer(result))
            expected = self.host_address(region) + (gpa - region.gpa)
            if host != expected or not self._base_ptr <= host <= host + size <= self._base_ptr + self.total_size:
                problem = f"host address {host:#x}, expected {expected:#x}"
        if problem is not None:
            self.violations.append(f"view({gpa:#x}, {size}): {problem}")
        return result


@dataclass
class Env:
    memory: CheckedMemory
    dma: DmaMemory
    wrote: list[tuple[int, int]]
    iothread: IoThread

    def reset(self) -> None:
        self.memory.clear()
        self.wrote.clear()
        self.memory.violations.clear()


@pytest.fixture(scope="module")
def env():  # type: ignore[no-untyped-def]
    memory = CheckedMemory(LAYOUT, "virtqueue-props")
    wrote: list[tuple[int, int]] = []
    dma = DmaMemory(memory, lambda gpa, size: wrote.append((gpa, size)))
    iothread = IoThread("props")
    iothread.start()
    try:
        yield Env(memory, dma, wrote, iothread)
    finally:
        iothread.stop()
        iothread.close()
        memory.close()


def poke(memory: GuestMemory, gpa: int, data: bytes) -> None:
    """Write guest bytes if they are wholly in RAM (hostile ring addresses are simply not written)."""
    if data and memory.contains(gpa, len(data)):
        memory.write(gpa, data)


def snapshot(memory: GuestMemory) -> bytes:
    return b"".join(memory.read(r.gpa, r.size) for r in memory.regions)


def offset_of(memory: GuestMemory, gpa: int, size: int) -> int:
    region = memory.region_of(gpa, size)
    return region.offset + gpa - region.gpa


def unexplained_changes(memory: GuestMemory, before: bytes, after: bytes,
                        allowed: list[tuple[int, int]]) -> list[int]:
    """Guest addresses (the first few) that changed although outside every ``allowed`` range."""
    patched = bytearray(before)
    for gpa, size in allowed:
        if size > 0:
            off = offset_of(memory, gpa, size)
            patched[off : off + size] = after[off : off + size]
    if patched == after:
        return []
    bad: list[int] = []
    for region in memory.regions:
        for block in range(region.offset, region.offset + region.size, 4096):
            if patched[block : block + 4096] == after[block : block + 4096]:
                continue
            for off in range(block, block + 4096):
                if patched[off] != after[off]:
                    bad.append(region.gpa + off - region.offset)
                    if len(bad) >= 8:
                        return bad
    return bad


def inside_any(gpa: int, size: int, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= gpa and gpa + size <= start + length for start, length in ranges)


def overlaps(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(x < y + m and y < x + n for x, n in a for y, m in b if n > 0 and m > 0)


def iothread_barrier(iothread: IoThread) -> None:
    """Return after the I/O thread went through two more loop iterations (so handlers that were
    already signalled, and their error callbacks, have finished)."""
    for _ in range(2):
        done = threading.Event()
        iothread.call_soon(done.set)
        assert done.wait(5), "I/O thread stuck"


# ------------------------------------------------------------------------------------------------------
# The reference: the virtio 1.x split-ring rules, written independently of hw/virtio/queue.py.
# ------------------------------------------------------------------------------------------------------
class Image:
    """A RAM snapshot the reference reads; remembers every range it read (to detect device writes
    that could have changed what the device saw)."""

    def __init__(self, memory: GuestMemory, data: bytes) -> None:
        self.regions = memory.regions
        self.data = data
        self.reads: list[tuple[int, int]] = []

    def _offset(self, gpa: int, size: int) -> int | None:
        for r in self.regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                return r.offset + gpa - r.gpa
        return None

    def contains(self, gpa: int, size: int) -> bool:
        return size > 0 and self._offset(gpa, size) is not None

    def read(self, gpa: int, size: int) -> bytes:
        off = self._offset(gpa, size)
        assert off is not None, "reference read outside RAM"
        self.reads.append((gpa, size))
        return self.data[off : off + size]

    def u16(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 2), "little")


@dataclass(frozen=True)
class Ring:
    max_size: int
    size: int
    desc: int
    avail: int
    used: int

    @property
    def used_range(self) -> tuple[int, int]:
        return (self.used, 6 + 8 * self.size)


def ref_ring_ok(image: Image, ring: Ring) -> bool:
    size = ring.size
    if not (0 < size <= ring.max_size and size & (size - 1) == 0):
        return False
    return all(addr % align == 0 and image.contains(addr, length)
               for addr, length, align in ((ring.desc, 16 * size, 16), (ring.avail, 6 + 2 * size, 2),
                                           (ring.used, 6 + 8 * size, 4)))


@dataclass(frozen=True)
class RefError:
    why: str


def ref_pop(image: Image, ring: Ring, indirect_ok: bool, last_avail: int) -> DescriptorChain | RefError | None:
    """What the next pop must give: None (nothing new), a chain, or RefError (the guest broke a rule)."""
    size = ring.size
    pending = (image.u16(ring.avail + 2) - last_avail) & M16
    if pending == 0:
        return None
    if pending > size:
        return RefError("available index too far ahead")
    head = image.u16(ring.avail + 4 + 2 * (last_avail % size))
    if head >= size:
        return RefError("head outside the table")
    segments: list[Segment] = []
    totals = [0, 0]
    seen_writable = False
    table, entries, index, nested = ring.desc, size, head, False
    seen: set[int] = set()
    while True:
        if index in seen:
            return RefError("loop")
        seen.add(index)
        addr, length, flags, nxt = DESC.unpack(image.read(table + 16 * index, 16))
        if flags & DESC_F_INDIRECT:
            if not indirect_ok:
                return RefError("indirect not negotiated")
            if nested:
                return RefError("nested indirect")
            if flags & DESC_F_NEXT:
                return RefError("indirect with NEXT")
            if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                return RefError("indirect table length")
            if not image.contains(addr, length):
                return RefError("indirect table outside RAM")
            table, entries, index, nested = addr, length // 16, 0, True
            seen = set()
            continue
        writable = bool(flags & DESC_F_WRITE)
        if seen_writable and not writable:
            return RefError("readable after writable")
        if length and not image.contains(addr, length):
            return RefError("buffer outside RAM")
        totals[writable] += length
        if totals[writable] > M32:
            return RefError("32-bit overflow")
        if length:
            segments.append(Segment(addr, length, writable))
            seen_writable |= writable
        if not flags & DESC_F_NEXT:
            return DescriptorChain(head, tuple(segments))
        if nxt >= entries:
            return RefError("next outside the table")
        index = nxt


def ref_all(image: Image, ring: Ring, indirect_ok: bool) -> tuple[list[DescriptorChain], RefError | None]:
    """Everything a device starting at index 0 pops, if it never changed the rings itself."""
    chains: list[DescriptorChain] = []
    last = 0
    while True:
        result = ref_pop(image, ring, indirect_ok, last)
        if result is None or isinstance(result, RefError):
            return chains, result
        chains.append(result)
        last = (last + 1) & M16


def check_chain_invariants(memory: GuestMemory, chain: DescriptorChain) -> None:
    assert all(s.length > 0 and memory.contains(s.gpa, s.length) for s in chain.segments), chain
    kinds = [s.writable for s in chain.segments]
    assert kinds == sorted(kinds), f"readable after writable in {chain}"
    assert chain.readable_length <= M32 and chain.writable_length <= M32


# ------------------------------------------------------------------------------------------------------
# Strategies: hostile values, chain shapes, whole scenarios.
# ------------------------------------------------------------------------------------------------------
def hostile_addr(length: int) -> st.SearchStrategy[int]:
    span = max(1, min(length, 1 << 40) - 1)
    return st.one_of(
        st.integers(1, span).map(lambda k: R0_BASE + R0_SIZE - k),   # straddles the end of region 0
        st.integers(R0_BASE + R0_SIZE, R1_BASE - 1),                 # the hole
        st.integers(1, span).map(lambda k: R1_BASE - k),             # straddles into region 1
        st.integers(1, span).map(lambda k: RAM_END - k),             # straddles the end of RAM
        st.integers(RAM_END, 1 << 48),                               # far outside
        st.integers(1, 1 << 24).map(lambda k: (1 << 64) - k),        # wraps in 64-bit arithmetic
        st.integers(0, M64),
        st.integers(0, RING_END - 1),                                # inside RAM, over the rings
    )


HOSTILE_LEN = st.one_of(st.sampled_from([0, 1, R0_SIZE, R0_SIZE + 1, R1_SIZE + 1, 1 << 31, M32]),
                        st.integers(0, M32))


@st.composite
def rng_shape(draw) -> list[tuple[int, bool, bytes | None]]:  # type: ignore[no-untyped-def]
    """Any mix of readable then writable segments (virtio-rng ignores the readable ones)."""
    readable = draw(st.lists(st.integers(0, 64), max_size=2))
    writable = draw(st.lists(st.one_of(st.integers(0, 64), st.integers(65, 4096)),
                             min_size=0 if readable else 1, max_size=4))
    return [(n, False, None) for n in readable] + [(n, True, None) for n in writable]


def split(draw, total: int, max_pieces: int) -> list[int]:  # type: ignore[no-untyped-def]
    """``total`` cut into 1..max_pieces lengths (zero-length pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=max_pieces - 1)))
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@st.composite
def blk_shape(draw) -> list[tuple[int, bool, bytes | None]]:  # type: ignore[no-untyped-def]
    """A virtio-blk request, plausible or not: header, payload, data area, status byte."""
    kind = draw(st.one_of(st.sampled_from([vblk.T_IN, vblk.T_OUT, vblk.T_FLUSH, vblk.T_GET_ID, vblk.T_DISCARD,
                                           vblk.T_WRITE_ZEROES, 7]), st.integers(0, M32)))
    sector = draw(st.one_of(st.integers(0, 8), st.integers(DISK_SECTORS - 8, DISK_SECTORS + 8),
                            st.integers(0, M64)))
    header = vblk.HEADER.pack(kind, 0, sector)[: draw(st.sampled_from([16] * 8 + [8, 0]))]
    payload = b""
    if kind == vblk.T_OUT:
        payload = bytes([0xA5]) * draw(st.one_of(st.sampled_from([0, 512, 1024]), st.integers(0, 2048)))
    elif kind in (vblk.T_DISCARD, vblk.T_WRITE_ZEROES):
        segs = draw(st.lists(st.tuples(st.one_of(st.integers(0, DISK_SECTORS + 4), st.integers(0, M64)),
                                       st.one_of(st.integers(0, 16), st.integers(0, M32)),
                                       st.sampled_from([0, 0, 1, 2, M32])), max_size=2))
        payload = b"".join(vblk.SEGMENT_STRUCT.pack(*s) for s in segs) + b"\0" * draw(st.sampled_from([0, 0, 3]))
    data = 0
    if kind == vblk.T_IN:
        data = draw(st.one_of(st.sampled_from([0, 512, 1024]), st.integers(0, 2048)))
    elif kind == vblk.T_GET_ID:
        data = draw(st.sampled_from([20, 20, 19, 64]))
    status = draw(st.sampled_from([1] * 9 + [0]))
    readable = header + payload
    out: list[tuple[int, bool, bytes | None]] = []
    pos = 0
    for n in split(draw, len(readable), 3):
        out.append((n, False, readable[pos : pos + n]))
        pos += n
    out += [(n, True, None) for n in split(draw, data + status, 3)]
    return out


class Exhausted(Exception):
    pass


class Bump:
    """Bump allocation in a few areas, with random placement and gaps."""

    def __init__(self, areas: list[tuple[int, int]], rnd, align: int = 1) -> None:  # type: ignore[no-untyped-def]
        self.areas = [list(a) for a in areas]
        self.rnd = rnd
        self.align = align

    def take(self, size: int) -> int:
        order = list(range(len(self.areas)))
        self.rnd.shuffle(order)
        for i in order:
            lo, hi = self.areas[i]
            start = lo + (self.rnd.randrange(16) if self.align == 1 else 0)
            start = -(-start // self.align) * self.align
            if start + max(size, 1) <= hi:
                self.areas[i][0] = start + max(size, 1)
                return start
        raise Exhausted


@dataclass(frozen=True)
class Ref:
    """A descriptor of a generated chain, for mutations: where its 16 bytes are, its index, its table."""

    gpa: int
    index: int
    table: int
    entries: int


@dataclass
class Scenario:
    ring: Ring
    layout_size: int
    indirect: bool
    event_idx: bool
    start: int
    heads: list[int]
    avail_idx: int
    avail_flags: int
    used_event: int
    entries: dict[int, list[int]] = field(default_factory=dict)
    preload: list[tuple[int, bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label: str = ""


PLAIN_KINDS = ("addr", "len", "flags", "next", "loop", "order")
INDIRECT_KINDS = ("make_indirect", "nested", "table_len", "table_next", "table_addr", "table_unaligned")
"""Descriptor malformations; the INDIRECT_KINDS ones are drawn with VIRTIO_F_INDIRECT_DESC negotiated,
since without it every indirect descriptor is refused anyway."""


def mutate(draw, sc: Scenario, chain: list[Ref], kind: str, tables: Bump, buffers: Bump) -> None:  # type: ignore[no-untyped-def]
    if kind in INDIRECT_KINDS and sc.entries[chain[0].gpa][2] & DESC_F_INDIRECT:
        ref = chain[0]  # the chain's indirect descriptor
    else:
        ref = draw(st.sampled_from(chain))
    e = sc.entries[ref.gpa]
    sc.notes.append(f"{kind}@{ref.gpa:#x}")
    if kind == "addr":
        e[0] = draw(hostile_addr(e[1]))
    elif kind == "len":
        e[1] = draw(HOSTILE_LEN)
    elif kind == "flags":
        e[2] ^= draw(st.integers(1, 15))  # NEXT, WRITE, INDIRECT and an undefined bit, in any combination
    elif kind == "next":
        e[2] |= DESC_F_NEXT
        e[3] = draw(st.one_of(st.just(ref.entries), st.integers(ref.entries, M16), st.integers(0, M16)))
    elif kind == "loop":
        position = chain.index(ref)
        target = draw(st.sampled_from([r for r in chain[: position + 1] if r.table == ref.table]))
        e[2] |= DESC_F_NEXT
        e[3] = target.index
    elif kind == "order":  # make every earlier descriptor writable and this one readable
        for r in chain[: chain.index(ref)]:
            sc.entries[r.gpa][2] |= DESC_F_WRITE
        e[2] &= ~DESC_F_WRITE
    else:
        if not e[2] & DESC_F_INDIRECT:
            # Turn it into an indirect descriptor over a fresh valid table: fine as the last descriptor of
            # a direct chain, "nested" inside an indirect table.
            n = draw(st.integers(1, 3))
            table = tables.take(16 * n)
            for i in range(n):
                sc.entries[table + 16 * i] = [buffers.take(16), 16, DESC_F_WRITE | (DESC_F_NEXT if i + 1 < n else 0),
                                              i + 1 if i + 1 < n else 0]
            e[0], e[1], e[2], e[3] = table, 16 * n, DESC_F_INDIRECT, 0
        entries = max(1, e[1] // 16)
        if kind == "nested":  # an indirect descriptor inside the indirect table, over a valid inner table
            inner = tables.take(16)
            sc.entries[inner] = [buffers.take(16), 16, DESC_F_WRITE, 0]
            slot = draw(st.integers(0, entries - 1))
            sc.entries[e[0] + 16 * slot] = [inner, 16, DESC_F_INDIRECT, 0]
        elif kind == "table_len":
            e[1] = draw(st.one_of(st.sampled_from([0, 8, 17, e[1] + 8, e[1] - 8, e[1] + 1, 16 * (MAX_QUEUE_SIZE + 1),
                                                   M32 & ~15]), st.integers(0, M32)))
        elif kind == "table_next":
            e[2] |= DESC_F_NEXT
            e[3] = draw(st.integers(0, M16))
        elif kind == "table_addr":  # outside RAM, or straddling a region end with the first entries inside
            straddle = st.integers(1, max(1, entries - 1)).map(lambda k: 16 * k)
            e[0] = draw(st.one_of(hostile_addr(e[1]), straddle.map(lambda k: R0_BASE + R0_SIZE - k),
                                  straddle.map(lambda k: RAM_END - k)))
        elif kind == "table_unaligned":
            e[0] += draw(st.integers(1, 15))


MALFORMATIONS = ("ring", "avail", "head", "overflow", "unnegotiated", "descriptor", "descriptor", "descriptor",
                 "descriptor")
CATEGORIES = ("clean", "many", "ring", "avail", "head", "overflow", "unnegotiated") + PLAIN_KINDS + INDIRECT_KINDS


@st.composite
def scenarios(draw, *, max_sizes: tuple[int, ...], shape, allow_bad_rings: bool, any_start: bool,  # type: ignore[no-untyped-def]
              malformed: bool = True, force: str = "") -> Scenario:
    """Up to five chains, direct or indirect, at random descriptor indices and buffer addresses; then no
    malformation ("clean"), exactly one of a random category ("one"), or any number of all kinds ("many").
    ``force`` names the mode or the one malformation (an entry of CATEGORIES)."""
    rnd = draw(SEEDED)
    if force:
        mode = force if force in ("clean", "many") else "one"
    else:
        mode = draw(st.sampled_from(["clean", "one", "one", "one", "many"])) if malformed else "clean"
    if mode != "one":
        one = ""
    elif force:
        one = "descriptor" if force in PLAIN_KINDS + INDIRECT_KINDS else force
    else:
        one = draw(st.sampled_from([m for m in MALFORMATIONS if allow_bad_rings or m != "ring"]))
    many = mode == "many"
    max_size = draw(st.sampled_from(max_sizes))
    size = draw(st.sampled_from([1 << k for k in range(max_size.bit_length())]))
    desc, avail, used = RING_FIXED
    if one == "ring" or (many and allow_bad_rings and draw(st.integers(0, 2)) == 0):
        placement = "bad"
    else:
        placement = draw(st.sampled_from(["fixed", "fixed", "random"]))
    if placement == "random":  # aligned and inside RAM, but possibly overlapping each other
        desc = 16 * draw(st.integers(0, (RING_END - 16 * size) // 16))
        avail = 2 * draw(st.integers(0, (RING_END - 6 - 2 * size) // 2))
        used = 4 * draw(st.integers(0, (RING_END - 6 - 8 * size) // 4))
    elif placement == "bad":
        for _ in range(draw(st.integers(1, 2))):
            what = draw(st.sampled_from(["size", "desc", "avail", "used"]))
            if what == "size":
                size = draw(st.one_of(st.sampled_from([0, 3, 2 * max_size, M32]), st.integers(0, M32)))
            elif what == "desc":
                desc = draw(st.one_of(st.just(desc + 8), hostile_addr(16 * max(size, 1))))
            elif what == "avail":
                avail = draw(st.one_of(st.just(avail + 1), hostile_addr(6 + 2 * max(size, 1))))
            else:
                used = draw(st.one_of(st.just(used + 2), hostile_addr(6 + 8 * max(size, 1))))
    layout = size if 0 < size <= max_size and not size & (size - 1) else max_size
    dkind = (force or draw(st.sampled_from(PLAIN_KINDS + INDIRECT_KINDS))) if one == "descriptor" else ""
    indirect = one != "unnegotiated" and (one == "overflow" or dkind in INDIRECT_KINDS or draw(st.booleans()))
    sc = Scenario(Ring(max_size, size, desc, avail, used), layout, indirect, draw(st.booleans()),
                  0, [], 0, draw(st.sampled_from([0, 1])), draw(st.integers(0, M16)))
    sc.notes += [mode, one, placement]
    sc.label = dkind or one or mode
    if draw(st.booleans()):  # unused descriptors hold garbage rather than zeros
        sc.preload.append((desc, rnd.randbytes(16 * layout)))
    if draw(st.booleans()):
        sc.preload.append((avail, rnd.randbytes(6 + 2 * layout)))
    free = list(range(layout))
    rnd.shuffle(free)
    buffers, tables = Bump(DATA, rnd), Bump(TABLES, rnd, align=16)
    chains: list[list[Ref]] = []
    count = draw(st.integers(0 if many else 1, 5))
    special_at = draw(st.integers(0, count - 1)) if one in ("overflow", "unnegotiated") else -1
    try:
        for position in range(count):
            if many:
                kind = draw(st.sampled_from(["direct", "direct", "indirect", "overflow"]))
            elif position == special_at:
                kind = "overflow" if one == "overflow" else "indirect"
            else:
                kind = draw(st.sampled_from(["direct", "indirect"] if indirect else ["direct"]))
            if not free:
                break
            if kind == "overflow":  # 2^32 bytes or more in one direction: 2 MiB segments, many times over
                entries, flags = draw(st.sampled_from([2048, 2049, 4096])), draw(st.sampled_from([0, DESC_F_WRITE]))
                table = tables.take(16 * entries)
                sc.preload.append((table, b"".join(
                    DESC.pack(R0_BASE, R0_SIZE, flags | (DESC_F_NEXT if i + 1 < entries else 0),
                              i + 1 if i + 1 < entries else 0) for i in range(entries))))
                head = free.pop()
                sc.entries[desc + 16 * head] = [table, 16 * entries, DESC_F_INDIRECT, 0]
                sc.heads.append(head)
                sc.notes.append(f"overflow {entries}")
                continue
            segments = draw(shape)
            placed = []
            for length, writable, content in segments:
                addr = buffers.take(length)
                if content:
                    sc.preload.append((addr, content))
                placed.append((addr, length, writable))
            refs: list[Ref] = []
            if kind == "direct":
                if len(placed) > len(free):
                    continue
                ids = [free.pop() for _ in placed]
                for i, (addr, length, writable) in enumerate(placed):
                    last = i + 1 == len(placed)
                    gpa = desc + 16 * ids[i]
                    sc.entries[gpa] = [addr, length, (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT),
                                       0 if last else ids[i + 1]]
                    refs.append(Ref(gpa, ids[i], desc, layout))
                head = ids[0]
            else:
                n = len(placed)
                table = tables.take(16 * n)
                head = free.pop()
                sc.entries[desc + 16 * head] = [table, 16 * n, DESC_F_INDIRECT, 0]
                refs.append(Ref(desc + 16 * head, head, desc, layout))
                for i, (addr, length, writable) in enumerate(placed):
                    last = i + 1 == n
                    sc.entries[table + 16 * i] = [addr, length,
                                                  (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT),
                                                  0 if last else i + 1]
                    refs.append(Ref(table + 16 * i, i, table, n))
            sc.heads.append(head)
            chains.append(refs)
        if chains and one == "descriptor":
            mutate(draw, sc, draw(st.sampled_from(chains)), dkind, tables, buffers)
        elif chains and many:
            for _ in range(draw(st.integers(0, 3))):
                mutate(draw, sc, draw(st.sampled_from(chains)), draw(st.sampled_from(PLAIN_KINDS + INDIRECT_KINDS)),
                       tables, buffers)
    except Exhausted:
        assume(False)
    if sc.heads and (many or one == "head"):
        for i in ([draw(st.integers(0, len(sc.heads) - 1))] if one else range(len(sc.heads))):
            if one or draw(st.integers(0, 7)) == 0:
                sc.heads[i] = draw(st.one_of(st.just(layout), st.integers(layout, M16)))
                sc.notes.append(f"head {i} -> {sc.heads[i]}")
    sc.start = draw(st.one_of(st.just(0), st.just(M16), st.integers(0, M16))) if any_start else 0
    sc.avail_idx = (sc.start + len(sc.heads)) & M16
    if one == "avail" or (many and draw(st.integers(0, 3)) == 0):
        sc.avail_idx = draw(st.one_of(st.integers(0, M16), st.just((sc.start + layout) & M16),
                                      st.just((sc.start + layout + 1) & M16), st.just(sc.start)))
        sc.notes.append(f"avail idx -> {sc.avail_idx}")
    return sc


def install(memory: GuestMemory, sc: Scenario) -> None:
    for gpa, data in sc.preload:
        poke(memory, gpa, data)
    for gpa, (addr, length, flags, nxt) in sc.entries.items():
        poke(memory, gpa, DESC.pack(addr & M64, length & M32, flags & M16, nxt & M16))
    avail = sc.ring.avail
    poke(memory, avail, struct.pack("<HH", sc.avail_flags, sc.avail_idx))
    for i, head in enumerate(sc.heads[: sc.layout_size]):
        poke(memory, avail + 4 + 2 * ((sc.start + i) % sc.layout_size), struct.pack("<H", head & M16))
    poke(memory, avail + 4 + 2 * sc.layout_size, struct.pack("<H", sc.used_event))


# ------------------------------------------------------------------------------------------------------
# (a) Virtqueue.pop / push directly.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("category", CATEGORIES)
@settings(max_examples=20, **SETTINGS)
@given(data=st.data(),
       written=st.lists(st.one_of(st.integers(-8, 8192), st.integers(-(1 << 40), 1 << 40)), min_size=8, max_size=8))
def test_pop_matches_the_reference_and_touches_only_the_used_ring(env: Env, category: str, data, written: list[int]) -> None:  # type: ignore[no-untyped-def]
    sc = data.draw(scenarios(max_sizes=(1, 2, 8, 64, 256), shape=rng_shape(), allow_bad_rings=True, any_start=True,
                             force=category), label="scenario")
    env.reset()
    install(env.memory, sc)
    memory, dma, ring = env.memory, env.dma, sc.ring
    queue = Virtqueue(0, ring.max_size)
    queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr = ring.size, ring.desc, ring.avail, ring.used
    before = snapshot(memory)
    problem = queue.ring_problem(dma)
    assert (problem is None) == ref_ring_ok(Image(memory, before), ring), problem
    if problem is not None:
        assert snapshot(memory) == before
        assert not memory.violations
        return
    queue.activate(event_idx=sc.event_idx, indirect=sc.indirect)
    queue.last_avail = queue.used_idx = sc.start
    for step in range(len(sc.heads) + 2):
        expected = ref_pop(Image(memory, before), ring, sc.indirect, queue.last_avail)
        last_avail = queue.last_avail
        env.wrote.clear()
        try:
            chain = queue.pop(dma)
        except VirtqueueError as exc:
            assert isinstance(expected, RefError), f"pop refused what the reference accepts ({expected}): {exc}"
            assert queue.last_avail == last_avail
            with pytest.raises(VirtqueueError):  # the queue stays refused, it does not skip the chain
                queue.pop(dma)
            assert snapshot(memory) == before
            break
        except Exception as exc:  # noqa: BLE001 -- the property: nothing else may escape
            pytest.fail(f"Virtqueue.pop raised {type(exc).__name__}: {exc} (expected {expected})")
        after = snapshot(memory)
        assert not env.wrote
        if chain is None:
            assert expected is None
            assert after == before
            break
        assert not isinstance(expected, RefError), f"pop accepted a chain the reference refuses: {expected.why}"
        assert expected is not None and (chain.head, chain.segments) == (expected.head, expected.segments)
        check_chain_invariants(memory, chain)
        assert queue.last_avail == (last_avail + 1) & M16
        avail_event = (ring.used + 4 + 8 * ring.size, 2)
        assert not unexplained_changes(memory, before, after, [avail_event] if sc.event_idx else [])
        if sc.event_idx:
            assert memory.read_u16(avail_event[0]) == queue.last_avail
        # Every segment can be viewed, and the views are the segments.
        for writable in (False, True):
            views = chain.views(dma, writable=writable)
            assert sum(len(v) for v in views) == (chain.writable_length if writable else chain.readable_length)
        # push: the used element and index, nothing else; DMA reports exactly the written prefix.
        amount = written[step % len(written)]
        clamped = max(0, min(amount, chain.writable_length))
        slot, used_idx = queue.used_idx % ring.size, queue.used_idx
        before = after
        env.wrote.clear()
        queue.push(dma, chain, amount)
        after = snapshot(memory)
        elem = ring.used + 4 + 8 * slot
        assert struct.unpack("<II", memory.read(elem, 8)) == (chain.head, clamped)
        assert memory.read_u16(ring.used + 2) == queue.used_idx == (used_idx + 1) & M16
        assert not unexplained_changes(memory, before, after, [(elem, 8), (ring.used + 2, 2)])
        assert env.wrote == chain.written_ranges(clamped)
        assert sum(size for _, size in env.wrote) == clamped
        writable_segments = [(s.gpa, s.length) for s in chain.segments if s.writable]
        assert all(inside_any(gpa, size, writable_segments) for gpa, size in env.wrote)
        before = after
    assert not memory.violations, memory.violations


@st.composite
def chain_with_streams(draw):  # type: ignore[no-untyped-def]
    rnd = draw(SEEDED)
    buffers = Bump(DATA, rnd)
    readable = [(buffers.take(n), n, False) for n in draw(st.lists(st.integers(1, 300), max_size=4))]
    writable = [(buffers.take(n), n, True) for n in draw(st.lists(st.integers(1, 300), max_size=4))]
    chain = DescriptorChain(draw(st.integers(0, 255)), tuple(Segment(*s) for s in readable + writable))
    return chain, draw(st.integers(0, M32))


def stream_ranges(chain: DescriptorChain, start: int, length: int) -> list[tuple[int, int]]:
    """Guest ranges of bytes start..start+length of the writable stream (computed independently)."""
    ranges, cursor = [], 0
    for s in chain.segments:
        if not s.writable:
            continue
        lo, hi = max(cursor, start), min(cursor + s.length, start + length)
        if lo < hi:
            ranges.append((s.gpa + lo - cursor, hi - lo))
        cursor += s.length
    return ranges


@settings(max_examples=100, **SETTINGS)
@given(case=chain_with_streams(), writable=st.booleans(), start=st.integers(-2, 1300),
       length=st.one_of(st.none(), st.integers(-2, 1300)))
def test_chain_views_read_and_write_cover_exactly_the_asked_bytes(env: Env, case, writable: bool, start: int,  # type: ignore[no-untyped-def]
                                                                   length: int | None) -> None:
    chain, seed = case
    pattern = random.Random(seed).randbytes(4096)
    env.reset()
    for s in chain.segments:
        poke(env.memory, s.gpa, pattern[: s.length])
    stream = b"".join(pattern[: s.length] for s in chain.segments if s.writable == writable)
    total = len(stream)
    wanted = total - start if length is None else length
    if start < 0 or wanted < 0 or start + wanted > total:
        with pytest.raises(VirtqueueError):
            chain.views(env.dma, writable=writable, start=start, length=length)
        return
    views = chain.views(env.dma, writable=writable, start=start, length=length)
    assert b"".join(bytes(v) for v in views) == stream[start : start + wanted]
    assert all(len(v) > 0 for v in views)
    if not writable:
        assert chain.read(env.dma, start, length) == stream[start : start + wanted]
        return
    before = snapshot(env.memory)
    env.wrote.clear()
    data = bytes((b + 1) & 0xFF for b in stream[start : start + wanted])
    chain.write(env.dma, data, start)
    after = snapshot(env.memory)
    assert b"".join(bytes(v) for v in chain.views(env.dma, writable=True, start=start, length=wanted)) == data
    targeted = [(v_gpa, v_len) for v_gpa, v_len in stream_ranges(chain, start, wanted)]
    assert not unexplained_changes(env.memory, before, after, targeted)
    unreported = unexplained_changes(env.memory, before, after, env.wrote)
    assert not unreported, f"chain.write changed {[hex(a) for a in unreported]} without DmaMemory.wrote"
    assert not env.memory.violations


# ------------------------------------------------------------------------------------------------------
# (b) Whole devices through the transport.
# ------------------------------------------------------------------------------------------------------
class FakeBackend:
    """The surface of :class:`pyemu.block.backend.BlockBackend` over a bytearray. Records requests, and as
    ``violations`` any a device should never have sent (outside the disk, buffers not memoryviews)."""

    filename = "fake.img"
    id = "fake"
    capabilities = BlockCapabilities(discard=True, write_zeroes=True, block_status=False, direct_io=False)

    def __init__(self, data: bytearray, *, read_only: bool = False) -> None:
        self.data = data
        self._read_only = read_only
        self.closed = False
        self.requests: list[tuple[str, int, int]] = []
        self.violations: list[str] = []

    @property
    def read_only(self) -> bool:
        return self._read_only

    def size(self) -> int:
        return len(self.data)

    def _check(self, op: str, offset: int, length: int) -> None:
        self.requests.append((op, offset, length))
        if self.closed:
            raise BlockIOError("closed", errno=errno.ENOMEDIUM, offset=offset)
        if offset < 0 or length < 0 or offset + length > len(self.data):
            self.violations.append(f"{op} at {offset} length {length} outside a {len(self.data)}-byte disk")
            raise BlockIOError(f"{op} outside the disk", errno=errno.EINVAL, offset=offset, length=length)

    def _buffers(self, buffers) -> list[memoryview]:  # type: ignore[no-untyped-def]
        result = list(buffers)
        if not all(isinstance(b, memoryview) for b in result):
            self.violations.append("buffer that is not a memoryview")
        return result

    def preadv(self, offset: int, buffers) -> None:  # type: ignore[no-untyped-def]
        views = self._buffers(buffers)
        self._check("read", offset, sum(len(v) for v in views))
        for v in views:
            v[:] = self.data[offset : offset + len(v)]
            offset += len(v)

    def pwritev(self, offset: int, buffers) -> None:  # type: ignore[no-untyped-def]
        if self._read_only:
            raise ReadOnlyError("write on read-only drive", offset=offset)
        views = self._buffers(buffers)
        self._check("write", offset, sum(len(v) for v in views))
        for v in views:
            self.data[offset : offset + len(v)] = v
            offset += len(v)

    def flush(self) -> None:
        self.requests.append(("flush", -1, -1))

    def discard(self, offset: int, length: int) -> None:
        if self._read_only:
            raise ReadOnlyError("discard on read-only drive", offset=offset, length=length)
        self._check("discard", offset, length)  # discard=ignore: the data stays

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        if self._read_only:
            raise ReadOnlyError("write-zeroes on read-only drive", offset=offset, length=length)
        self._check("write-zeroes", offset, length)
        self.data[offset : offset + length] = bytes(length)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        return BlockStatus(offset, length, True, False)

    def close(self) -> None:
        self.closed = True


def make_rng() -> VirtioRng:
    return VirtioRng(EntropySource("/dev/urandom"), RngConfig())


def make_blk(backend: FakeBackend) -> vblk.VirtioBlk:
    return vblk.VirtioBlk(backend, vblk.BlkConfig(drive_id="fuzz", serial=SERIAL))  # type: ignore[arg-type]


def bring_up(transport: VirtioMmio, features: int, ring: Ring) -> None:
    """What a driver does, register by register, with whatever ring the scenario has."""
    def w(offset: int, value: int) -> None:
        transport.write(offset, 4, value)
    basic = regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER
    w(regs.REG_STATUS, 0)
    w(regs.REG_STATUS, regs.STATUS_ACKNOWLEDGE)
    w(regs.REG_STATUS, basic)
    for sel in (0, 1):
        w(regs.REG_DRIVER_FEATURES_SEL, sel)
        w(regs.REG_DRIVER_FEATURES, (features >> (32 * sel)) & M32)
    w(regs.REG_STATUS, basic | regs.STATUS_FEATURES_OK)
    assert transport.read(regs.REG_STATUS, 4) & regs.STATUS_FEATURES_OK
    w(regs.REG_QUEUE_SEL, 0)
    w(regs.REG_QUEUE_NUM, ring.size & M32)
    for low, addr in ((regs.REG_QUEUE_DESC_LOW, ring.desc), (regs.REG_QUEUE_DRIVER_LOW, ring.avail),
                      (regs.REG_QUEUE_DEVICE_LOW, ring.used)):
        w(low, addr & M32)
        w(low + 4, (addr >> 32) & M32)
    w(regs.REG_QUEUE_READY, 1)
    w(regs.REG_STATUS, basic | regs.STATUS_FEATURES_OK | regs.STATUS_DRIVER_OK)


@dataclass
class Recorded:
    popped: list[DescriptorChain] = field(default_factory=list)
    pushed: list[tuple[DescriptorChain, int]] = field(default_factory=list)


def record(queue: Virtqueue) -> Recorded:
    """Wrap the queue's pop/push_many (instance attributes; ``push`` goes through ``push_many``) to see what
    the device was given."""
    rec = Recorded()
    pop, push_many = queue.pop, queue.push_many

    def recording_pop(dma: DmaMemory) -> DescriptorChain | None:
        chain = pop(dma)
        if chain is not None:
            rec.popped.append(chain)
        return chain

    def recording_push_many(dma: DmaMemory, entries: list[tuple[DescriptorChain, int]]) -> None:
        push_many(dma, entries)
        rec.pushed.extend(entries)

    queue.pop, queue.push_many = recording_pop, recording_push_many  # type: ignore[method-assign]
    return rec


def settle(env: Env, transport: VirtioMmio, ring: Ring) -> None:
    """Wait until the device consumed everything available or was marked broken, and finished."""
    queue = transport.queues[0]

    def settled() -> bool:
        return transport.broken or queue.last_avail == env.memory.read_u16(ring.avail + 2)

    for _ in range(100):
        assert wait_for(settled, timeout=10), (
            f"device neither served nor broke: last_avail {queue.last_avail}, popped {queue.popped}")
        with queue.lock:
            pass
        iothread_barrier(env.iothread)
        if settled():
            return
    raise AssertionError("the device keeps finding new work")


def start_bystander(env: Env) -> tuple[VirtioMmio, VirtioTestDriver]:
    transport = VirtioMmio(make_rng(), env.dma, CountingInterrupt(), env.iothread, name="bystander")
    driver = VirtioTestDriver(transport, env.memory, BYSTANDER, RAM_END - BYSTANDER)
    driver.initialise(queues={0: 8})
    return transport, driver


def check_bystander(transport: VirtioMmio, driver: VirtioTestDriver) -> None:
    buffer = driver.buffer(16)
    driver.submit(0, [(buffer, 16, True)])
    assert driver.wait_used(0, timeout=5)[0][1] == 16
    assert not transport.broken


def fuzz_device(env: Env, sc: Scenario, make_device: Callable[[], object], features: int, *,
                blk: FakeBackend | None) -> None:
    env.reset()
    install(env.memory, sc)
    bystander, bystander_driver = start_bystander(env)
    victim = VirtioMmio(make_device(), env.dma, CountingInterrupt(), env.iothread, name="victim")  # type: ignore[arg-type]
    try:
        ring = sc.ring
        queue = victim.queues[0]
        rec = record(queue)
        iothread_barrier(env.iothread)  # the bystander's DRIVER_OK kick is done
        before = snapshot(env.memory)
        image = Image(env.memory, before)
        ring_ok = ref_ring_ok(image, ring)
        expected, expected_error = ref_all(image, ring, sc.indirect) if ring_ok else ([], None)
        assume(sum(c.readable_length + c.writable_length for c in expected) <= MAX_BYTES_PER_EXAMPLE)
        env.wrote.clear()
        bring_up(victim, features | (F_INDIRECT_DESC if sc.indirect else 0) | (F_EVENT_IDX if sc.event_idx else 0),
                 ring)
        victim.write(regs.REG_QUEUE_NOTIFY, 4, 0)
        if ring_ok:
            settle(env, victim, ring)
        else:
            iothread_barrier(env.iothread)
        after = snapshot(env.memory)
        wrote = list(env.wrote)

        # Broken with a guest-error reason, or everything served.
        status = victim.read(regs.REG_STATUS, 4)
        if victim.broken:
            reason = victim.broken_reason or ""
            assert BROKEN_REASON.match(reason), f"device failed with a foreign error: {reason}"
            assert status & regs.STATUS_DEVICE_NEEDS_RESET
            if reason.startswith("VirtqueueError"):
                assert victim.interrupt_status & regs.INT_CONFIG_CHANGE
        else:
            assert ring_ok and queue.ready and not status & regs.STATUS_DEVICE_NEEDS_RESET
            assert len(rec.pushed) == len(rec.popped)
        if not ring_ok:
            assert victim.broken and not queue.ready and not rec.popped

        # Memory: accepted chains only, writes inside their writable segments and the used ring.
        assert not env.memory.violations, env.memory.violations
        for chain in rec.popped:
            check_chain_invariants(env.memory, chain)
        writable = [(s.gpa, s.length) for c in rec.popped for s in c.segments if s.writable]
        used = [ring.used_range] if ring_ok else []
        assert all(env.memory.contains(g, n) and inside_any(g, n, writable) for g, n in wrote), wrote
        stray = unexplained_changes(env.memory, before, after, used + writable)
        assert not stray, f"device changed guest RAM at {[hex(a) for a in stray]} outside its buffers"
        unreported = unexplained_changes(env.memory, before, after, used + wrote)
        assert not unreported, f"device wrote {[hex(a) for a in unreported]} without DmaMemory.wrote"
        if blk is not None:
            assert not blk.violations, blk.violations

        event(f"malformation: {sc.label}")
        event("ring refused" if not ring_ok else "broken" if victim.broken else "served everything")
        event(f"chains served: {min(len(rec.pushed), 3)}{'+' if len(rec.pushed) > 3 else ''}")
        # Exactly what the reference predicts, unless the device's own writes changed the rings it read.
        if ring_ok and overlaps(image.reads, used + writable):
            event("device wrote over the rings it reads")
        if ring_ok and not overlaps(image.reads, used + writable):
            popped = [(c.head, c.segments) for c in rec.popped]
            if blk is None:
                assert popped == [(c.head, c.segments) for c in expected]
                assert victim.broken == (expected_error is not None), (expected_error, victim.broken_reason)
                # The device fills each buffer, up to its per-request cap (MAX_REQUEST, 64 KiB).
                assert [w for _, w in rec.pushed] == [min(c.writable_length, MAX_REQUEST) for c, _ in rec.pushed]
            else:
                unservable = next((i for i, c in enumerate(expected)
                                   if c.writable_length < 1 or c.readable_length < vblk.HEADER.size), None)
                served = expected if unservable is None else expected[: unservable + 1]
                assert popped == [(c.head, c.segments) for c in served]
                assert victim.broken == (expected_error is not None or unservable is not None)
                check_blk_statuses(env.memory, rec, used)
            for i, (chain, written) in enumerate(rec.pushed):
                elem = ring.used + 4 + 8 * (i % ring.size)
                if not overlaps([(elem, 8)], writable) and len(rec.pushed) <= ring.size:
                    assert struct.unpack("<II", env.memory.read(elem, 8)) == (chain.head, written)

        check_bystander(bystander, bystander_driver)

        # A reset brings the victim back.
        victim.write(regs.REG_STATUS, 4, 0)
        assert not victim.broken
        driver = VirtioTestDriver(victim, env.memory, DATA[1][0], DATA[1][1] - DATA[1][0])
        driver.initialise(queues={0: 8})
        if blk is None:
            buffer = driver.buffer(32)
            driver.submit(0, [(buffer, 32, True)])
            assert driver.wait_used(0, timeout=5)[0][1] == 32
        else:
            header, status_byte = driver.buffer(vblk.HEADER.pack(vblk.T_FLUSH, 0, 0)), driver.buffer(1)
            env.memory.write_u8(status_byte, 0xFF)
            driver.submit(0, [(header, 16, False), (status_byte, 1, True)])
            assert driver.wait_used(0, timeout=5)[0][1] == 1
            assert env.memory.read_u8(status_byte) == vblk.S_OK
        assert not victim.broken
    finally:
        victim.close()
        bystander.close()


def check_blk_statuses(memory: GuestMemory, rec: Recorded, used: list[tuple[int, int]]) -> None:
    """Every pushed request carries a status the spec knows, in its last writable byte, and the used
    length counts at least that byte (checked when no other write could have hit that byte)."""
    for chain, written in rec.pushed:
        assert 1 <= written <= chain.writable_length
        last = [s for s in chain.segments if s.writable][-1]
        status_at = (last.gpa + last.length - 1, 1)
        others = [(s.gpa, s.length) for c, _ in rec.pushed if c is not chain for s in c.segments if s.writable]
        own_data = [(s.gpa, s.length) for s in chain.segments if s.writable and s is not last]
        if not overlaps([status_at], others + used + own_data):
            assert memory.read_u8(status_at[0]) in (vblk.S_OK, vblk.S_IOERR, vblk.S_UNSUPP)


@settings(max_examples=120, **SETTINGS)
@given(sc=scenarios(max_sizes=(64,), shape=rng_shape(), allow_bad_rings=True, any_start=False))
def test_rng_device_survives_hostile_rings(env: Env, sc: Scenario) -> None:
    fuzz_device(env, sc, make_rng, F_VERSION_1, blk=None)


@settings(max_examples=120, **SETTINGS)
@given(sc=scenarios(max_sizes=(256,), shape=blk_shape(), allow_bad_rings=True, any_start=False),
       read_only=st.booleans())
def test_blk_device_survives_hostile_rings(env: Env, sc: Scenario, read_only: bool) -> None:
    backend = FakeBackend(bytearray(b"\x5a" * (DISK_SECTORS * SECTOR)), read_only=read_only)
    features = F_VERSION_1 | vblk.F_FLUSH | (0 if read_only else vblk.F_DISCARD | vblk.F_WRITE_ZEROES)
    fuzz_device(env, sc, lambda: make_blk(backend), features, blk=backend)


# ------------------------------------------------------------------------------------------------------
# Valid chains are served exactly.
# ------------------------------------------------------------------------------------------------------
def start_victim(env: Env, device: object, *, size: int, indirect: bool, event_idx: bool,
                 want: int | None = None) -> tuple[VirtioMmio, VirtioTestDriver, Recorded]:
    transport = VirtioMmio(device, env.dma, CountingInterrupt(), env.iothread, name="valid")  # type: ignore[arg-type]
    driver = VirtioTestDriver(transport, env.memory, DATA[0][0], DATA[0][1] - DATA[0][0])
    driver.initialise(want=want, event_idx=event_idx, indirect=indirect, queues={0: size})
    rec = record(transport.queues[0])
    iothread_barrier(env.iothread)  # the DRIVER_OK kick found nothing; from here on only our kick counts
    return transport, driver, rec


@st.composite
def valid_rng_chains(draw):  # type: ignore[no-untyped-def]
    readable = split(draw, draw(st.integers(0, 256)), 3) if draw(st.booleans()) else []
    writable = split(draw, draw(st.integers(1, 8192)), 5)
    return readable, writable, draw(st.booleans())


@settings(max_examples=60, **SETTINGS)
@given(chains=st.lists(valid_rng_chains(), min_size=1, max_size=4), indirect=st.booleans(),
       event_idx=st.booleans(), size=st.sampled_from([16, 32, 64]))
def test_rng_serves_valid_chains_exactly(env: Env, chains, indirect: bool, event_idx: bool, size: int) -> None:  # type: ignore[no-untyped-def]
    needed = 0
    for i, (readable, writable, use_indirect) in enumerate(chains):
        needed += 1 if indirect and use_indirect else len(readable) + len(writable)
        if needed > size:
            chains = chains[:i]
            break
    assume(chains)
    env.reset()
    transport, driver, rec = start_victim(env, make_rng(), size=size, indirect=indirect, event_idx=event_idx)
    try:
        submitted = {}
        for readable, writable, use_indirect in chains:
            segments = [(driver.buffer(bytes([7]) * n if n else 1), n, False) for n in readable]
            segments += [(driver.buffer(n or 1), n, True) for n in writable]
            head = driver.submit(0, segments, indirect=indirect and use_indirect, kick=False)
            submitted[head] = segments
        before = snapshot(env.memory)
        env.wrote.clear()
        driver.kick(0)
        done = driver.wait_used(0, count=len(chains), timeout=10)
        after = snapshot(env.memory)
        assert sorted(h for h, _ in done) == sorted(submitted)
        for head, written in done:
            assert written == sum(n for _, n, w in submitted[head] if w)
        writable = [(a, n) for segs in submitted.values() for a, n, w in segs if w]
        queue = driver.queues[0]
        used = [(queue.used, 6 + 8 * queue.size)]
        assert not unexplained_changes(env.memory, before, after, used + writable)
        assert not unexplained_changes(env.memory, before, after, used + env.wrote)
        for head, segs in submitted.items():
            for addr, n, w in segs:
                if w and n >= 32:
                    assert env.memory.read(addr, n) != bytes(n), "rng left a buffer zero"
        assert not transport.broken and not env.memory.violations
    finally:
        transport.close()


@st.composite
def valid_blk_requests(draw):  # type: ignore[no-untyped-def]
    """A well-formed request (some fail by design: past the end, read-only, short GET_ID buffer)."""
    kind = draw(st.sampled_from([vblk.T_OUT, vblk.T_OUT, vblk.T_IN, vblk.T_IN, vblk.T_FLUSH, vblk.T_GET_ID,
                                 vblk.T_WRITE_ZEROES, vblk.T_DISCARD]))
    sector = draw(st.one_of(st.integers(0, DISK_SECTORS - 1), st.integers(DISK_SECTORS - 2, DISK_SECTORS + 2)))
    count = draw(st.integers(0, 6))
    payload, data = b"", 0
    if kind == vblk.T_OUT:
        payload = draw(SEEDED).randbytes(count * SECTOR)
    elif kind == vblk.T_IN:
        data = count * SECTOR
    elif kind == vblk.T_GET_ID:
        data = draw(st.sampled_from([20, 20, 30, 19]))
    elif kind in (vblk.T_WRITE_ZEROES, vblk.T_DISCARD):
        flags = draw(st.sampled_from([0, 0, 1])) if kind == vblk.T_WRITE_ZEROES else 0
        payload = vblk.SEGMENT_STRUCT.pack(sector, count, flags)
    readable = vblk.HEADER.pack(kind, 0, sector) + payload
    read_split = split(draw, len(readable), 4)
    write_split = split(draw, data + 1, 4)
    return kind, sector, count, readable, read_split, write_split, draw(st.booleans())


def blk_model(disk: bytearray, request, read_only: bool) -> tuple[int, int, bytes]:  # type: ignore[no-untyped-def]
    """Expected (status, used length, data the guest reads back) of one request; updates ``disk``."""
    kind, sector, count, readable, _, write_split, _ = request
    data_length = sum(write_split) - 1
    start, end = sector * SECTOR, sector * SECTOR + count * SECTOR
    in_range = end <= len(disk)
    if kind == vblk.T_OUT:
        if read_only or not in_range:
            return vblk.S_IOERR, 1, b""
        disk[start:end] = readable[16:]
        return vblk.S_OK, 1, b""
    if kind == vblk.T_IN:
        if not in_range:
            return vblk.S_IOERR, 1, b""
        return vblk.S_OK, data_length + 1, bytes(disk[start:end])
    if kind == vblk.T_FLUSH:
        return vblk.S_OK, 1, b""
    if kind == vblk.T_GET_ID:
        if data_length < vblk.ID_BYTES:
            return vblk.S_IOERR, 1, b""
        return vblk.S_OK, vblk.ID_BYTES + 1, SERIAL.encode()[: vblk.ID_BYTES]
    if read_only or not in_range:
        return vblk.S_IOERR, 1, b""
    if kind == vblk.T_WRITE_ZEROES:
        disk[start:end] = bytes(end - start)
    return vblk.S_OK, 1, b""


@settings(max_examples=60, **SETTINGS)
@given(requests=st.lists(valid_blk_requests(), min_size=1, max_size=5), indirect=st.booleans(),
       event_idx=st.booleans(), read_only=st.booleans(), seed=SEEDED)
def test_blk_requests_round_trip_through_the_backend(env: Env, requests, indirect: bool, event_idx: bool,  # type: ignore[no-untyped-def]
                                                    read_only: bool, seed) -> None:
    env.reset()
    disk = bytearray(seed.randbytes(DISK_SECTORS * SECTOR))
    backend = FakeBackend(bytearray(disk), read_only=read_only)
    transport, driver, rec = start_victim(env, make_blk(backend), size=64, indirect=indirect, event_idx=event_idx)
    try:
        submitted = []
        for request in requests:
            _, _, _, readable, read_split, write_split, use_indirect = request
            segments, pos = [], 0
            for n in read_split:
                segments.append((driver.buffer(readable[pos : pos + n] or 1), n, False))
                pos += n
            for n in write_split:
                addr = driver.buffer(n or 1)
                env.memory.fill(addr, max(n, 1), 0xEE)
                segments.append((addr, n, True))
            head = driver.submit(0, segments, indirect=indirect and use_indirect, kick=False)
            submitted.append((head, request, segments))
        before = snapshot(env.memory)
        env.wrote.clear()
        driver.kick(0)
        done = dict(driver.wait_used(0, count=len(requests), timeout=10))
        after = snapshot(env.memory)
        assert not transport.broken, transport.broken_reason
        model = bytearray(disk)
        for head, request, segments in submitted:
            status, used_length, data = blk_model(model, request, read_only)
            stream = b"".join(env.memory.read(a, n) for a, n, w in segments if w)
            assert stream[-1] == status, (request[0], stream[-1], status)
            assert done[head] == used_length
            if data:
                assert stream[: len(data)] == data
            else:
                assert stream[:-1] == bytes([0xEE]) * (len(stream) - 1), "device wrote data for a failed request"
        assert backend.data == model
        assert not backend.violations
        writable = [(a, n) for _, _, segs in submitted for a, n, w in segs if w]
        queue = driver.queues[0]
        used = [(queue.used, 6 + 8 * queue.size)]
        assert not unexplained_changes(env.memory, before, after, used + writable)
        unreported = unexplained_changes(env.memory, before, after, used + env.wrote)
        assert not unreported, f"bytes {[hex(a) for a in unreported]} changed without DmaMemory.wrote"
        assert not env.memory.violations
    finally:
        transport.close()
