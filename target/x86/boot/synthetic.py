"""Tiny hand-built kernel images: bzImages, ELF files (PVH notes, sections) and multiboot images.

Why these live in the package rather than in tests: the loaders' tests need images with one field
wrong at a time, and accelerator and board tests need small guests that boot through the very same
loaders as Linux does (a few instructions entered as a multiboot or bzImage kernel). Everything here is
built from the format descriptions with ``struct``; pyelftools can read ELF but not write it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyemu.target.x86.boot.bzimage import LOADED_HIGH, XLF_CAN_BE_LOADED_ABOVE_4G, XLF_KERNEL_64
from pyemu.target.x86.boot.multiboot import MB_AOUT_KLUDGE, MULTIBOOT_HEADER_MAGIC

EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
SHT_PROGBITS = 1
SHT_STRTAB = 3
SHT_NOTE = 7
HLT = b"\xf4"


# -- bzImage --------------------------------------------------------------------------------------------
@dataclass
class BzImageSpec:
    """Fields of a synthetic bzImage; defaults describe a valid 64-bit, relocatable, protocol-2.15 kernel."""

    entry64_code: bytes = HLT  # placed at protected-mode offset 0x200 (the 64-bit entry)
    payload: bytes = b""  # the "compressed kernel" (payload_offset/payload_length point at it)
    version: int = 0x020F
    boot_flag: int = 0xAA55
    magic: bytes = b"HdrS"
    setup_sects: int = 4
    loadflags: int = LOADED_HIGH
    xloadflags: int = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    kernel_alignment: int = 0x200000
    relocatable: bool = True
    min_alignment: int = 21
    cmdline_size: int = 2047
    initrd_addr_max: int = 0x7FFFFFFF
    pref_address: int = 0x1000000
    init_size: int = 0x400000
    extra_header_bytes: dict[int, bytes] = field(default_factory=dict)  # file offset -> bytes to poke


def make_bzimage(spec: BzImageSpec | None = None) -> bytes:
    """A bzImage: boot sector + setup sectors (header at 0x1f1) + protected-mode part."""
    spec = spec or BzImageSpec()
    setup_size = (spec.setup_sects or 4) * 512 + 512
    protected = bytearray(HLT * 0x200)  # 32-bit entry at offset 0: just halt
    protected += spec.entry64_code
    payload_offset = 0
    if spec.payload:
        protected += b"\0" * (-len(protected) % 16)
        payload_offset = len(protected)
        protected += spec.payload
    protected += b"\0" * (-len(protected) % 16)

    image = bytearray(setup_size) + protected
    struct.pack_into("<B", image, 0x1F1, spec.setup_sects)
    struct.pack_into("<I", image, 0x1F4, len(protected) // 16)
    struct.pack_into("<H", image, 0x1FA, 0xFFFF)  # vid_mode "normal"
    struct.pack_into("<H", image, 0x1FE, spec.boot_flag)
    image[0x200:0x202] = b"\xeb\x66"  # jmp over the header, as real images have
    struct.pack_into("<B", image, 0x201, 0x6A)  # header ends at 0x202 + 0x6a = 0x26c
    image[0x202:0x206] = spec.magic
    struct.pack_into("<H", image, 0x206, spec.version)
    struct.pack_into("<B", image, 0x211, spec.loadflags)
    struct.pack_into("<I", image, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", image, 0x22C, spec.initrd_addr_max)
    struct.pack_into("<I", image, 0x230, spec.kernel_alignment)
    struct.pack_into("<B", image, 0x234, int(spec.relocatable))
    struct.pack_into("<B", image, 0x235, spec.min_alignment)
    struct.pack_into("<H", image, 0x236, spec.xloadflags)
    struct.pack_into("<I", image, 0x238, spec.cmdline_size)
    struct.pack_into("<I", image, 0x248, payload_offset)
    struct.pack_into("<I", image, 0x24C, len(spec.payload))
    struct.pack_into("<Q", image, 0x258, spec.pref_address)
    struct.pack_into("<I", image, 0x260, max(spec.init_size, len(protected)))
    for offset, data in spec.extra_header_bytes.items():
        image[offset : offset + len(data)] = data
    return bytes(image)


# -- ELF ------------------------------------------------------------------------------------------------
@dataclass
class ElfSegment:
    paddr: int
    data: bytes
    memsz: int | None = None  # default len(data); larger means zero-filled bss
    vaddr: int | None = None  # default paddr


def elf_note(name: str, note_type: int, desc: bytes) -> bytes:
    """One ELF note record (4-byte padding of name and descriptor)."""
    raw_name = name.encode() + b"\0"
    return (
        struct.pack("<III", len(raw_name), len(desc), note_type)
        + raw_name + b"\0" * (-len(raw_name) % 4)
        + desc + b"\0" * (-len(desc) % 4)
    )


def make_elf(
    *,
    elf_class: int = 64,
    machine: int = EM_X86_64,
    entry: int = 0,
    segments: list[ElfSegment] | None = None,
    notes: bytes = b"",
    sections: dict[str, bytes] | None = None,
    elf_type: int = 2,  # ET_EXEC; 1 (ET_REL) for kernel-module-like objects
) -> bytes:
    """An ELF file with PT_LOAD segments, an optional PT_NOTE, and optional named PROGBITS sections."""
    segments = segments or []
    is64 = elf_class == 64
    ehsize, phentsize, shentsize = (64, 56, 64) if is64 else (52, 32, 40)
    phnum = len(segments) + (1 if notes else 0)
    body = bytearray()
    data_start = ehsize + phnum * phentsize

    def place(blob: bytes, align: int = 16) -> int:
        body.extend(b"\0" * (-(data_start + len(body)) % align))
        offset = data_start + len(body)
        body.extend(blob)
        return offset

    program_headers = bytearray()
    for segment in segments:
        offset = place(segment.data, 0x10)
        memsz = segment.memsz if segment.memsz is not None else len(segment.data)
        vaddr = segment.vaddr if segment.vaddr is not None else segment.paddr
        program_headers += _phdr(is64, PT_LOAD, offset, vaddr, segment.paddr, len(segment.data), memsz, 7, 0x10)
    if notes:
        offset = place(notes, 4)
        program_headers += _phdr(is64, PT_NOTE, offset, 0, 0, len(notes), len(notes), 4, 4)

    shoff = shnum = shstrndx = 0
    if sections:
        names = bytearray(b"\0")
        headers = [bytes(shentsize)]
        for name, blob in sections.items():
            name_offset = len(names)
            names += name.encode() + b"\0"
            offset = place(blob, 8)
            kind = SHT_NOTE if name.startswith(".note") else SHT_PROGBITS
            headers.append(_shdr(is64, name_offset, kind, offset, len(blob)))
        shstr_name = len(names)
        names += b".shstrtab\0"
        offset = place(bytes(names), 1)
        headers.append(_shdr(is64, shstr_name, SHT_STRTAB, offset, len(names)))
        shoff = place(b"".join(headers), 8)
        shnum = len(headers)
        shstrndx = shnum - 1

    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1, 0]) + bytes(8)
    if is64:
        header = ident + struct.pack(
            "<HHIQQQIHHHHHH", elf_type, machine, 1, entry, ehsize if phnum else 0, shoff, 0,
            ehsize, phentsize, phnum, shentsize, shnum, shstrndx,
        )
    else:
        header = ident + struct.pack(
            "<HHIIIIIHHHHHH", elf_type, machine, 1, entry, ehsize if phnum else 0, shoff, 0,
            ehsize, phentsize, phnum, shentsize, shnum, shstrndx,
        )
    return header + bytes(program_headers) + bytes(body)


def _phdr(
    is64: bool, kind: int, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int, flags: int, align: int
) -> bytes:
    if is64:
        return struct.pack("<IIQQQQQQ", kind, flags, offset, vaddr, paddr, filesz, memsz, align)
    return struct.pack("<IIIIIIII", kind, offset, vaddr, paddr, filesz, memsz, flags, align)


def _shdr(is64: bool, name: int, kind: int, offset: int, size: int) -> bytes:
    if is64:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, offset, size, 0, 0, 1, 0)
    return struct.pack("<IIIIIIIIII", name, kind, 0, 0, offset, size, 0, 0, 1, 0)


def make_pvh_elf(
    code: bytes = HLT, *, load_addr: int = 0x1000000, entry_offset: int = 0, bss: int = 0,
    desc_size: int = 8, elf_class: int = 64,
) -> bytes:
    """An ELF kernel with one segment at ``load_addr`` and a Xen PHYS32_ENTRY note pointing into it."""
    entry = load_addr + entry_offset
    vaddr = 0xFFFFFFFF80000000 + load_addr if elf_class == 64 else None  # like vmlinux: linked high
    desc = struct.pack("<Q" if desc_size == 8 else "<I", entry)
    notes = elf_note("Xen", 6, b"linux\0") + elf_note("Xen", 18, desc)
    return make_elf(
        elf_class=elf_class,
        machine=EM_X86_64 if elf_class == 64 else EM_386,
        entry=0xFFFFFFFF80000000 + entry if elf_class == 64 else entry,
        segments=[ElfSegment(load_addr, code, len(code) + bss, vaddr)],
        notes=notes,
    )


# -- multiboot ------------------------------------------------------------------------------------------
def multiboot_header(flags: int, fields: tuple[int, ...] = ()) -> bytes:
    checksum = (-(MULTIBOOT_HEADER_MAGIC + flags)) & 0xFFFFFFFF
    return struct.pack("<III", MULTIBOOT_HEADER_MAGIC, flags, checksum) + b"".join(struct.pack("<I", f) for f in fields)


def make_multiboot_binary(
    code: bytes = HLT, *, load_addr: int = 0x100000, bss: int = 0, flags: int = MB_AOUT_KLUDGE, padding: int = 0
) -> bytes:
    """A flat multiboot image using the a.out-kludge addresses: header, then ``code`` (the entry).

    ``padding`` bytes before the header test the header search.
    """
    header_size = 32
    header_addr = load_addr + padding
    entry = header_addr + header_size
    end = entry + len(code)
    fields = (header_addr, load_addr, end, end + bss, entry)
    return b"\0" * padding + multiboot_header(flags, fields) + code


def make_multiboot_elf(code: bytes = HLT, *, load_addr: int = 0x100000, bss: int = 0, elf_class: int = 32) -> bytes:
    """A multiboot ELF: the header at the start of the one loaded segment, the entry right after it."""
    header = multiboot_header(0)
    return make_elf(
        elf_class=elf_class,
        machine=EM_386 if elf_class == 32 else EM_X86_64,
        entry=load_addr + len(header),
        segments=[ElfSegment(load_addr, header + code, len(header) + len(code) + bss)],
    )
