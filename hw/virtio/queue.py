"""Split virtqueues (virtio 1.x, section 2.7), read with every guest-written value treated as hostile.

The guest owns three rings in its RAM: the descriptor table (16-byte entries: address, length, flags,
next), the available ring (heads the driver offers) and the used ring (heads the device gives back with
the number of bytes written). :meth:`Virtqueue.pop` walks one chain and checks everything the guest
controls before any of it is used: indices inside the table, chains no longer than the queue (a loop
would be longer), indirect tables only when negotiated, never nested and a whole number of entries,
device-readable segments before device-writable ones, every segment inside guest RAM, and lengths that do
not overflow 32 bits. Any violation raises :class:`~pyemu.hw.virtio.errors.VirtqueueError`; the
transport then marks the device DEVICE_NEEDS_RESET. Nothing here can touch host memory outside guest RAM:
all access goes through bounds-checked views.

Notification suppression follows VIRTIO_F_EVENT_IDX when negotiated (``used_event`` / ``avail_event``),
else the driver's VRING_AVAIL_F_NO_INTERRUPT flag.
"""

from __future__ import annotations

import operator
import struct
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from pyemu.block.iovec import ByteViews
from pyemu.errors import GuestMemoryError
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio.errors import VirtqueueError
from pyemu.system.memory import store_u16

_FENCE = threading.Lock()


def full_fence() -> None:
    """A full memory barrier between this thread's earlier stores and its later loads (QEMU's smp_mb()).

    Why: notification suppression is a Dekker-style handshake with the guest. The device publishes the used
    index and then reads ``used_event``; the driver publishes ``used_event`` and then reads the used index
    (the same for ``avail_event`` and the available index). Each side fences between its store and its
    load; without the device's fence, an x86 host may let its load pass its store, both sides read the old
    value, and the interrupt (or the kick) is lost until some later request. Taking an uncontended lock is
    an atomic read-modify-write (``lock cmpxchg``), a full barrier on x86, and costs well under a
    microsecond."""
    with _FENCE:
        pass


DESC_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
_DESCRIPTOR = struct.Struct("<QIHH")  # address, length, flags, next
MAX_SEGMENT_TOTAL = 1 << 32
"""A chain's bytes in one direction must fit the used ring's 32-bit length field."""


BULK_TABLE_ENTRIES = 1024
"""Indirect tables up to this many entries are read in one unpack (larger ones, which no driver sends,
entry by entry, so a hostile size cannot make the cached formats large)."""


@lru_cache(maxsize=64)
def _table_struct(entries: int) -> struct.Struct:
    """A struct for a whole table of ``entries`` descriptors (tables come in a few sizes)."""
    return struct.Struct("<" + "QIHH" * entries)


_NEXT_WRITE = DESC_F_NEXT | DESC_F_WRITE


def _linear_table(flat: tuple[int, ...], entries: int, lo: int, hi: int) -> tuple[
        tuple[Piece, ...], tuple[Piece, ...], int, int] | None:
    """The pieces of an indirect table laid out as drivers lay them out -- entry i links to i+1, the last
    ends the chain, device-readable entries first, no empty or indirect entries, every buffer inside the
    RAM span ``[lo, hi)`` -- checked with whole-column operations instead of an entry-by-entry loop;
    None for any other table (the walk's loop then decides, so no verdict differs)."""
    addrs, lengths, flags, links = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
    if links[:-1] != _successors(entries) or flags[-1] & ~DESC_F_WRITE:
        return None
    body = flags[:-1]
    readable = body.count(DESC_F_NEXT)
    if readable + body.count(_NEXT_WRITE) != entries - 1:
        return None  # an entry with other flags (indirect, or no NEXT) before the last
    if 0 in lengths or min(addrs) < lo:
        return None
    # The sum of the largest address and the largest length bounds every entry's end (one pass each
    # instead of a sum per entry); only a table near the end of RAM needs the exact ends.
    if max(addrs) + max(lengths) > hi and max(map(operator.add, addrs, lengths)) > hi:
        return None
    # Readable entries first: the NEXT-only flags form a prefix, and after the first writable entry the
    # chain's end must be writable too.
    first_writable = body.index(_NEXT_WRITE) if readable < entries - 1 else entries - 1
    if readable != first_writable:
        return None
    if not flags[-1] & DESC_F_WRITE:
        if first_writable < entries - 1:
            return None
        first_writable = entries
    read_total, write_total = sum(lengths[:first_writable]), sum(lengths[first_writable:])
    if read_total >= MAX_SEGMENT_TOTAL or write_total >= MAX_SEGMENT_TOTAL:
        return None
    pieces = tuple(zip(addrs, lengths))
    return pieces[:first_writable], pieces[first_writable:], read_total, write_total


@lru_cache(maxsize=64)
def _successors(entries: int) -> tuple[int, ...]:
    return tuple(range(1, entries))


class _Rings(NamedTuple):
    """Views of one activated queue's rings (all None when they are not wholly inside guest RAM). The
    used ring is written only through its typed views, one store per field: the driver reads it while
    the device writes, and ``struct.pack_into`` would zero a field before writing it
    (:func:`pyemu.system.memory.store_u16` says more)."""

    desc: memoryview | None
    avail: memoryview | None
    used_u16: memoryview | None  # flags, idx, ..., avail_event
    used_u32: memoryview | None  # the header word, then id and len of each element


_NO_RINGS = _Rings(None, None, None, None)
_U16 = struct.Struct("<H")


class Segment(NamedTuple):
    """One descriptor's buffer: ``length`` bytes of guest RAM at ``gpa``, device-writable or not."""

    gpa: int
    length: int
    writable: bool


Piece = tuple[int, int]
"""A guest ``(gpa, size)`` range."""


def _locate(pieces: tuple[Piece, ...], total: int, offset: int) -> tuple[int, int]:
    """``(index, start)`` of the piece that holds byte ``offset`` (``0 <= offset < total``) of a stream of
    ``total`` bytes, searched from the nearer end: a block request's header, status byte and data
    boundaries all sit one or two pieces from an end of a chain of up to 256."""
    if offset < total - offset:
        cursor = 0
        for index, (_gpa, size) in enumerate(pieces):
            if cursor + size > offset:
                return index, cursor
            cursor += size
    else:
        cursor = total
        for index in range(len(pieces) - 1, -1, -1):
            size = pieces[index][1]
            cursor -= size
            if size and cursor <= offset:
                return index, cursor
    raise AssertionError(f"byte {offset} is not in a stream of {total}")  # ranges() checked the bounds


class DescriptorChain:
    """One request: the head index the used ring gets back, and its buffers in order (readable first).

    Kept as two tuples of ``(gpa, length)`` pieces, readable and writable, with their byte totals, because
    a block request carries a piece per guest page (up to 256) and every per-piece object or pass costs
    measurable time on each request; :attr:`segments` builds the :class:`Segment` view on demand."""

    __slots__ = ("head", "readable", "writable", "readable_length", "writable_length")

    def __init__(self, head: int, segments: tuple[Segment, ...] | list[Segment]) -> None:
        kinds = [s.writable for s in segments]
        if True in kinds and False in kinds[kinds.index(True):]:
            raise ValueError("a descriptor chain lists its device-readable buffers first")
        # Empty buffers carry no bytes (the walk never keeps one): leaving them out keeps every piece
        # that ranges() and views() hand out non-empty.
        readable = tuple((s.gpa, s.length) for s in segments if not s.writable and s.length)
        writable = tuple((s.gpa, s.length) for s in segments if s.writable and s.length)
        self._set(head, readable, writable, sum(n for _, n in readable), sum(n for _, n in writable))

    def _set(self, head: int, readable: tuple[Piece, ...], writable: tuple[Piece, ...], readable_length: int,
             writable_length: int) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_length = readable_length
        self.writable_length = writable_length

    @classmethod
    def from_pieces(cls, head: int, readable: tuple[Piece, ...], writable: tuple[Piece, ...],
                    readable_length: int, writable_length: int) -> "DescriptorChain":
        """A chain whose pieces a walk has already checked (no per-piece work here)."""
        chain = cls.__new__(cls)
        chain._set(head, readable, writable, readable_length, writable_length)
        return chain

    @property
    def segments(self) -> tuple[Segment, ...]:
        return (tuple(Segment(gpa, n, False) for gpa, n in self.readable)
                + tuple(Segment(gpa, n, True) for gpa, n in self.writable))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DescriptorChain):
            return NotImplemented
        return (self.head, self.readable, self.writable) == (other.head, other.readable, other.writable)

    def __hash__(self) -> int:
        return hash((self.head, self.readable, self.writable))

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"

    def ranges(self, *, writable: bool, start: int = 0, length: int | None = None) -> list[Piece]:
        """The guest ``(gpa, size)`` pieces of ``length`` bytes from byte ``start`` of the readable (or
        writable) stream. Asking for more than the stream holds raises VirtqueueError (a request too short
        for its type)."""
        total = self.writable_length if writable else self.readable_length
        if length is None:
            length = total - start
        if start < 0 or length < 0 or start + length > total:
            raise VirtqueueError(-1, f"request needs bytes {start}..{start + length} of a "
                                     f"{'writable' if writable else 'readable'} area of {total}")
        if length == 0:
            return []
        pieces = self.writable if writable else self.readable
        if len(pieces) == 1:  # a one-buffer chain (a mergeable receive buffer): no walk
            return [(pieces[0][0] + start, length)]
        end = start + length
        first, first_at = _locate(pieces, total, start)
        last, last_at = _locate(pieces, total, end - 1)
        out = list(pieces[first:last + 1])
        gpa, size = out[-1]
        if last_at + size != end:
            out[-1] = (gpa, end - last_at)
        if start != first_at:
            gpa, size = out[0]
            out[0] = (gpa + start - first_at, size - (start - first_at))
        return out

    def views(self, dma: DmaMemory, *, writable: bool, start: int = 0, length: int | None = None) -> ByteViews:
        """Zero-copy views of the pieces :meth:`ranges` names (same arguments, same VirtqueueError), as
        the block layer's :class:`ByteViews` (flat bytes, total length known)."""
        pieces = self.ranges(writable=writable, start=start, length=length)
        if length is None:
            length = (self.writable_length if writable else self.readable_length) - start
        return ByteViews(dma.views(pieces), length, writable=True)

    def read(self, dma: DmaMemory, start: int = 0, length: int | None = None) -> bytes:
        """Copy bytes out of the readable stream (headers; payloads use :meth:`views`)."""
        views = self.views(dma, writable=False, start=start, length=length)
        return bytes(views[0]) if len(views) == 1 else b"".join(views)

    def write(self, dma: DmaMemory, data: bytes, start: int = 0, *, report: bool = True) -> None:
        """Copy ``data`` into the writable stream at ``start`` and report it to the DMA layer. ``report=False``
        only for bytes that the chain's :meth:`Virtqueue.push` will count as written (it reports those
        itself, before the driver can see the chain): a block request's status byte, ~3 µs per request."""
        pieces = self.ranges(writable=True, start=start, length=len(data))
        views = dma.views(pieces)  # all pieces checked before any byte is written
        offset = 0
        for view in views:
            size = view.nbytes
            view[:] = data[offset : offset + size]
            offset += size
        if report:
            dma.wrote_ranges(pieces)

    def written_ranges(self, written: int) -> list[Piece]:
        """Guest ranges covered by the first ``written`` bytes of the writable stream."""
        if written >= self.writable_length:
            return list(self.writable)
        ranges = []
        for gpa, size in self.writable:
            if written <= 0:
                break
            size = min(size, written)
            ranges.append((gpa, size))
            written -= size
        return ranges


class QueueLock:
    """A virtqueue's lock. Whoever takes it first settles a C lease on the queue (:attr:`settle`, set by a
    device whose C code may serve the queue inside its I/O thread's wait, e.g. virtio-blk's data plane):
    the C code stops serving, and what it served is folded into the queue's indices before the holder
    looks at them. So every path that takes the lock -- the I/O thread's own pass, a reset, a saved state
    -- sees one owner of the ring at a time, without knowing the lease exists."""

    __slots__ = ("_lock", "settle")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.settle: Callable[[], None] | None = None

    def __enter__(self) -> QueueLock:
        self._lock.acquire()
        settle = self.settle
        if settle is not None:
            try:
                settle()
            except BaseException:
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Virtqueue:
    """One split virtqueue. The transport writes the register fields while the queue is not ready; the
    device's I/O thread pops and pushes under :attr:`lock`."""

    def __init__(self, index: int, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"virtqueue maximum size {max_size} must be a power of two up to {MAX_QUEUE_SIZE}")
        self.index = index
        self.max_size = max_size
        self.lock = QueueLock()
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.event_idx = False
        self.indirect = False
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used: int | None = None
        self._interrupt_decided = False
        self.popped = 0
        self.pushed = 0
        self._rings: _Rings | None = None

    # -- set-up -----------------------------------------------------------------------------------------
    def ring_problem(self, dma: DmaMemory) -> str | None:
        """Why the configured rings cannot be used (None when they can): the driver wrote a size that is
        not a power of two, or rings outside guest RAM or misaligned."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            return f"queue size {size} is not a power of two up to {self.max_size}"
        for what, addr, length, align in (("descriptor table", self.desc_addr, DESC_SIZE * size, 16),
                                          ("available ring", self.avail_addr, 6 + 2 * size, 2),
                                          ("used ring", self.used_addr, 6 + 8 * size, 4)):
            if addr % align:
                return f"{what} at {addr:#x} is not {align}-byte aligned"
            if not dma.contains(addr, length):
                return f"{what} at {addr:#x}+{length:#x} is outside guest RAM"
        return None

    def activate(self, *, event_idx: bool, indirect: bool) -> None:
        """QueueReady=1: the driver initialised both rings with index 0 (virtio 1.x 4.2.3.2)."""
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used = None
        self._interrupt_decided = False
        self._rings = None
        self.ready = True

    # -- guest memory helpers ---------------------------------------------------------------------------
    def _ring_views(self, dma: DmaMemory) -> _Rings:
        """Views of the three rings, made once per activation (every pop and push reads or writes them;
        RAM stays mapped at one address for the VM's life, so the views stay valid). Rings not wholly
        inside RAM -- which the transport never activates, but a test may -- get no views, and every
        access then goes through the checked per-field path."""
        rings = self._rings
        if rings is None:
            size = self.size
            spans = ((self.desc_addr, DESC_SIZE * size), (self.avail_addr, 6 + 2 * size),
                     (self.used_addr, 6 + 8 * size))
            if all(dma.contains(a, n) for a, n in spans):
                desc, avail, used = dma.views(spans)
                rings = _Rings(desc, avail, used.cast("H"), used[:4 + 8 * size].cast("I"))
            else:
                rings = _NO_RINGS
            self._rings = rings
        return rings

    def _avail_u16(self, dma: DmaMemory, offset: int, rings: _Rings | None = None) -> int:
        """The 16-bit field at ``offset`` of the available ring (``rings``: the views, if the caller has them)."""
        view = (rings or self._ring_views(dma)).avail
        if view is not None:
            return int(_U16.unpack_from(view, offset)[0])
        return self._u16(dma, self.avail_addr + offset)

    def _put_used_u16(self, dma: DmaMemory, offset: int, value: int, rings: _Rings | None = None) -> None:
        """Store the 16-bit field at ``offset`` of the used ring (one store: the driver may be reading)."""
        words = (rings or self._ring_views(dma)).used_u16
        if words is not None:
            words[offset >> 1] = value & 0xFFFF
        else:
            self._put_u16(dma, self.used_addr + offset, value)

    def _u16(self, dma: DmaMemory, gpa: int) -> int:
        try:
            return int(struct.unpack_from("<H", dma.view(gpa, 2))[0])
        except GuestMemoryError as exc:
            raise VirtqueueError(self.index, f"ring access at {gpa:#x} outside guest RAM") from exc

    def _put_u16(self, dma: DmaMemory, gpa: int, value: int) -> None:
        try:
            store_u16(dma.view(gpa, 2), 0, value)
        except GuestMemoryError as exc:
            raise VirtqueueError(self.index, f"ring access at {gpa:#x} outside guest RAM") from exc

    # -- the available side -----------------------------------------------------------------------------
    def avail_idx(self, dma: DmaMemory) -> int:
        return self._avail_u16(dma, 2)

    def has_work(self, dma: DmaMemory) -> bool:
        return self.ready and self.avail_idx(dma) != self.last_avail

    def pop(self, dma: DmaMemory) -> DescriptorChain | None:
        """The next available chain, validated; None when the driver has offered nothing new."""
        if not self.ready:
            return None
        # The rings' views once per pop, not once per field (a received 64 KiB frame takes ~16 pops).
        rings = self._ring_views(dma)
        last = self.last_avail
        avail = self._avail_u16(dma, 2, rings)
        pending = (avail - last) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(self.index, f"available index {avail} is {pending} ahead of the device's "
                                             f"{last}, more than the queue size {self.size}")
        slot = last % self.size
        head = self._avail_u16(dma, 4 + 2 * slot, rings)
        if head >= self.size:
            raise VirtqueueError(self.index, f"available ring slot {slot} names descriptor {head} "
                                             f"of a {self.size}-entry table")
        chain = self._walk(dma, head)
        self.last_avail = last = (last + 1) & 0xFFFF
        self.popped += 1
        if self.event_idx:
            # avail_event: "notify me when you make this index available" -- i.e. on the very next one.
            # The fence orders it before the next pop's read of the available index: otherwise a buffer the
            # driver adds meanwhile could be missed by that read while the driver, still seeing the older
            # avail_event, does not notify.
            self._put_used_u16(dma, 4 + 8 * self.size, last, rings)
            full_fence()
        return chain

    def _table_view(self, dma: DmaMemory, table: int, entries: int) -> memoryview:
        try:
            return dma.view(table, DESC_SIZE * entries)
        except GuestMemoryError as exc:
            raise VirtqueueError(self.index, f"descriptor table at {table:#x} ({entries} entries) is outside "
                                             "guest RAM") from exc

    def _walk(self, dma: DmaMemory, head: int) -> DescriptorChain:
        """Follow the chain from ``head``, checking every rule in the module docstring.

        The hot loop of every device: a block request is up to 256 descriptors, a 64 KiB received frame
        takes 17 one-buffer chains. So a one-buffer chain returns after one unpack, an indirect table is
        read in one unpack (the ring's table entry by entry, as a chain there is usually short), the RAM
        bounds check is inline for the usual single-region guest, and the pieces are plain tuples."""
        spans = dma.spans
        lo, hi = spans[0] if len(spans) == 1 else (1, 0)  # (1, 0) sends every check to dma.contains
        table, table_size = self.desc_addr, self.size
        ring_table = self._ring_views(dma).desc
        entries = ring_table if ring_table is not None else self._table_view(dma, table, table_size)
        addr, length, flags, _ = _DESCRIPTOR.unpack_from(entries, DESC_SIZE * head)
        if not flags & (DESC_F_NEXT | DESC_F_INDIRECT) and length and lo <= addr and addr + length <= hi:
            # A one-buffer chain (a receive buffer, an entropy request): nothing else to check.
            piece = ((addr, length),)
            if flags & DESC_F_WRITE:
                return DescriptorChain.from_pieces(head, (), piece, 0, length)
            return DescriptorChain.from_pieces(head, piece, (), length, 0)
        readable: list[Piece] = []
        writable: list[Piece] = []
        read_total = write_total = 0
        contains = dma.contains
        index, in_indirect = head, False
        flat: tuple[int, ...] | None = None  # an indirect table's fields, read in one unpack
        unpack = _DESCRIPTOR.unpack_from
        visited = 0
        while True:
            visited += 1
            if visited > table_size:
                raise VirtqueueError(self.index, f"descriptor chain from {head} is longer than its "
                                                 f"{table_size}-entry table (a loop?)")
            if flat is None:
                addr, length, flags, nxt = unpack(entries, DESC_SIZE * index)
            else:
                base = 4 * index
                addr, length, flags, nxt = flat[base], flat[base + 1], flat[base + 2], flat[base + 3]
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError(self.index, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise VirtqueueError(self.index, "indirect descriptor inside an indirect table")
                if flags & DESC_F_NEXT:
                    raise VirtqueueError(self.index, "indirect descriptor with the NEXT flag")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise VirtqueueError(self.index, f"indirect table of {length} bytes is not 1..{MAX_QUEUE_SIZE} "
                                                     "whole descriptors")
                if not contains(addr, length):
                    raise VirtqueueError(self.index, f"indirect table at {addr:#x}+{length:#x} is outside guest RAM")
                table, table_size, index, in_indirect = addr, length // DESC_SIZE, 0, True
                entries = self._table_view(dma, table, table_size)
                if table_size <= BULK_TABLE_ENTRIES:
                    flat = _table_struct(table_size).unpack_from(entries)
                    linear = _linear_table(flat, table_size, lo, hi)
                    if linear is not None:  # the usual table: checked in bulk, same verdict as the loop
                        return DescriptorChain.from_pieces(head, *linear)
                visited = 0
                continue
            if not flags & DESC_F_WRITE and writable:
                raise VirtqueueError(self.index, f"device-readable descriptor {index} after a writable one")
            if length:
                if not (lo <= addr and addr + length <= hi) and not contains(addr, length):
                    raise VirtqueueError(self.index, f"descriptor {index} buffer {addr:#x}+{length:#x} is outside "
                                                     "guest RAM")
                if flags & DESC_F_WRITE:
                    write_total += length
                    if write_total >= MAX_SEGMENT_TOTAL:
                        raise VirtqueueError(self.index, "descriptor chain lengths overflow 32 bits")
                    writable.append((addr, length))
                else:
                    read_total += length
                    if read_total >= MAX_SEGMENT_TOTAL:
                        raise VirtqueueError(self.index, "descriptor chain lengths overflow 32 bits")
                    readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return DescriptorChain.from_pieces(head, tuple(readable), tuple(writable), read_total, write_total)
            if nxt >= table_size:
                raise VirtqueueError(self.index, f"descriptor {index} links to {nxt} outside its "
                                                 f"{table_size}-entry table")
            index = nxt

    # -- the used side ----------------------------------------------------------------------------------
    def push(self, dma: DmaMemory, chain: DescriptorChain, written: int) -> None:
        """Give ``chain`` back with ``written`` bytes written into its writable segments."""
        self.push_many(dma, [(chain, written)])

    def push_many(self, dma: DmaMemory, entries: list[tuple[DescriptorChain, int]]) -> None:
        """Give several chains back; the used index is published once, after every entry is written
        (QEMU's fill + flush), so a driver never sees the first buffer of a merged frame before the rest.
        What the device wrote into the chains is reported to the DMA layer in one call."""
        index = self.used_idx
        size = self.size
        written_ranges: list[Piece] = []
        try:
            words = self._ring_views(dma).used_u32
            if words is None:
                words = dma.view(self.used_addr, 4 + 8 * size).cast("I")
            for chain, written in entries:
                written = max(0, min(written, chain.writable_length))
                if written:
                    written_ranges.extend(chain.written_ranges(written))
                slot = 1 + 2 * (index % size)
                words[slot] = chain.head
                words[slot + 1] = written
                index = (index + 1) & 0xFFFF
        except GuestMemoryError as exc:
            raise VirtqueueError(self.index, "used ring outside guest RAM") from exc
        if written_ranges:
            dma.wrote_ranges(written_ranges)
        self._put_used_u16(dma, 2, index)
        self.used_idx = index
        self.pushed += len(entries)

    def served_elsewhere(self, dma: DmaMemory, count: int, last_avail: int, used_idx: int,
                         written_ranges: list[Piece]) -> None:
        """``count`` chains were popped and their used elements filled outside this object (virtio-blk's C
        data plane), which also kept ``avail_event``; ``written_ranges`` is what it wrote into them. Report
        those to the DMA layer and then publish the used index, in :meth:`push_many`'s order."""
        if written_ranges:
            dma.wrote_ranges(written_ranges)
        self._put_used_u16(dma, 2, used_idx)
        self._served(count, last_avail, used_idx)

    def published_elsewhere(self, count: int, last_avail: int, used_idx: int, signalled_used: int,
                            interrupt: bool) -> None:
        """As :meth:`served_elsewhere`, for chains whose used index the C plane published itself, having
        written nothing anyone must hear of, and whose interrupt it decided as :meth:`should_interrupt`
        does (``signalled_used``: the index it decided at; ``interrupt``: the driver wants one). The next
        :meth:`should_interrupt` answers True when it did."""
        self._served(count, last_avail, used_idx)
        if self.event_idx:
            self.signalled_used = signalled_used & 0xFFFF
        self._interrupt_decided = self._interrupt_decided or interrupt

    def _served(self, count: int, last_avail: int, used_idx: int) -> None:
        """The indices after ``count`` chains popped and pushed outside this object."""
        self.last_avail = last_avail & 0xFFFF
        self.popped += count
        self.used_idx = used_idx & 0xFFFF
        self.pushed += count

    def unpop(self, count: int) -> None:
        """Give the last ``count`` popped chains back to the available ring (QEMU's virtqueue_unpop), so
        buffers the device cannot use yet stay the driver's. ``avail_event`` needs no change: the pops set
        it past the last chain offered, so the driver's next buffer still notifies."""
        self.last_avail = (self.last_avail - count) & 0xFFFF
        self.popped -= count

    def should_interrupt(self, dma: DmaMemory) -> bool:
        """After pushes: does the driver want an interrupt for them? (Call once per batch.)"""
        if self._interrupt_decided:  # by a C plane for what it published (published_elsewhere)
            self._interrupt_decided = False
            self.signalled_used = self.used_idx if self.event_idx else self.signalled_used
            return True
        if not self.event_idx:
            full_fence()  # as below, for the driver's NO_INTERRUPT flag
            flags = self._avail_u16(dma, 0)
            return not flags & AVAIL_F_NO_INTERRUPT
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        if old is None:
            return True
        full_fence()  # the used index just published must be visible before used_event is read
        used_event = self._avail_u16(dma, 4 + 2 * self.size)
        # vring_need_event: interrupt if used_event lies in [old, new).
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
