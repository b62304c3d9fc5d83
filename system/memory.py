"""Guest-physical RAM: one host mapping, split into regions at guest-physical addresses.

Why one mapping: both accelerators map the very same host pages (KVM through a memory slot's userspace
address, Unicorn through ``mem_map_ptr``) and device models read and write them through memoryviews. Every
accessor is bounds-checked: an access that is not wholly inside one RAM region raises
:class:`~pyemu.errors.GuestMemoryError` instead of touching host memory outside the guest.

Two backends, as QEMU's ``memory-backend-ram`` and ``memory-backend-memfd``:

* ``ram`` (the default, QEMU's too): private anonymous memory, 2 MiB aligned and advised for transparent
  huge pages. Why the default: a device's ``O_DIRECT`` transfer into guest RAM pins the pages under it, and
  a guest's 1 MiB buffer in one huge page is one physically contiguous piece to the host's block layer
  instead of 256: measured here (2026-12-07), a 1 MiB ``O_DIRECT`` read into it took ~450-600 us against
  ~600-1100 us into memfd pages (this host's ``shmem_enabled=never`` keeps shared memory at 4 KiB pages),
  and in the guest benchmark (``benchmarks/virtio.py``, paired with QEMU) sequential reads went from 0.55
  to 0.89 of QEMU, TCP from 0.64 to 1.18; boots measured level (2.05 against 2.03 s, 16 interleaved).
* ``memfd``: shared memory a later vhost-user backend can map; holes that ``SEEK_DATA`` finds; the kernel
  image reaches it by ``sendfile``.

A mapped-ram restore (:mod:`pyemu.migration.mapped_ram`) replaces a region's pages with a private
copy-on-write mapping of the saved file at the same host address (:meth:`GuestMemory.map_file_private`);
:meth:`GuestMemory.clear` puts the memfd back.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, NewType

from pyemu.errors import ConfigError, GuestMemoryError
from pyemu.system.ram_pages import PageMapUnavailable, used_page_runs

GuestAddress = NewType("GuestAddress", int)
"""A guest-physical address (as opposed to a host pointer or an offset into the memfd)."""

PAGE_SIZE = 4096
_MAP_FIXED = 0x10  # Linux's MAP_FIXED (Python's mmap module does not export it)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
HUGE_PAGE = 2 << 20
"""x86's transparent huge page: the anonymous mapping starts on one, so guest 2 MiB pages can be host ones."""
RAM_BACKENDS = ("ram", "memfd")


@dataclass(frozen=True)
class RamRegion:
    """A contiguous run of guest RAM: ``size`` bytes at guest-physical ``gpa``, at ``offset`` in the host
    mapping."""

    gpa: int
    size: int
    offset: int

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % PAGE_SIZE or self.gpa % PAGE_SIZE or self.gpa < 0:
            raise ConfigError(
                f"RAM region at {self.gpa:#x} of {self.size:#x} bytes is not page-aligned and non-empty"
            )

    @property
    def end(self) -> int:
        """First guest-physical address after the region."""
        return self.gpa + self.size


# -- single stores into memory a vCPU may be reading ------------------------------------------------------
# Why not ``struct.pack_into``: CPython's packer clears its destination before it writes the fields
# (``memset`` in ``s_pack_internal``), so a guest reading the field meanwhile sees 0 -- measured: a C
# reader polling a 16-bit field that Python kept packing the same value into saw 0 about 31 million times
# a second. A virtqueue's used index read as 0 for a moment made Linux's virtio drivers take stale used
# entries ("id 1 is not a head!", a receive queue marked broken). An item assignment through a typed
# memoryview is one native store of the whole field. Guest memory is little-endian, as are the x86 hosts
# pyemu runs on (``sys.byteorder`` is checked at import).

if sys.byteorder != "little":  # pragma: no cover - pyemu runs x86 guests on x86 hosts
    raise ImportError("pyemu's guest-memory stores assume a little-endian host")


def store_u16(view: memoryview, offset: int, value: int) -> None:
    """``value`` into the 2 bytes at ``view[offset]`` as one store (see above)."""
    view[offset:offset + 2].cast("H")[0] = value & 0xFFFF


def store_u32(view: memoryview, offset: int, value: int) -> None:
    """``value`` into the 4 bytes at ``view[offset]`` as one store."""
    view[offset:offset + 4].cast("I")[0] = value & 0xFFFF_FFFF


def store_u64(view: memoryview, offset: int, value: int) -> None:
    """``value`` into the 8 bytes at ``view[offset]`` as one store."""
    view[offset:offset + 8].cast("Q")[0] = value & 0xFFFF_FFFF_FFFF_FFFF


class GuestMemory:
    """Guest RAM, mapped once into this process: anonymous memory (``backend="ram"``) or a memfd.

    ``layout`` is a sequence of ``(gpa, size)`` pairs; regions must not overlap. The host mapping is exposed
    for accelerators through :meth:`host_address`; device models use :meth:`view`, :meth:`read` and
    :meth:`write`.
    """

    def __init__(self, layout: list[tuple[int, int]], *, name: str = "pyemu-ram", backend: str = "ram",
                 seal: bool = False) -> None:
        if backend not in RAM_BACKENDS:
            raise ConfigError(f"unknown guest RAM backend {backend!r} (expected {', '.join(RAM_BACKENDS)})")
        regions: list[RamRegion] = []
        offset = 0
        for gpa, size in sorted(layout):
            region = RamRegion(gpa, size, offset)
            if regions and regions[-1].end > gpa:
                raise ConfigError(f"RAM regions overlap at {gpa:#x}")
            regions.append(region)
            offset += size
        if not regions:
            raise ConfigError("guest memory needs at least one RAM region")
        self.regions: tuple[RamRegion, ...] = tuple(regions)
        self._spans: tuple[tuple[int, int, int], ...] = tuple((r.gpa, r.end, r.offset) for r in regions)
        self.total_size = offset
        self.backend = backend
        self.fd = -1
        """The memfd (backend ``memfd``), else -1."""
        self._pad = 0
        """Where guest RAM starts in :attr:`_mmap`: an anonymous mapping is made a huge page larger and used
        from its first huge-page boundary (kernels before 6.7 do not align large anonymous mappings)."""
        try:
            if backend == "memfd":
                self.fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
                os.ftruncate(self.fd, offset)
                if seal:  # no resizing, ever (QEMU's memory-backend-memfd,seal=on); holes may still be punched
                    fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
                self._mmap = mmap.mmap(self.fd, offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            else:
                self._mmap = mmap.mmap(-1, offset + HUGE_PAGE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise ConfigError(f"cannot allocate {offset >> 20} MiB of guest RAM: {exc.strerror}") from exc
        start = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        if backend == "ram":
            self._pad = -start % HUGE_PAGE
            self._advise_anonymous(self._pad, offset)
        self._buffer = memoryview(self._mmap)[self._pad:self._pad + offset]
        # The host address of guest RAM, for KVM_SET_USER_MEMORY_REGION and uc.mem_map_ptr.
        self._base_ptr = start + self._pad
        self._file_backed: dict[int, tuple[int, int]] = {}
        """Regions (by gpa) mapped privately from a file, with that file's (st_dev, st_ino)."""
        self._fd_position = threading.Lock()
        """Held while the memfd's file position matters (``sendfile`` writes at it; SEEK_DATA moves it)."""
        self._no_dump = False
        """dump-guest-core=off: a region mapped anew must be excluded again (madvise flags are per mapping)."""

    # -- lookup -----------------------------------------------------------------------------------------
    def region_of(self, gpa: int, size: int = 1) -> RamRegion:
        """The region holding all of ``[gpa, gpa+size)``; raise GuestMemoryError if none does."""
        for region in self.regions:
            if region.gpa <= gpa and gpa + size <= region.end and size >= 0:
                return region
        raise GuestMemoryError(
            f"guest access at {gpa:#x} of {size} bytes is outside guest RAM", gpa=gpa, size=size
        )

    def contains(self, gpa: int, size: int = 1) -> bool:
        """True when ``[gpa, gpa+size)`` lies wholly inside one RAM region."""
        if size < 0:
            return False
        for start, end, _offset in self._spans:
            if start <= gpa and gpa + size <= end:
                return True
        return False

    def host_offset(self, gpa: int, size: int) -> int:
        """Where ``[gpa, gpa+size)`` starts in :attr:`buffer` (the whole memfd mapping); GuestMemoryError if
        it is not wholly inside one RAM region. The hot path of device DMA: one loop over a tuple."""
        if size >= 0:
            for start, end, offset in self._spans:
                if start <= gpa and gpa + size <= end:
                    return offset + gpa - start
        raise GuestMemoryError(
            f"guest access at {gpa:#x} of {size} bytes is outside guest RAM", gpa=gpa, size=size
        )

    @property
    def buffer(self) -> memoryview:
        """All of guest RAM as one writable view, indexed by :meth:`host_offset` (not by address)."""
        return self._buffer

    def host_address(self, region: RamRegion) -> int:
        """Host virtual address of the first byte of ``region`` (for accelerators)."""
        return self._base_ptr + region.offset

    def populated_spans(self, region: RamRegion) -> Iterator[tuple[int, int]]:
        """The ``(gpa, size)`` runs of ``region`` that may hold non-zero bytes, in address order.

        Why: a page the guest never touched is a hole in the memfd and reads zero, and reading it
        through the shared mapping would allocate it (shmem fills holes on a read fault), which costs a
        page fault and a zeroed page each -- scanning a mostly idle 512 MiB guest that way took most of a
        migration's time and left the source holding all its RAM. ``SEEK_DATA``/``SEEK_HOLE`` on the
        memfd find the allocated runs without touching anything; in anonymous memory the page map does
        (:mod:`pyemu.system.ram_pages`). A region mapped privately from a file (a mapped-ram restore), or
        anonymous memory where the page map cannot be read, is returned whole."""
        if region.gpa in self._file_backed:
            yield region.gpa, region.size
            return
        if self.fd < 0:
            try:
                runs = list(used_page_runs(self.host_address(region), region.size))
            except PageMapUnavailable:
                runs = [(0, region.size)]
            for offset, size in runs:
                yield region.gpa + offset, size
            return
        end = region.offset + region.size
        position = region.offset
        while position < end:
            try:
                with self._fd_position:
                    data = os.lseek(self.fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after ``position``
                return
            if data >= end:
                return
            with self._fd_position:
                hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield region.gpa + data - region.offset, hole - data
            position = hole

    # -- access -----------------------------------------------------------------------------------------
    def view(self, gpa: int, size: int) -> memoryview:
        """A writable zero-copy view of guest RAM ``[gpa, gpa+size)``."""
        start = self.host_offset(gpa, size)
        return self._buffer[start : start + size]

    def views(self, ranges: Iterable[tuple[int, int]]) -> list[memoryview]:
        """Views of several ``(gpa, size)`` ranges (a request's scatter-gather list); GuestMemoryError if
        any is not wholly inside one RAM region, before any view is handed out."""
        buffer = self._buffer
        if len(self._spans) != 1:
            host_offset = self.host_offset
            views = []
            for gpa, size in ranges:
                at = host_offset(gpa, size)
                views.append(buffer[at:at + size])
            return views
        start, end, offset = self._spans[0]
        delta = offset - start
        out = []
        for gpa, size in ranges:
            if gpa < start or gpa + size > end or size < 0:
                self.host_offset(gpa, size)  # raises the usual GuestMemoryError
            out.append(buffer[gpa + delta:gpa + delta + size])
        return out

    @property
    def spans(self) -> tuple[tuple[int, int], ...]:
        """The RAM regions as ``(start, end)`` guest-physical pairs, in address order."""
        return tuple((start, end) for start, end, _offset in self._spans)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def copy_from_file(self, gpa: int, fd: int, offset: int, size: int) -> int:
        """Copy up to ``size`` bytes of file ``fd`` at ``offset`` into guest RAM at ``gpa``; the count copied
        (less only at the file's end). OSError from the host read passes through.

        Why not always ``readinto`` a view: into memfd pages the kernel's ``sendfile`` copies page-cache pages
        straight, so guest RAM is not faulted in page by page through this process's mapping first (a ~60
        MiB vmlinux loaded in 20-25 ms instead of 35-48 ms, a fifth of pyemu's start-up). Anonymous memory
        faults in a huge page at a time, and the plain read is the quick one there (13-15 ms). A region
        mapped privately from a file is written through the mapping, where the guest sees it."""
        start = self.host_offset(gpa, size)
        if self.fd < 0 or self._file_backed and self.region_of(gpa, size).gpa in self._file_backed:
            return self._read_into_view(gpa, fd, offset, size)
        done = 0
        with self._fd_position:
            os.lseek(self.fd, start, os.SEEK_SET)
            while done < size:
                try:
                    count = os.sendfile(self.fd, fd, offset + done, size - done)
                except OSError as exc:
                    if done == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS):  # a file sendfile cannot read
                        break
                    raise
                if count == 0:
                    return done
                done += count
        if done < size:
            done += self._read_into_view(gpa + done, fd, offset + done, size - done)
        return done

    def _read_into_view(self, gpa: int, fd: int, offset: int, size: int) -> int:
        view = self.view(gpa, size)
        try:
            done = 0
            while done < size:
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    break
                done += count
            return done
        finally:
            view.release()

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.view(gpa, size)[:] = bytes([byte]) * size

    def read_u8(self, gpa: int) -> int:
        return self.view(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int(struct.unpack_from("<H", self.view(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(struct.unpack_from("<I", self.view(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(struct.unpack_from("<Q", self.view(gpa, 8))[0])

    def write_u8(self, gpa: int, value: int) -> None:
        self.view(gpa, 1)[0] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        store_u16(self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        store_u32(self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        store_u64(self.view(gpa, 8), 0, value)

    def exclude_from_core_dumps(self) -> None:
        """``-machine dump-guest-core=off``: keep guest RAM (possibly gigabytes, possibly secret) out of a
        core dump of pyemu, as QEMU does with MADV_DONTDUMP."""
        try:
            self._mmap.madvise(mmap.MADV_DONTDUMP)
            self._no_dump = True
        except OSError as exc:
            raise ConfigError(f"dump-guest-core=off: madvise(MADV_DONTDUMP) failed: {exc.strerror}") from exc

    # -- file-backed RAM (mapped-ram restore) ---------------------------------------------------------
    def map_file_private(self, region: RamRegion, fd: int, offset: int) -> None:
        """Back ``region`` with ``fd``'s bytes at ``offset``, copy-on-write (``MAP_PRIVATE``), at the very
        host address the region has now.

        Why at the same address: the accelerators were given that address once (Unicorn's ``mem_map_ptr``,
        KVM's memory slot) and keep using it; replacing the pages under it (``MAP_FIXED``) needs no
        re-registration (KVM's MMU notifiers drop the old translations). Nothing is read here: the kernel
        faults each page in from the file on first touch, and a guest write copies it privately, so the
        file never changes. The memfd's pages of the region stay unused until :meth:`clear` maps it back.
        """
        if region not in self.regions:
            raise GuestMemoryError(f"{region} is not a RAM region of this VM", gpa=region.gpa, size=region.size)
        if offset % PAGE_SIZE or offset < 0:
            raise GuestMemoryError(f"file offset {offset:#x} is not page-aligned", gpa=region.gpa, size=region.size)
        self._map_fixed(region, mmap.MAP_PRIVATE, fd, offset)
        self._file_backed[region.gpa] = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)

    def file_backed(self, st_dev: int, st_ino: int) -> bool:
        """True when some region is mapped from this file (it must not be truncated or rewritten in
        place while the VM runs: a truncated mapping raises SIGBUS on the next touch)."""
        return (st_dev, st_ino) in self._file_backed.values()

    def _map_fixed(self, region: RamRegion, flags: int, fd: int, offset: int) -> None:
        address = self.host_address(region)
        result = _libc.mmap(ctypes.c_void_p(address), ctypes.c_size_t(region.size),
                            mmap.PROT_READ | mmap.PROT_WRITE, flags | _MAP_FIXED, fd, ctypes.c_long(offset))
        if result != address:
            err = ctypes.get_errno()
            raise GuestMemoryError(f"cannot map RAM at {region.gpa:#x}: {os.strerror(err)}",
                                   gpa=region.gpa, size=region.size)
        if self._no_dump:
            self._mmap.madvise(mmap.MADV_DONTDUMP, self._pad + region.offset, region.size)

    def clear(self) -> None:
        """Zero all of guest RAM (machine reset, or a load starting over). Regions mapped from a file go
        back to the backend's memory first; the pages are then released (``MADV_REMOVE`` from a memfd,
        ``MADV_DONTNEED`` from anonymous memory) rather than written, so clearing costs no page allocation
        and gives the host its memory back (a released page reads zero)."""
        for region in self.regions:
            if region.gpa in self._file_backed:
                if self.fd >= 0:
                    self._map_fixed(region, mmap.MAP_SHARED, self.fd, region.offset)
                else:
                    self._map_fixed(region, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
                    self._advise_anonymous(self._pad + region.offset, region.size)
                del self._file_backed[region.gpa]
        try:
            self._mmap.madvise(mmap.MADV_REMOVE if self.fd >= 0 else mmap.MADV_DONTNEED, self._pad,
                               self.total_size)
        except OSError:  # not a shmem mapping after all: write the zeros
            ctypes.memset(self._base_ptr, 0, self.total_size)

    def _advise_anonymous(self, start: int, length: int) -> None:
        """Ask for transparent huge pages (where the host allows them) and keep the pages out of forked
        children (a fork would otherwise make every guest page copy-on-write while vCPUs run)."""
        for advice in (mmap.MADV_HUGEPAGE, mmap.MADV_DONTFORK):
            try:
                self._mmap.madvise(advice, start, length)
            except OSError:  # a kernel without THP: plain pages
                pass

    def close(self) -> None:
        """Release the mapping. Views handed out earlier must have been released by then."""
        self._buffer.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # an accelerator still holds a pointer export; the mapping goes with the process
        if self.fd >= 0:
            os.close(self.fd)
