"""Mapped RAM: a ``file:`` save with every RAM page at a fixed, page-aligned offset, restored by mapping
the file copy-on-write instead of reading it (QEMU 9.0's ``mapped-ram`` capability; Firecracker's memory
file).

Why: an ordinary restore reads all of RAM through the stream before the guest runs one instruction, so
its time grows with the RAM size. With mapped RAM, the restore reads only the small stream of CPU and
device state; each RAM region is then ``mmap``-ed ``MAP_PRIVATE`` from the file at the host address the
accelerators already use (:meth:`~pyemu.system.memory.GuestMemory.map_file_private`), and the kernel
faults a page in from the file the first time the guest (or a device) touches it. Writes stay private:
the file is never changed, and the same file can be restored again.

File layout::

    the usual VM-state stream (pyemu.migration.stream): header, clock, vCPUs, devices,
        one MAPPED_RAM section per RAM region (u64 gpa, u64 size, u64 file offset, u64 file size),
        the end marker
    padding up to a 1 MiB boundary
    region 0's bytes (size bytes; all-zero pages are holes, so the file is sparse), padding, region 1 ...

The stream part is checked exactly as an ordinary stream (framing, checksums, identity, states); the
MAPPED_RAM sections must describe this VM's RAM regions exactly, at aligned offsets after the stream,
and the file must be exactly as long as they say (a truncated or extended file is refused before
anything is mapped). What cannot be checked without reading it is RAM's content: as in QEMU, the RAM
bytes carry no checksum (reading them to check would undo the point).

Saving is stop-and-copy (the VM is paused for the whole save), not pre-copy: the file is written to a
temporary name beside the target and renamed over it when complete, so a VM running from the previous
file at that path keeps its mapping (truncating a mapped file would make its next page fault SIGBUS),
and a failed save leaves the old file in place. ``max-bandwidth`` does not apply to it.

QEMU 7.2 has no ``mapped-ram`` capability (9.0 added it); pyemu accepts QEMU 9's name, and a stream that
uses it is recognised by its MAPPED_RAM sections, so ``-incoming file:PATH`` needs no capability set.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import threading
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from pyemu.migration.errors import MigrationError, StreamCorrupt, StreamTruncated, TransportError
from pyemu.migration.params import MigrationCancelled
from pyemu.migration.ram_scan import changed_runs, populated_chunks
from pyemu.migration.stream import END_SECTION_SIZE, Kind, Section, StreamWriter, section_size
from pyemu.migration.transport import OutgoingStream

if TYPE_CHECKING:
    from pyemu.machines.base import Machine
    from pyemu.migration.vmstate import LoadStats

PAGE = 4096
ALIGN = 1 << 20
"""Where each region starts in the file (QEMU's mapped-ram aligns to 1 MiB as well)."""
_ENTRY = struct.Struct("<QQQQ")
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)
SEEKABLE_ONLY = "Migration requires seekable transport (e.g. file)"
"""QEMU 9's refusal of mapped-ram on a transport other than ``file:``."""


def _align(value: int, to: int = ALIGN) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class MappedRegion:
    """One MAPPED_RAM section: ``size`` bytes of RAM at ``gpa`` are at ``offset`` of a ``file_size``-byte file."""

    gpa: int
    size: int
    offset: int
    file_size: int


# -- saving -----------------------------------------------------------------------------------------------
class MappedRamFile:
    """The target of a mapped-ram save: a temporary file beside ``path``, renamed over it by :meth:`close`.
    :meth:`write` appends the stream part; :meth:`pwrite` puts RAM at its offset."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TransportError(f"'file:{path}': {exc.strerror or exc}") from None
        else:
            if not stat.S_ISREG(st.st_mode):
                raise MigrationError(SEEKABLE_ONLY)
        directory, name = os.path.split(os.path.abspath(path))
        self._tmp = os.path.join(directory, f".{name}.pyemu-{os.getpid()}-{threading.get_ident()}")
        try:
            self.fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TransportError(f"'file:{path}': {exc.strerror or exc}") from None
        self._out = io.BufferedWriter(io.FileIO(self.fd, "w", closefd=False), 1 << 16)
        self._closed = False

    def write(self, data: bytes, /) -> int:
        try:
            return self._out.write(data)
        except OSError as exc:
            raise TransportError(f"'file:{self.path}': write failed: {exc.strerror or exc}") from exc

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                done = os.pwrite(self.fd, view, offset)
                view = view[done:]
                offset += done
        except OSError as exc:
            raise TransportError(f"'file:{self.path}': write failed: {exc.strerror or exc}") from exc

    def finish_stream(self, file_size: int) -> None:
        """The stream part is written: flush it and give the file its final (sparse) length."""
        try:
            self._out.flush()
            os.ftruncate(self.fd, file_size)
        except OSError as exc:
            raise TransportError(f"'file:{self.path}': {exc.strerror or exc}") from exc

    def shutdown(self) -> None:
        """migrate_cancel: nothing blocks on a local file; the save checks the cancel flag between chunks."""

    def close(self) -> None:
        """Complete: the temporary file replaces ``path``."""
        if self._closed:
            return
        self._closed = True
        try:
            self._out.flush()
            os.close(self.fd)
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self._unlink()
            raise TransportError(f"'file:{self.path}': {exc.strerror or exc}") from exc

    def abort(self) -> None:
        """Failed or cancelled: drop the temporary file (``path`` keeps what it had)."""
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass
        self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(self._tmp)
        except OSError:
            pass


def open_outgoing(uri: str, machine: Machine, *, mapped: bool) -> OutgoingStream | MappedRamFile:
    """Where a ``migrate`` writes. With ``mapped-ram`` a :class:`MappedRamFile` (``file:`` only). Without
    it, a ``file:`` target that this VM's RAM is mapped from is unlinked first: the new stream goes to a
    new file and the mapping keeps the old one (writing it in place would truncate what RAM is made of)."""
    if mapped:
        if not uri.startswith("file:"):
            raise MigrationError(SEEKABLE_ONLY)
        return MappedRamFile(uri[5:])
    if uri.startswith("file:"):
        try:
            st = os.stat(uri[5:])
        except OSError:
            pass
        else:
            if stat.S_ISREG(st.st_mode) and machine.memory.file_backed(st.st_dev, st.st_ino):
                os.unlink(uri[5:])
    return OutgoingStream(uri)


def save_mapped(machine: Machine, target: MappedRamFile, run_state: str, stats: LoadStats,
                cancel: threading.Event | None = None) -> LoadStats:
    """Write ``machine`` (stopped, I/O drained) to ``target`` in the mapped-ram layout."""
    from pyemu.migration.vmstate import begin_stream, write_cpu_and_devices

    writer: StreamWriter = begin_stream(machine, target, run_state)
    with machine.lock:
        write_cpu_and_devices(machine, writer)
        regions = machine.memory.regions
        idents = [f"ram{index}" for index in range(len(regions))]
        stream_end = writer.bytes_written + sum(section_size(i, _ENTRY.size) for i in idents) + END_SECTION_SIZE
        offsets: list[int] = []
        cursor = stream_end
        for region in regions:
            cursor = _align(cursor)
            offsets.append(cursor)
            cursor += region.size
        file_size = cursor
        for ident, region, offset in zip(idents, regions, offsets):
            writer.section(Kind.MAPPED_RAM, ident, _ENTRY.pack(region.gpa, region.size, offset, file_size))
        writer.finish()
        assert writer.bytes_written == stream_end, (writer.bytes_written, stream_end)
        target.finish_stream(file_size)
        for region, offset in zip(regions, offsets):
            stats.ram_total += region.size
            _write_region(machine, target, region.gpa, region.size, offset, stats, cancel)
    stats.stream_bytes = stream_end + stats.ram_bytes
    stats.downtime_bytes = stats.stream_bytes
    stats.dirty_sync_count = 1
    return stats


def _write_region(machine: Machine, target: MappedRamFile, gpa: int, size: int, offset: int,
                  stats: LoadStats, cancel: threading.Event | None) -> None:
    """The non-zero pages of one region, each run of them with one pwrite (zero pages stay holes)."""
    memory = machine.memory
    for piece_gpa, length in populated_chunks(memory, memory.region_of(gpa, size), stats, _CHUNK):
        if cancel is not None and cancel.is_set():
            raise MigrationCancelled()
        start = piece_gpa - gpa
        chunk = memory.read(piece_gpa, length)  # bytes: compares at memcmp speed
        if chunk == (_ZERO_CHUNK if length == _CHUNK else bytes(length)):
            stats.zero_pages += length // PAGE
            continue
        written = 0
        for run_start, run_end in changed_runs(chunk):
            target.pwrite(memoryview(chunk)[run_start:run_end], offset + start + run_start)
            written += run_end - run_start
        stats.normal_pages += written // PAGE
        stats.ram_bytes += written
        stats.zero_pages += (length - written) // PAGE


# -- loading ----------------------------------------------------------------------------------------------
def parse_section(section: Section, machine: Machine, seen: list[MappedRegion]) -> MappedRegion:
    """A MAPPED_RAM section, checked against this VM's RAM and the sections before it."""
    if len(section.payload) != _ENTRY.size:
        raise StreamCorrupt(f"{len(section.payload)} bytes, expected {_ENTRY.size}", section.where)
    entry = MappedRegion(*_ENTRY.unpack(section.payload))
    own = {(r.gpa, r.size) for r in machine.memory.regions}
    if (entry.gpa, entry.size) not in own:
        raise StreamCorrupt(f"RAM at {entry.gpa:#x}+{entry.size:#x} is not a RAM region of this VM", section.where)
    if entry.offset % PAGE or entry.offset + entry.size > entry.file_size:
        raise StreamCorrupt(f"region at file offset {entry.offset:#x}+{entry.size:#x} does not fit a "
                            f"{entry.file_size}-byte file page-aligned", section.where)
    for other in seen:
        if other.gpa == entry.gpa:
            raise StreamCorrupt("this RAM region appears twice", section.where)
        if other.file_size != entry.file_size:
            raise StreamCorrupt("the sections disagree on the file size", section.where)
        if entry.offset < other.offset + other.size and other.offset < entry.offset + entry.size:
            raise StreamCorrupt("regions overlap in the file", section.where)
    return entry


def map_regions(machine: Machine, source: IO[bytes], regions: list[MappedRegion], stream_end: int,
                stats: LoadStats) -> None:
    """Map every region from ``source``'s file (all checked first: nothing is mapped when one is bad)."""
    missing = {(r.gpa, r.size) for r in machine.memory.regions} - {(r.gpa, r.size) for r in regions}
    if missing:
        gpa, size = min(missing)
        raise StreamCorrupt(f"the mapped-ram stream lacks RAM at {gpa:#x}+{size:#x}")
    try:
        fd = source.fileno()
        st = os.fstat(fd)
    except (OSError, ValueError, io.UnsupportedOperation):
        raise MigrationError("a mapped-ram stream can only be loaded from a file: URI") from None
    if not stat.S_ISREG(st.st_mode):
        raise MigrationError("a mapped-ram stream can only be loaded from a file: URI")
    file_size = regions[0].file_size
    for entry in regions:
        if entry.offset < stream_end:
            raise StreamCorrupt(f"RAM at {entry.gpa:#x} is at file offset {entry.offset:#x}, inside the "
                                f"stream ({stream_end} bytes)")
    if st.st_size < file_size:
        raise StreamTruncated(f"the mapped-ram file is {st.st_size} bytes, its RAM needs {file_size}")
    if st.st_size > file_size:
        raise StreamCorrupt(f"the mapped-ram file is {st.st_size} bytes, its sections describe {file_size}")
    by_gpa = {r.gpa: r for r in machine.memory.regions}
    for entry in regions:
        machine.memory.map_file_private(by_gpa[entry.gpa], fd, entry.offset)
        stats.ram_total += entry.size
    stats.stream_bytes = stream_end


__all__ = ["ALIGN", "MappedRamFile", "MappedRegion", "SEEKABLE_ONLY", "map_regions", "open_outgoing",
           "parse_section", "save_mapped"]
