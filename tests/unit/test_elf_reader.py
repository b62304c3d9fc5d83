"""pyemu's ELF program-header reader (target/x86/boot/elfimage.py) against pyelftools, and its errors.

The reader replaced pyelftools on the boot path; pyelftools stays a dependency (guest module handling), so
it serves here as the independent reference: same class, machine, entry and PT_LOAD segments on 32- and
64-bit images and on the Debian guest's own vmlinux when the asset cache has it.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyemu.target.x86.boot.elfimage import LoadSegment, read_elf
from pyemu.target.x86.boot.errors import NotAKernelError, TruncatedImageError
from pyemu.target.x86.boot.synthetic import ElfSegment, make_elf, make_multiboot_elf, make_pvh_elf

GUEST_VMLINUX = Path.home() / ".cache" / "pyemu" / "guest" / "debian-6.1" / "vmlinux"


def _reference(data: bytes) -> tuple[int, str, int, list[LoadSegment]]:
    elf = ELFFile(io.BytesIO(data))
    loads = [LoadSegment(s["p_offset"], s["p_paddr"], s["p_vaddr"], s["p_filesz"], s["p_memsz"])
             for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"] > 0]
    return elf.elfclass, elf["e_machine"], elf["e_entry"], loads


def _ours(data: bytes) -> tuple[int, str, int, list[LoadSegment]]:
    image = read_elf(io.BytesIO(data), path="test.elf", file_size=len(data))
    return image.elf_class, image.machine, image.entry, list(image.segments)


@pytest.mark.parametrize("data", [
    make_pvh_elf(bss=0x3000),
    make_pvh_elf(elf_class=32, desc_size=4),
    make_multiboot_elf(bss=0x100),
    make_multiboot_elf(elf_class=64),
    make_elf(entry=0x1234, segments=[ElfSegment(0x100000, b"\x90" * 100, 0x2000),
                                     ElfSegment(0x200000, b"\xcc" * 7, None, 0xFFFFFFFF80200000)]),
], ids=["pvh64", "pvh32", "multiboot32", "multiboot64", "two-segments"])
def test_reader_agrees_with_pyelftools(data: bytes) -> None:
    assert _ours(data) == _reference(data)


def test_reader_finds_the_pvh_note() -> None:
    image = read_elf(io.BytesIO(make_pvh_elf(load_addr=0x1000000, entry_offset=0x40)), path="k", file_size=10**6)
    note = image.find_note("Xen", 18)
    assert note is not None and struct.unpack("<Q", note.desc)[0] == 0x1000040


@pytest.mark.skipif(not GUEST_VMLINUX.is_file(), reason="guest assets not fetched (pyemu-guest fetch)")
def test_reader_agrees_with_pyelftools_on_debians_vmlinux() -> None:
    with GUEST_VMLINUX.open("rb") as stream:
        head = stream.read(1 << 20)
        size = GUEST_VMLINUX.stat().st_size
        stream.seek(0)
        ours = read_elf(stream, path=str(GUEST_VMLINUX), file_size=size)
    reference = ELFFile(io.BytesIO(head))
    loads = [LoadSegment(s["p_offset"], s["p_paddr"], s["p_vaddr"], s["p_filesz"], s["p_memsz"])
             for s in reference.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_memsz"] > 0]
    assert (ours.elf_class, ours.machine, ours.entry, list(ours.segments)) == \
        (64, "EM_X86_64", reference["e_entry"], loads)
    assert ours.find_note("Xen", 18) is not None  # XEN_ELFNOTE_PHYS32_ENTRY: what PVH enters through


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


GOOD = make_pvh_elf()


@pytest.mark.parametrize("data,error,text", [
    (b"\x7fELF", NotAKernelError, "ends inside its ELF identification"),
    (b"MZ" + bytes(100), NotAKernelError, "no ELF magic"),
    (_patched(GOOD, 4, b"\x03"), NotAKernelError, "unknown ELF class 3"),
    (_patched(GOOD, 5, b"\x02"), NotAKernelError, "not a little-endian"),
    (GOOD[:40], NotAKernelError, "ends inside its ELF header"),
    (_patched(GOOD, 56, struct.pack("<H", 0xFFFF)), NotAKernelError, "PN_XNUM"),
    (_patched(GOOD, 54, struct.pack("<H", 8)), NotAKernelError, "too small"),
    (_patched(GOOD, 32, struct.pack("<Q", 1 << 40)), TruncatedImageError, "program headers end at"),
], ids=["short", "not-elf", "class", "big-endian", "short-header", "pn-xnum", "small-phentsize", "phoff"])
def test_malformed_headers_are_clear_errors(data: bytes, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        read_elf(io.BytesIO(data), path="bad.elf", file_size=len(data))
