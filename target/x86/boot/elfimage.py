"""ELF kernels: the loadable segments and the ELF notes, as PVH and multiboot need them.

pyelftools reads the program headers; notes are decoded here from the raw PT_NOTE bytes because
pyelftools names note types by the GNU namespace (a Xen note of type 3 comes back as "NT_GNU_BUILD_ID"),
while PVH needs the plain numeric type within the "Xen" namespace.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyemu.target.x86.boot.errors import ImageTooLargeError, NotAKernelError, TruncatedImageError
from pyemu.target.x86.boot.image import ImageFile
from pyemu.target.x86.boot.layout import BootPlan, Placement

ELF_MAGIC = b"\x7fELF"
EM_386 = "EM_386"
EM_X86_64 = "EM_X86_64"


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
        elf = ELFFile(stream)
        table_end = elf["e_phoff"] + elf["e_phnum"] * elf["e_phentsize"]
        if elf["e_phnum"] and table_end > file_size:
            raise TruncatedImageError(
                f"kernel '{path}' is truncated: its program headers end at {table_end} but the file has {file_size}",
                path=path,
            )
        segments: list[LoadSegment] = []
        notes: list[ElfNote] = []
        for segment in elf.iter_segments():
            kind = segment["p_type"]
            if kind == "PT_LOAD" and segment["p_memsz"] > 0:
                if segment["p_offset"] + segment["p_filesz"] > file_size:
                    raise TruncatedImageError(
                        f"kernel '{path}' is truncated: a PT_LOAD segment needs bytes up to "
                        f"{segment['p_offset'] + segment['p_filesz']} but the file has {file_size}",
                        path=path,
                    )
                if segment["p_filesz"] > segment["p_memsz"]:
                    raise NotAKernelError(f"kernel '{path}': a PT_LOAD segment has filesz > memsz", path=path)
                segments.append(
                    LoadSegment(
                        segment["p_offset"], segment["p_paddr"], segment["p_vaddr"],
                        segment["p_filesz"], segment["p_memsz"],
                    )
                )
            elif kind == "PT_NOTE":
                if segment["p_offset"] + segment["p_filesz"] > file_size:
                    raise TruncatedImageError(f"kernel '{path}' is truncated inside a PT_NOTE segment", path=path)
                stream.seek(segment["p_offset"])
                notes.extend(parse_notes(stream.read(segment["p_filesz"]), segment["p_align"]))
        return ElfImage(elf.elfclass, elf["e_machine"], elf["e_entry"], tuple(segments), tuple(notes))
    except (ELFError, struct.error, ValueError) as exc:
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
