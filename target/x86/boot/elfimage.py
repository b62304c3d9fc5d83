"""ELF kernels: the loadable segments and the ELF notes, as PVH and multiboot need them.

Only the ELF header and the program headers are read, by the few lines of ``struct`` below (the layout is
the System V ABI's). Why not pyelftools: the boot needs none of its section, symbol or DWARF machinery,
and importing it cost ~20 ms of every VM's start-up. Notes are decoded from the raw PT_NOTE bytes with
their plain numeric type within the "Xen" namespace, as PVH needs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from pyemu.target.x86.boot.errors import ImageTooLargeError, NotAKernelError, TruncatedImageError
from pyemu.target.x86.boot.image import ImageFile
from pyemu.target.x86.boot.layout import BootPlan, Placement

ELF_MAGIC = b"\x7fELF"
EM_386 = "EM_386"
EM_X86_64 = "EM_X86_64"
_MACHINES = {3: EM_386, 62: EM_X86_64}
_CLASSES = {1: 32, 2: 64}
ELFDATA2LSB = 1
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
# e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize, e_phentsize, e_phnum, e_shentsize,
# e_shnum: the ELF header after e_ident and e_type.
_HEADER = {32: struct.Struct("<HIIIIIHHHHH"), 64: struct.Struct("<HIQQQIHHHHH")}
# As (type, offset, vaddr, paddr, filesz, memsz, align) once reordered; ELF64 moves p_flags up front.
_PHDR = {32: struct.Struct("<IIIIIIII"), 64: struct.Struct("<IIQQQQQQ")}


class _ElfFormatError(ValueError):
    """The file is not an ELF file this loader reads; the message says what is wrong."""


@dataclass(frozen=True)
class _ProgramHeader:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


def _read_exactly(stream: BinaryIO, offset: int, size: int, what: str) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise _ElfFormatError(f"the file ends inside its {what}")
    return data


@dataclass(frozen=True)
class _ElfHeader:
    elf_class: int
    machine: int
    entry: int
    phoff: int
    phentsize: int
    phnum: int
    section_table_end: int  # e_shoff + e_shentsize * e_shnum


def _elf_header(stream: BinaryIO) -> _ElfHeader:
    """The fields of a little-endian ELF file's header that loading it needs."""
    ident = _read_exactly(stream, 0, 16, "ELF identification")
    if ident[:4] != ELF_MAGIC:
        raise _ElfFormatError("no ELF magic")
    elf_class = _CLASSES.get(ident[4])
    if elf_class is None:
        raise _ElfFormatError(f"unknown ELF class {ident[4]}")
    if ident[5] != ELFDATA2LSB:
        raise _ElfFormatError("not a little-endian ELF file")
    layout = _HEADER[elf_class]
    fields = layout.unpack(_read_exactly(stream, 18, layout.size, "ELF header"))
    machine, entry, phoff, shoff, phentsize, phnum, shentsize, shnum = (fields[i] for i in (0, 2, 3, 4, 7, 8, 9, 10))
    if phnum == PN_XNUM:
        raise _ElfFormatError("extended program header numbering (e_phnum = PN_XNUM) is not supported")
    if phnum and phentsize < _PHDR[elf_class].size:
        raise _ElfFormatError(f"program header entries of {phentsize} bytes are too small")
    return _ElfHeader(elf_class, machine, entry, phoff, phentsize, phnum, shoff + shentsize * shnum)


def _program_headers(stream: BinaryIO, elf_class: int, phoff: int, phentsize: int,
                     phnum: int) -> Iterator[_ProgramHeader]:
    layout = _PHDR[elf_class]
    table = _read_exactly(stream, phoff, phentsize * phnum, "program headers")
    for index in range(phnum):
        raw = layout.unpack_from(table, index * phentsize)
        if elf_class == 64:
            kind, _flags, offset, vaddr, paddr, filesz, memsz, align = raw
        else:
            kind, offset, vaddr, paddr, filesz, memsz, _flags, align = raw
        yield _ProgramHeader(kind, offset, vaddr, paddr, filesz, memsz, align)


@dataclass(frozen=True)
class ElfNote:
    name: str
    type: int
    desc: bytes


@dataclass(frozen=True)
class LoadSegment:
    """A PT_LOAD segment: ``filesz`` bytes from ``offset`` go to ``paddr``; the rest up to ``memsz`` is zero."""

    offset: int
    paddr: int
    vaddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    elf_class: int  # 32 or 64
    machine: str
    entry: int
    segments: tuple[LoadSegment, ...]
    notes: tuple[ElfNote, ...]
    extent: int
    """Bytes of the file the ELF itself spans (headers, every segment's file bytes, the section table): a
    bzImage's payload appends its relocation table after them."""

    def find_note(self, name: str, note_type: int) -> ElfNote | None:
        for note in self.notes:
            if note.name == name and note.type == note_type:
                return note
        return None

    @property
    def phys_start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def phys_end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def parse_notes(data: bytes, alignment: int = 4) -> Iterator[ElfNote]:
    """Decode an ELF note area (namesz, descsz, type, name, desc; name and desc padded to 4 bytes)."""
    align = 8 if alignment == 8 else 4
    offset = 0
    while offset + 12 <= len(data):
        namesz, descsz, note_type = struct.unpack_from("<III", data, offset)
        offset += 12
        name_end = offset + namesz
        desc_start = offset + (-(-namesz // align) * align)
        desc_end = desc_start + descsz
        if desc_end > len(data):
            return  # a damaged note ends the area; the loader reports what it could not find
        name = data[offset:name_end].rstrip(b"\0").decode("ascii", "replace")
        yield ElfNote(name, note_type, bytes(data[desc_start:desc_end]))
        offset = desc_start + (-(-descsz // align) * align)


def read_elf(stream: BinaryIO, *, path: str, file_size: int) -> ElfImage:
    """Program headers and notes of the ELF file open as ``stream``; typed errors for bad files."""
    try:
        header = _elf_header(stream)
        table_end = header.phoff + header.phnum * header.phentsize
        if header.phnum and table_end > file_size:
            raise TruncatedImageError(
                f"kernel '{path}' is truncated: its program headers end at {table_end} but the file has {file_size}",
                path=path,
            )
        segments: list[LoadSegment] = []
        notes: list[ElfNote] = []
        extent = max(table_end, header.section_table_end)
        for program in _program_headers(stream, header.elf_class, header.phoff, header.phentsize, header.phnum):
            if program.type:
                extent = max(extent, program.offset + program.filesz)
            if program.type == PT_LOAD and program.memsz > 0:
                if program.offset + program.filesz > file_size:
                    raise TruncatedImageError(
                        f"kernel '{path}' is truncated: a PT_LOAD segment needs bytes up to "
                        f"{program.offset + program.filesz} but the file has {file_size}",
                        path=path,
                    )
                if program.filesz > program.memsz:
                    raise NotAKernelError(f"kernel '{path}': a PT_LOAD segment has filesz > memsz", path=path)
                segments.append(LoadSegment(program.offset, program.paddr, program.vaddr, program.filesz,
                                            program.memsz))
            elif program.type == PT_NOTE:
                if program.offset + program.filesz > file_size:
                    raise TruncatedImageError(f"kernel '{path}' is truncated inside a PT_NOTE segment", path=path)
                stream.seek(program.offset)
                notes.extend(parse_notes(stream.read(program.filesz), program.align))
        return ElfImage(header.elf_class, _MACHINES.get(header.machine, f"EM_{header.machine}"), header.entry,
                        tuple(segments), tuple(notes), extent)
    except (_ElfFormatError, struct.error) as exc:
        raise NotAKernelError(f"kernel '{path}' is not a valid ELF file: {exc}", path=path) from exc


def place_segments(plan: BootPlan, image: ImageFile, elf: ElfImage) -> Placement:
    """Copy every PT_LOAD segment to its physical address and zero its tail; returns the kernel's span,
    reserved in ``plan``. The span must be RAM in the board's memory map (PVH and multiboot share this)."""
    start, end = elf.phys_start, elf.phys_end
    if not plan.memory.contains(start, end - start) or not plan.e820.is_ram(start, end - start):
        raise ImageTooLargeError(
            f"kernel '{image.path}' occupies {start:#x}-{end - 1:#x} ({(end - start) / 2**20:.1f} MiB), "
            "which is not all RAM in this machine (give it more memory with -m)",
            path=image.path,
        )
    kernel = plan.reserve("kernel", start, end - start, error=ImageTooLargeError)
    for segment in elf.segments:
        image.copy_to_memory(plan.memory, segment.paddr, segment.offset, segment.filesz, what="a PT_LOAD segment")
        if segment.memsz > segment.filesz:
            plan.memory.fill(segment.paddr + segment.filesz, segment.memsz - segment.filesz)
    return kernel
