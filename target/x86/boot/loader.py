"""``-kernel`` for x86: recognise the image and hand it to the matching boot protocol.

Order of the probe, most specific first:

1. bzImage (boot flag 0xAA55 at 0x1fe and "HdrS" at 0x202) -> the 64-bit Linux boot protocol;
2. ELF with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note -> PVH (an uncompressed ``vmlinux``);
3. ELF or flat binary with a multiboot v1 header in its first 8 KiB -> multiboot (test kernels);
4. anything else -> :class:`NotAKernelError` saying what the file looks like instead (a 64-bit ELF without
   a PVH note, a compressed file, ...).

The low-memory layout all three use is documented in :mod:`pyemu.target.x86.boot.layout`.
"""

from __future__ import annotations

import os
import time
from enum import Enum
from typing import Iterable

from pyemu.system import log
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.bzimage import BOOT_FLAG, is_bzimage, load_bzimage
from pyemu.target.x86.boot.e820 import E820Map, EntryLike
from pyemu.target.x86.boot.elfimage import is_elf, read_elf
from pyemu.target.x86.boot.errors import NotAKernelError
from pyemu.target.x86.boot.image import ImageFile
from pyemu.target.x86.boot.multiboot import MULTIBOOT_SEARCH, find_multiboot_header, load_multiboot
from pyemu.target.x86.boot.pvh import load_pvh, pvh_entry_point
from pyemu.target.x86.boot.result import BootResult


class KernelFormat(Enum):
    BZIMAGE = "bzimage"
    PVH = "pvh"
    MULTIBOOT = "multiboot"


_COMPRESSED_MAGICS = {
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"070701": "cpio (an initramfs?)",
}


def probe_kernel(kernel_path: str | os.PathLike[str]) -> KernelFormat:
    """Which protocol boots this file; NotAKernelError (naming what it is instead) when none does."""
    with ImageFile(kernel_path, "kernel") as image:
        head = image.head(MULTIBOOT_SEARCH)
        path = image.path
        if is_bzimage(head):
            return KernelFormat.BZIMAGE
        if is_elf(head):
            elf = read_elf(image.stream, path=path, file_size=image.size)
            if pvh_entry_point(elf) is not None:
                return KernelFormat.PVH
            if find_multiboot_header(head) is not None:
                return KernelFormat.MULTIBOOT
            if elf.elf_class == 64:
                raise NotAKernelError(
                    f"kernel '{path}' is a 64-bit ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) "
                    "and without a multiboot header: boot the bzImage instead, or build with CONFIG_PVH=y",
                    path=path,
                )
            raise NotAKernelError(f"kernel '{path}' is a 32-bit ELF without a multiboot header", path=path)
        if find_multiboot_header(head) is not None:
            return KernelFormat.MULTIBOOT
        raise NotAKernelError(f"kernel '{path}' {_describe_unknown(head)}", path=path)


def _describe_unknown(head: bytes) -> str:
    if not head:
        return "is empty"
    for magic, kind in _COMPRESSED_MAGICS.items():
        if head.startswith(magic):
            return f"is {kind} data, not a kernel image: pass an uncompressed bzImage, vmlinux or multiboot image"
    if len(head) >= 0x200 and int.from_bytes(head[0x1FE:0x200], "little") == BOOT_FLAG:
        return "is a boot sector or pre-2.00 zImage without a 'HdrS' setup header: it cannot be booted directly"
    return "is not a bzImage, an ELF kernel with a PVH note, or a multiboot image"


_LOADERS = {
    KernelFormat.BZIMAGE: load_bzimage,
    KernelFormat.PVH: load_pvh,
    KernelFormat.MULTIBOOT: load_multiboot,
}


def load_kernel(
    memory: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str,
    e820: E820Map | Iterable[EntryLike],
    rsdp_addr: int | None = None,
) -> BootResult:
    """Load ``kernel_path`` (and the initrd, command line) into ``memory``; vCPU 0's entry state.

    ``e820`` is the board's memory map (an :class:`E820Map` or a list of ``(addr, size, type)``);
    ``rsdp_addr`` the board's ACPI RSDP, passed on to protocols that carry it and kept clear of every
    placement. Raises only :class:`~pyemu.target.x86.boot.errors.BootError` subclasses for bad input.
    """
    started = time.monotonic()
    memory_map = E820Map.coerce(e820)
    kind = probe_kernel(kernel_path)
    result = _LOADERS[kind](memory, kernel_path, initrd_path, cmdline, memory_map, rsdp_addr)
    if log.enabled("boot"):
        log.log("boot", f"loaded in {(time.monotonic() - started) * 1000:.1f} ms: {result.describe()}")
    return result
