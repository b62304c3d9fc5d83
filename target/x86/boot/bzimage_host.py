"""Host-side decompression of a bzImage's kernel: skip the guest's own decompressor, enter the kernel proper.

Why: under the software CPU the bzImage's decompressor (xz for Debian's 6.1 kernel, ~8 MB in, ~60 MB out)
runs for seconds of emulated code before Linux proper starts; the host decodes the same payload in about
a second with Python's ``lzma``, once per kernel (the result is cached under pyemu's cache directory, keyed
by the bzImage's SHA-256). Firecracker boots an uncompressed ``vmlinux`` for the same reason.

What the decompressor does, and what this path does instead (facts from ``arch/x86/boot/compressed`` and
``Documentation/arch/x86/boot.rst``, read for facts only):

* the payload (setup header ``payload_offset``/``payload_length``) decompresses to the ELF ``vmlinux``
  (symbols stripped), followed for ``CONFIG_X86_NEED_RELOCS`` kernels by the relocation table;
* ``parse_elf`` copies every PT_LOAD segment to ``output + (p_paddr - LOAD_PHYSICAL_ADDR)``, where
  ``LOAD_PHYSICAL_ADDR`` is the header's ``pref_address`` and ``output`` the load address rounded up to
  ``kernel_alignment`` (at least ``LOAD_PHYSICAL_ADDR``) when KASLR does not move it;
* relocations are applied only when the *virtual* address changes (KASLR); physical displacement is
  handled by the kernel itself (``phys_base``). This path keeps the link-time virtual address, so no
  relocation is needed -- the outcome the decompressor reaches when KASLR draws the first slot;
* unless the command line says ``nokaslr``, a ``CONFIG_RANDOMIZE_BASE`` kernel's decompressor sets
  ``KASLR_FLAG`` in ``boot_params.hdr.loadflags`` (the kernel proper then randomises its memory regions);
  this path sets it under the same condition (a relocation table after the ELF is how the payload says
  ``CONFIG_RANDOMIZE_BASE``/``X86_NEED_RELOCS`` on x86-64);
* it then jumps to ``output`` (``startup_64`` of the kernel proper, the ELF entry) in long mode with RSI =
  the same ``boot_params``; this path enters there directly, with the same zero page, command line,
  initrd and e820 map the bzImage path builds, so the kernel sees what it would see after its decompressor.

Anything this path cannot reproduce exactly falls back to the in-guest decompressor, with a ``-d boot``
line saying why. ``PYEMU_BZIMAGE_GUEST_DECOMPRESS=1`` forces the in-guest decompressor (QEMU has no such
switch; it always runs the guest's decompressor).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pyemu.system import log
from pyemu.system.cache import cache_root
from pyemu.target.x86.boot.elfimage import EM_X86_64, ElfImage, read_elf
from pyemu.target.x86.boot.errors import BootError
from pyemu.target.x86.boot.image import ImageFile

FORCE_GUEST_ENV = "PYEMU_BZIMAGE_GUEST_DECOMPRESS"
CACHE_SUBDIR = "kernels"


@dataclass(frozen=True)
class HostKernel:
    """The decompressed kernel proper of a bzImage: its cached ELF file and what loading it needs."""

    path: Path
    elf: ElfImage
    has_relocs: bool  # a relocation table follows the ELF: CONFIG_RANDOMIZE_BASE (x86-64)


class HostDecompressUnavailable(BootError):
    """The bzImage's payload cannot be decompressed on the host (the caller falls back to the guest)."""


def forced_guest_decompression(environ: dict[str, str] | None = None) -> bool:
    """True when the user asked for the kernel's own decompressor (``PYEMU_BZIMAGE_GUEST_DECOMPRESS=1``)."""
    env = os.environ if environ is None else environ
    return env.get(FORCE_GUEST_ENV, "").strip().lower() not in ("", "0", "no", "off", "false")


def _cache_path(digest: str) -> Path:
    return cache_root() / CACHE_SUBDIR / f"{digest}.vmlinux"


def _decompress(bzimage: bytes, name: str) -> bytes:
    """The ELF and relocation table inside ``bzimage``; HostDecompressUnavailable when it cannot say."""
    from pyemu.guest.errors import GuestAssetError  # the guest package owns the payload decoders
    from pyemu.guest.vmlinux import extract_vmlinux

    try:
        return extract_vmlinux(bzimage, name=name)
    except GuestAssetError as exc:
        raise HostDecompressUnavailable(str(exc)) from exc


def _store(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (rename); HostDecompressUnavailable when the cache is not
    writable (the entry path reads the kernel from that file, and a scratch copy elsewhere would leak)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(prefix=".partial-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(scratch, 0o644)  # mkstemp's 0600 would hide the cache from other users of it
            os.replace(scratch, path)
        except BaseException:
            os.unlink(scratch)
            raise
    except OSError as exc:
        raise HostDecompressUnavailable(f"cannot cache the decompressed kernel at {path}: {exc}") from exc


def host_kernel(kernel_path: str | os.PathLike[str]) -> HostKernel:
    """The decompressed kernel proper of the bzImage at ``kernel_path``, from the cache or decoded now.

    Raises HostDecompressUnavailable (a BootError) with the reason when the payload is not a 64-bit
    x86 ELF this path can enter exactly."""
    try:
        data = Path(kernel_path).read_bytes()
    except OSError as exc:
        raise HostDecompressUnavailable(f"cannot read '{kernel_path}': {exc.strerror}") from exc
    digest = hashlib.sha256(data).hexdigest()
    cached = _cache_path(digest)
    if not cached.is_file():
        elf_bytes = _decompress(data, str(kernel_path))
        _store(cached, elf_bytes)
        log.log("boot", f"decompressed the bzImage payload on the host into {cached} ({len(elf_bytes)} bytes)")
    with ImageFile(cached, "kernel") as image:
        elf = read_elf(image.stream, path=str(cached), file_size=image.size)
        size = image.size
    if elf.elf_class != 64 or elf.machine != EM_X86_64:
        raise HostDecompressUnavailable(f"the payload is a {elf.elf_class}-bit {elf.machine} ELF, not x86-64")
    if not elf.segments:
        raise HostDecompressUnavailable("the payload ELF has no PT_LOAD segment")
    return HostKernel(cached, elf, has_relocs=size > elf.extent)
