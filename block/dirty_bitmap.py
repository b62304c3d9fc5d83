"""Dirty bitmaps: which parts of a node were written since a point in time (QEMU's BdrvDirtyBitmap).

Incremental backup, NBD's ``qemu:dirty-bitmap:`` context and fleecing all ask one question -- "which
granules changed?" -- so this module answers it once: a :class:`DirtyBitmap` is one bit per ``granularity``
bytes of the node, and a :class:`BitmapSet` is the list of bitmaps attached to one node, which every write
path (:class:`~pyemu.block.backend.BlockBackend`) marks.

The bits are kept in exactly the byte layout qcow2 stores on disk (bit ``i`` is bit ``i % 8``, least
significant first, of byte ``i // 8``), so serialisation is a slice copy, and memory is
``size / granularity / 8`` bytes. Scans for dirty extents use C-speed byte operations (``lstrip`` of zero or
0xff bytes) over bounded chunks instead of Python loops over bits, which keeps ``dirty_extents`` fast on
sparse bitmaps of large disks.

The flags follow QEMU: *enabled* bitmaps record writes; *busy* ones are in use by an operation (a backup
job, an NBD export) and may not be changed by the user; *inconsistent* ones were found in use by a writer
that did not close cleanly and cannot be trusted (they can only be removed); *readonly* ones belong to a
read-only image. Changes by users go through :meth:`BitmapSet.check_modifiable` for QEMU's messages.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from contextlib import contextmanager
from typing import Iterator, Protocol

from pyemu.block.errors import BlockError

MIN_GRANULARITY = 512
MAX_GRANULARITY = 1 << 31
MAX_NAME_BYTES = 1023  # qcow2's limit; QEMU applies it to every bitmap name
MAX_BITMAP_BYTES = 1 << 29  # 512 MiB of bits (QEMU's limit for a stored bitmap): a 2 TiB disk at 512 B
_SCAN_CHUNK = 1 << 16  # bytes examined per C-level scan step


class BitmapError(BlockError):
    """A dirty bitmap operation was refused; the message is the one QEMU gives (QMP GenericError)."""


def default_granularity(node: object) -> int:
    """QEMU's default for a new bitmap: the image's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB for
    nodes without clusters (raw)."""
    cluster = getattr(node, "cluster_size", 0)
    return min(65536, max(4096, cluster)) if cluster else 65536


def check_granularity(granularity: int) -> None:
    """A power of two between 512 B and 2 GiB, as QEMU requires."""
    if type(granularity) is not int or granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY \
            or granularity & (granularity - 1):
        raise BitmapError("Granularity must be power of 2 and at least 512" if type(granularity) is not int
                          or granularity <= MAX_GRANULARITY else
                          f"Granularity exceeds maximum ({MAX_GRANULARITY} bytes)")


class DirtyBitmap:
    """One bit per ``granularity`` bytes of a ``size``-byte node. Thread safe (one lock per bitmap)."""

    def __init__(self, name: str, size: int, granularity: int, *, enabled: bool = True, persistent: bool = False,
                 inconsistent: bool = False, readonly: bool = False) -> None:
        check_granularity(granularity)
        if size < 0:
            raise BitmapError(f"Bitmap '{name}': negative size {size}")
        if -(-size // granularity) > MAX_BITMAP_BYTES * 8:
            raise BitmapError(f"Bitmap '{name}' would need {-(-size // granularity) // 8} bytes of memory "
                              f"(more than {MAX_BITMAP_BYTES}); use a larger granularity")
        self.name = name
        self.size = size
        self.granularity = granularity
        self.enabled = enabled
        self.persistent = persistent
        self.inconsistent = inconsistent
        self.readonly = readonly
        self.busy = False
        self.nbits = -(-size // granularity)
        self._bits = bytearray(-(-self.nbits // 8))
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"DirtyBitmap({self.name!r}, granularity={self.granularity}, count={self.count()}, "
                f"enabled={self.enabled}, persistent={self.persistent})")

    # -- bits ----------------------------------------------------------------------------------------------

    def _bit_range(self, offset: int, length: int) -> tuple[int, int]:
        """Bits [first, end) touched by bytes [offset, offset + length), clipped to the node."""
        if length <= 0 or offset >= self.size:
            return 0, 0
        offset = max(0, offset)
        end = min(self.size, offset + length)
        return offset // self.granularity, -(-end // self.granularity)

    def set_range(self, offset: int, length: int) -> None:
        """Mark every granule that bytes [offset, offset + length) touch."""
        first, end = self._bit_range(offset, length)
        if first < end:
            with self._lock:
                _fill(self._bits, first, end, True)

    def reset_range(self, offset: int, length: int) -> None:
        """Clear the granules that bytes [offset, offset + length) touch (a granule partly covered too, as
        QEMU's reset of an unaligned range: the caller copied or discarded the whole granule)."""
        first, end = self._bit_range(offset, length)
        if first < end:
            with self._lock:
                _fill(self._bits, first, end, False)

    def get(self, offset: int) -> bool:
        """Is the granule holding byte ``offset`` dirty?"""
        if not 0 <= offset < self.size:
            return False
        bit = offset // self.granularity
        return bool(self._bits[bit >> 3] >> (bit & 7) & 1)

    def clear(self) -> None:
        with self._lock:
            self._bits[:] = bytes(len(self._bits))

    def count(self) -> int:
        """Dirty bytes, counted in whole granules (QEMU's ``count``), the last one clipped to the size."""
        total = 0
        with self._lock:
            view = memoryview(self._bits)
            for start in range(0, len(view), _SCAN_CHUNK):
                total += int.from_bytes(view[start:start + _SCAN_CHUNK], "little").bit_count()
            last_dirty = self.nbits and bool(self._bits[(self.nbits - 1) >> 3] >> ((self.nbits - 1) & 7) & 1)
        dirty = total * self.granularity
        if last_dirty:
            dirty -= self.nbits * self.granularity - self.size
        return dirty

    def merge_from(self, other: "DirtyBitmap") -> None:
        """OR ``other`` into this bitmap (same size; granularities may differ, as QEMU allows)."""
        if other.size != self.size:
            raise BitmapError("Bitmaps are incompatible and can't be merged")
        if other.granularity == self.granularity:
            self.merge_bits(other.copy_bits())
            return
        for start, length in list(other.dirty_extents(0, self.size)):
            self.set_range(start, length)

    def take_bits(self) -> bytes:
        """Return the bits and clear them in one step (a backup job restarting the bitmap at its point in
        time: a write marked in between is neither lost nor counted twice)."""
        with self._lock:
            bits = bytes(self._bits)
            self._bits[:] = bytes(len(self._bits))
            return bits

    def merge_bits(self, bits: bytes) -> None:
        """OR bits saved earlier by :meth:`copy_bits` back in, atomically with respect to writers marking the
        bitmap (a read-modify-write by the caller could drop a bit set in between)."""
        with self._lock:
            for start in range(0, min(len(bits), len(self._bits)), _SCAN_CHUNK):  # bounded, C-speed OR
                end = min(len(bits), len(self._bits), start + _SCAN_CHUNK)
                merged = int.from_bytes(self._bits[start:end], "little") | int.from_bytes(bits[start:end], "little")
                self._bits[start:end] = merged.to_bytes(end - start, "little")

    def resize(self, size: int) -> None:
        """Follow the node to a new size (image resize): bits of the kept range stay, a grown range is
        clean, bits past a shrunk end are dropped."""
        nbits = -(-size // self.granularity)
        if nbits > MAX_BITMAP_BYTES * 8:
            raise BitmapError(f"Bitmap '{self.name}' would need {nbits // 8} bytes of memory "
                              f"(more than {MAX_BITMAP_BYTES}); use a larger granularity")
        with self._lock:
            bits = bytearray(-(-nbits // 8))
            keep = min(len(bits), len(self._bits))
            bits[:keep] = self._bits[:keep]
            spare = len(bits) * 8 - nbits
            if spare and bits:
                bits[-1] &= 0xFF >> spare
            self._bits, self.size, self.nbits = bits, size, nbits

    def copy_bits(self) -> bytes:
        with self._lock:
            return bytes(self._bits)

    # -- extents -------------------------------------------------------------------------------------------

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """(start, length) of every dirty run intersecting [offset, offset + length), clipped to that
        range and to the node. Runs are found with byte-level scans, so clean stretches cost almost
        nothing."""
        end = self.size if length is None else min(self.size, offset + length)
        pos = max(0, offset)
        g = self.granularity
        while pos < end:
            start_bit = self._next(pos // g, -(-end // g), True)
            if start_bit is None:
                return
            stop_bit = self._next(start_bit, -(-end // g), False)
            start = max(pos, start_bit * g)
            stop = end if stop_bit is None else min(end, stop_bit * g)
            if stop > start:
                yield start, stop - start
            pos = stop

    def extent_at(self, offset: int, length: int) -> tuple[bool, int]:
        """(dirty?, run length) of the run starting at ``offset``, at most ``length`` bytes: what NBD
        block-status and backup jobs ask for one extent at a time."""
        end = min(self.size, offset + length)
        if offset >= end:
            return False, 0
        g = self.granularity
        dirty = self.get(offset)
        stop_bit = self._next(offset // g, -(-end // g), not dirty)
        stop = end if stop_bit is None else min(end, stop_bit * g)
        return dirty, stop - offset

    def _next(self, bit: int, end_bit: int, value: bool) -> int | None:
        """The first bit in [bit, end_bit) equal to ``value``, or None."""
        bits = self._bits
        end_bit = min(end_bit, self.nbits)
        while bit < end_bit:
            byte = bits[bit >> 3]
            if not value:
                byte ^= 0xFF
            byte >>= bit & 7
            if byte:
                found = bit + ((byte & -byte).bit_length() - 1)
                return found if found < end_bit else None
            bit = (bit | 7) + 1
            if bit & 7 == 0:
                # Whole bytes: skip those that are all-clean (or all-dirty) in C.
                skip = b"\x00" if value else b"\xff"
                byte_index = bit >> 3
                last_byte = -(-end_bit // 8)
                step = 64  # short runs are the common case: start small, double up to the chunk size
                while byte_index < last_byte:
                    chunk = bits[byte_index:min(last_byte, byte_index + step)]
                    rest = chunk.lstrip(skip)
                    byte_index += len(chunk) - len(rest)
                    if rest:
                        break
                    step = min(step * 2, _SCAN_CHUNK)
                bit = byte_index * 8
        return None

    # -- serialisation (qcow2's layout) ----------------------------------------------------------------------

    def serialized_size(self) -> int:
        return len(self._bits)

    def serialize(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the on-disk bitmap data (zeros past its end)."""
        with self._lock:
            data = bytes(self._bits[start:start + length])
        return data + bytes(length - len(data))

    def deserialize(self, start: int, data: bytes | memoryview) -> None:
        """Load on-disk bitmap bytes at ``start``; bits past the last granule are dropped (an image may hold
        garbage there)."""
        with self._lock:
            room = max(0, len(self._bits) - start)
            self._bits[start:start + min(room, len(data))] = bytes(data[:room])
            spare = len(self._bits) * 8 - self.nbits
            if spare and self._bits:
                self._bits[-1] &= 0xFF >> spare

    def fill(self) -> None:
        """Mark everything dirty (a bitmap table entry saying "all ones")."""
        self.set_range(0, self.size)

    def info(self) -> dict[str, object]:
        """QEMU's BlockDirtyInfo."""
        info: dict[str, object] = {"name": self.name, "recording": self.enabled and not self.inconsistent,
                                   "persistent": self.persistent, "busy": self.busy,
                                   "granularity": self.granularity, "count": self.count()}
        if self.inconsistent:  # QEMU leaves the member out unless it is true
            info["inconsistent"] = True
        return info


def _fill(bits: bytearray, first: int, end: int, value: bool) -> None:
    """Set bits [first, end) of ``bits`` to ``value``."""
    byte_first, byte_end = first >> 3, end >> 3
    if byte_first == byte_end:
        mask = ((1 << (end - first)) - 1) << (first & 7)
        bits[byte_first] = bits[byte_first] | mask if value else bits[byte_first] & ~mask
        return
    if first & 7:
        mask = (0xFF << (first & 7)) & 0xFF
        bits[byte_first] = bits[byte_first] | mask if value else bits[byte_first] & ~mask
        byte_first += 1
    if byte_end > byte_first:
        bits[byte_first:byte_end] = (b"\xff" if value else b"\x00") * (byte_end - byte_first)
    if end & 7:
        mask = (1 << (end & 7)) - 1
        bits[byte_end] = bits[byte_end] | mask if value else bits[byte_end] & ~mask


class BitmapStore(Protocol):
    """Where persistent bitmaps of a node live (qcow2's bitmaps extension); None for formats without one."""

    def check_new_persistent(self, name: str, granularity: int) -> None:
        """Raise BitmapError when a new persistent bitmap cannot be stored (QEMU's can_store check)."""
        ...

    def remove_persistent(self, name: str) -> None:
        """Drop a stored bitmap from the image now (QEMU removes it from the file at once)."""
        ...


class RecordingChanges:
    """How many times the bitmaps that record writes changed, anywhere in this process: a sequence count,
    odd while a change is under way.

    Why: native code that completes guest writes without Python (virtio-blk's C data plane) may let the
    guest see a write before Python marks its range only while no bitmap records it. It takes this count
    with the answer "nothing records" and compares it, at :attr:`address`, once the write is done: a bitmap
    that started recording in between (the count moved) sends the write through Python's marking first.
    A bitmap that starts recording only after that comparison missed a write that had already ended, as
    in QEMU, where a write that finished before a bitmap was created is not in it."""

    def __init__(self) -> None:
        self._word = ctypes.c_uint64(0)
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._word.value

    @property
    def address(self) -> int:
        """Where native code reads the count (a uint64_t; this object keeps it alive)."""
        return ctypes.addressof(self._word)

    @contextmanager
    def changing(self) -> Iterator[None]:
        with self._lock:
            self._word.value += 1
            try:
                yield
            finally:
                self._word.value += 1


RECORDING_CHANGES = RecordingChanges()


class BitmapSet:
    """The dirty bitmaps of one node. Write paths call :meth:`mark`; QMP and tools manage the set."""

    def __init__(self, node: object) -> None:
        self._node = weakref.ref(node)
        self._bitmaps: dict[str, DirtyBitmap] = {}
        self._enabled: tuple[DirtyBitmap, ...] = ()
        self._lock = threading.Lock()
        self.store: BitmapStore | None = None
        self._hidden: list[DirtyBitmap] = []

    def __iter__(self) -> Iterator[DirtyBitmap]:
        with self._lock:
            return iter(list(self._bitmaps.values()))

    def __len__(self) -> int:
        return len(self._bitmaps)

    def __contains__(self, name: object) -> bool:
        return name in self._bitmaps

    def get(self, name: str) -> DirtyBitmap | None:
        return self._bitmaps.get(name)

    def find(self, name: str) -> DirtyBitmap:
        bitmap = self._bitmaps.get(name)
        if bitmap is None:
            raise BitmapError(f"Dirty bitmap '{name}' not found")
        return bitmap

    # -- the write path ------------------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Every enabled bitmap records a write to [offset, offset + length). Lock free for readers: the
        tuple of enabled bitmaps is replaced, never changed in place."""
        for bitmap in self._enabled:
            bitmap.set_range(offset, length)

    @property
    def recording(self) -> bool:
        """Some bitmap of the set records writes now (what :meth:`mark` would set)."""
        return bool(self._enabled)

    def _refresh(self) -> None:
        with RECORDING_CHANGES.changing():
            self._enabled = tuple(b for b in self._bitmaps.values()
                                  if b.enabled and not b.inconsistent and not b.readonly) + \
                tuple(b for b in self._hidden if b.enabled)

    def add_hidden(self, bitmap: DirtyBitmap) -> None:
        """Attach a nameless bitmap a job uses internally (a mirror's dirty bitmap, QEMU's anonymous
        bitmap): it records writes but is not listed, looked up or persisted."""
        with self._lock:
            self._hidden.append(bitmap)
            self._refresh()

    def remove_hidden(self, bitmap: DirtyBitmap) -> None:
        with self._lock:
            if bitmap in self._hidden:
                self._hidden.remove(bitmap)
            self._refresh()

    # -- management ----------------------------------------------------------------------------------------

    def add(self, bitmap: DirtyBitmap, *, check_store: bool = True, node_label: str = "") -> DirtyBitmap:
        """Attach ``bitmap``; a persistent one must be storable in the node's image. ``node_label`` is how
        messages name the node (the name the user gave)."""
        name = bitmap.name
        if not name:
            raise BitmapError("Bitmap name cannot be empty")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise BitmapError(f"Bitmap name too long: {name}")
        with self._lock:
            if name in self._bitmaps:
                raise BitmapError(f"Bitmap already exists: {name}")
        if bitmap.persistent and check_store:
            label = node_label or _label(self._node())
            if self.store is None:
                raise BitmapError(f"Can't store persistent bitmaps to {label}: Operation not supported")
            try:
                self.store.check_new_persistent(name, bitmap.granularity)
            except BitmapError as exc:
                raise BitmapError(f"Can't make bitmap '{name}' persistent in '{label}': {exc}") from None
        with self._lock:
            if name in self._bitmaps:
                raise BitmapError(f"Bitmap already exists: {name}")
            self._bitmaps[name] = bitmap
            self._refresh()
        return bitmap

    def create(self, name: str, *, granularity: int, enabled: bool = True, persistent: bool = False,
               node_label: str = "") -> DirtyBitmap:
        """A new, clean bitmap over the whole node (QEMU's block-dirty-bitmap-add)."""
        node = self._node()
        size = node.size() if node is not None else 0  # type: ignore[attr-defined]
        return self.add(DirtyBitmap(name, size, granularity, enabled=enabled, persistent=persistent),
                        node_label=node_label)

    def remove(self, name: str) -> DirtyBitmap:
        """Detach (and drop from the image, if persistent). Allowed for inconsistent bitmaps."""
        bitmap = self.find(name)
        check_modifiable(bitmap, allow_inconsistent=True)
        if bitmap.persistent and self.store is not None:
            self.store.remove_persistent(name)
        with self._lock:
            self._bitmaps.pop(name, None)
            self._refresh()
        return bitmap

    def set_enabled(self, name: str, enabled: bool) -> None:
        bitmap = self.find(name)
        check_modifiable(bitmap, allow_readonly=True)  # QEMU: BDRV_BITMAP_ALLOW_RO for enable/disable
        with self._lock:
            bitmap.enabled = enabled
            self._refresh()

    def clear(self, name: str) -> None:
        bitmap = self.find(name)
        check_modifiable(bitmap)
        bitmap.clear()

    def refresh(self) -> None:
        """Recompute which bitmaps record writes (after flags changed from outside, e.g. busy/readonly)."""
        with self._lock:
            self._refresh()

    def drop_all(self) -> None:
        with self._lock:
            self._bitmaps.clear()
            self._refresh()


def check_modifiable(bitmap: DirtyBitmap, *, allow_inconsistent: bool = False,
                     allow_readonly: bool = False) -> None:
    """QEMU's bdrv_dirty_bitmap_check with BDRV_BITMAP_DEFAULT; ``allow_readonly`` is its BDRV_BITMAP_ALLOW_RO
    (enable/disable only change the in-memory recording flag, which a read-only image may have)."""
    if bitmap.busy:
        raise BitmapError(f"Bitmap '{bitmap.name}' is currently in use by another operation and cannot be used")
    if bitmap.readonly and not allow_readonly:
        raise BitmapError(f"Bitmap '{bitmap.name}' is readonly and cannot be modified")
    if bitmap.inconsistent and not allow_inconsistent:
        raise BitmapError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used\n"
                          "Try block-dirty-bitmap-remove to delete this bitmap from disk")


def _label(node: object) -> str:
    return str(getattr(node, "node_name", None) or getattr(node, "filename", "node"))


_sets: "weakref.WeakKeyDictionary[object, BitmapSet]" = weakref.WeakKeyDictionary()
_sets_lock = threading.Lock()


def bitmaps_of(node: object) -> BitmapSet:
    """The bitmap set of ``node`` (created empty on first use). Kept beside the node rather than in each
    driver class so every format (raw, qcow2, filters later) has one without code of its own."""
    with _sets_lock:
        found = _sets.get(node)
        if found is None:
            found = _sets[node] = BitmapSet(node)
        return found


def existing_bitmaps(node: object) -> BitmapSet | None:
    """The node's set if it has one (the write path asks this: no set, nothing to mark)."""
    return _sets.get(node)
