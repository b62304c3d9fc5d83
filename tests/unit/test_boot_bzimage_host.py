"""Host-side decompression of a bzImage's payload (target/x86/boot/bzimage_host.py).

Synthetic bzImages carry a real xz or gzip stream of a small ELF "kernel proper" (plus, like a
CONFIG_RANDOMIZE_BASE kernel, a relocation table after it); the loader must enter that ELF at the
decompressor's output address with the zero page the bzImage path builds, cache the decoded kernel, and
fall back to the in-guest decompressor (with a ``-d boot`` line) when it cannot reproduce it exactly.
"""

from __future__ import annotations

import gzip
import io
import lzma
import struct

import pytest

from pyemu.guest.assets import find_assets
from pyemu.system import log
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot import bzimage_host
from pyemu.target.x86.boot.bzimage import HDR_LOADFLAGS, KASLR_FLAG, load_bzimage
from pyemu.target.x86.boot.bzimage_host import (
    FORCE_GUEST_ENV,
    forced_guest_decompression,
    host_kernel,
)
from pyemu.target.x86.boot.elfimage import read_elf
from pyemu.target.x86.boot.errors import NotAKernelError
from pyemu.target.x86.boot.layout import ZERO_PAGE_ADDR
from pyemu.target.x86.boot.synthetic import BzImageSpec, ElfSegment, make_bzimage, make_elf

MiB = 1 << 20
RAM = 128 * MiB
LOAD = 0x1000000
TEXT = bytes(range(256)) * 16  # 4 KiB "startup_64"
DATA = b"DATA" * 256
RELOCS = struct.pack("<3I", 0, 0x81000010, 0)  # the shape of vmlinux.relocs; only its presence matters
ASSETS = find_assets()  # looked up before the tests point PYEMU_CACHE at a scratch directory


def e820() -> list[tuple[int, int, int]]:
    return [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, RAM - 0x100000, 1)]


def kernel_elf(*, entry: int = LOAD, relocs: bool = True, machine: int = 62, elf_class: int = 64) -> bytes:
    """A vmlinux-shaped ELF: text at LOAD_PHYSICAL_ADDR (linked high), data with a bss tail after it."""
    high = 0xFFFFFFFF80000000
    segments = [ElfSegment(LOAD, TEXT, vaddr=high + LOAD),
                ElfSegment(LOAD + 0x200000, DATA, memsz=len(DATA) + 0x3000, vaddr=high + LOAD + 0x200000)]
    elf = make_elf(elf_class=elf_class, machine=machine, entry=entry, segments=segments,
                   sections={".text": b"\x90"})
    return elf + (RELOCS if relocs else b"")


def xz(data: bytes) -> bytes:
    """As the kernel build compresses: xz, x86 BCJ + LZMA2, CRC32, then the 4-byte uncompressed size."""
    stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                           filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}])
    return stream + struct.pack("<I", len(data))


def write_bzimage(tmp_path, payload: bytes, name: str = "bzImage"):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_bytes(make_bzimage(BzImageSpec(payload=payload, init_size=0x800000)))
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYEMU_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(FORCE_GUEST_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def boot_log(monkeypatch):  # type: ignore[no-untyped-def]
    """The ``-d boot`` output of the test, as a StringIO."""
    out = io.StringIO()
    monkeypatch.setattr(log._state, "stream", out)
    monkeypatch.setattr(log._state, "enabled", frozenset({"boot"}))
    return out


@pytest.fixture
def memory():  # type: ignore[no-untyped-def]
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


@pytest.mark.parametrize("compress", [xz, gzip.compress], ids=["xz", "gzip"])
def test_host_decompressed_kernel_entered_at_startup_64(tmp_path, memory, compress, boot_log):
    path = write_bzimage(tmp_path, compress(kernel_elf()))
    result = load_bzimage(memory, path, None, "console=ttyS0", e820())
    assert result.protocol == "bzimage (host-decompressed)"
    assert result.entry == LOAD and result.cpu.rip == LOAD
    assert result.cpu.regs["rsi"] == ZERO_PAGE_ADDR
    assert memory.read(LOAD, len(TEXT)) == TEXT
    assert memory.read(LOAD + 0x200000, len(DATA)) == DATA
    assert memory.read(LOAD + 0x200000 + len(DATA), 0x3000) == bytes(0x3000)  # bss tail zeroed
    assert "entering the host-decompressed kernel proper at 0x1000000" in boot_log.getvalue()


def test_same_zero_page_and_placements_as_the_guest_decompressor(tmp_path, memory, monkeypatch):
    """Command line, initrd and e820 land where the in-guest path puts them; only loadflags.KASLR differs
    (the decompressor sets it; the loader before it never does)."""
    path = write_bzimage(tmp_path, xz(kernel_elf()))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x1f\x8b" + bytes(5000))
    direct = load_bzimage(memory, path, initrd, "console=ttyS0 quiet", e820())
    direct_page = bytearray(memory.read(ZERO_PAGE_ADDR, 4096))
    monkeypatch.setenv(FORCE_GUEST_ENV, "1")
    other = GuestMemory([(0, RAM)])
    try:
        guest = load_bzimage(other, path, initrd, "console=ttyS0 quiet", e820())
        guest_page = bytearray(other.read(ZERO_PAGE_ADDR, 4096))
    finally:
        other.close()
    assert guest.protocol == "bzimage" and guest.entry == LOAD + 0x200
    assert direct.placements == guest.placements
    assert direct_page[HDR_LOADFLAGS] == guest_page[HDR_LOADFLAGS] | KASLR_FLAG
    direct_page[HDR_LOADFLAGS] = guest_page[HDR_LOADFLAGS]
    assert direct_page == guest_page


@pytest.mark.parametrize(("cmdline", "relocs", "kaslr"), [
    ("console=ttyS0", True, True),
    ("console=ttyS0 nokaslr", True, False),
    ("console=ttyS0", False, False),  # no relocation table: not a CONFIG_RANDOMIZE_BASE kernel
])
def test_kaslr_flag_as_the_decompressor_leaves_it(tmp_path, memory, cmdline, relocs, kaslr):
    path = write_bzimage(tmp_path, xz(kernel_elf(relocs=relocs)))
    load_bzimage(memory, path, None, cmdline, e820())
    assert bool(memory.read(ZERO_PAGE_ADDR + HDR_LOADFLAGS, 1)[0] & KASLR_FLAG) is kaslr


def test_decoded_kernel_is_cached_by_digest(tmp_path, memory, cache, monkeypatch):
    path = write_bzimage(tmp_path, xz(kernel_elf()))
    first = host_kernel(path)
    assert first.path.parent == cache / "kernels" and first.has_relocs
    assert first.path.read_bytes() == kernel_elf()

    def no_decoding(data: bytes, name: str) -> bytes:
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(bzimage_host, "_decompress", no_decoding)
    assert host_kernel(path).path == first.path
    result = load_bzimage(memory, path, None, "", e820())
    assert result.entry == LOAD


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\x89PNG not a known compression at all", "compression we cannot decode"),
    (xz(b"not an ELF file" * 10), "not an ELF file"),
    (xz(kernel_elf(entry=LOAD + 0x40)), "is not at the header's LOAD_PHYSICAL_ADDR"),
    (xz(kernel_elf(machine=3)), "not x86-64"),
    (b"\xfd7zXZ\x00 truncated xz", "corrupt"),
], ids=["unknown", "not-elf", "entry", "machine", "corrupt"])
def test_falls_back_to_the_guest_decompressor_and_says_why(tmp_path, memory, payload, reason, boot_log):
    path = write_bzimage(tmp_path, payload)
    result = load_bzimage(memory, path, None, "", e820())
    assert result.protocol == "bzimage" and result.entry == LOAD + 0x200
    text = boot_log.getvalue()
    assert "host-side decompression not used, the guest decompresses the kernel" in text
    assert reason in text


def test_unwritable_cache_falls_back(tmp_path, memory, monkeypatch, boot_log):
    path = write_bzimage(tmp_path, xz(kernel_elf()))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("PYEMU_CACHE", str(blocker))  # kernels/ cannot be created under a file
    result = load_bzimage(memory, path, None, "", e820())
    assert result.entry == LOAD + 0x200
    assert "cannot cache the decompressed kernel" in boot_log.getvalue()


def test_no_payload_falls_back(tmp_path, memory, boot_log):
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage())
    assert load_bzimage(memory, path, None, "", e820()).entry == LOAD + 0x200
    assert "does not describe its payload" in boot_log.getvalue() or "payload" in boot_log.getvalue()


def test_environment_forces_the_guest_decompressor(tmp_path, memory, monkeypatch, boot_log, cache):
    path = write_bzimage(tmp_path, xz(kernel_elf()))
    monkeypatch.setenv(FORCE_GUEST_ENV, "1")
    assert forced_guest_decompression()
    result = load_bzimage(memory, path, None, "", e820())
    assert result.entry == LOAD + 0x200
    assert f"{FORCE_GUEST_ENV} is set" in boot_log.getvalue()
    assert not (cache / "kernels").exists()  # nothing decoded
    for off in ("0", "", "off", "no"):
        assert not forced_guest_decompression({FORCE_GUEST_ENV: off})


def test_elf_extent_stops_before_the_relocation_table():
    elf = kernel_elf(relocs=False)
    assert read_elf(io.BytesIO(elf + RELOCS), path="payload", file_size=len(elf + RELOCS)).extent == len(elf)
    with pytest.raises(NotAKernelError):
        read_elf(io.BytesIO(b"\x7fELF"), path="payload", file_size=4)


def test_real_debian_bzimage_host_path():
    assets = ASSETS
    if assets is None:
        pytest.skip("Debian guest assets not fetched (run 'pyemu-guest fetch')")
    big = GuestMemory([(0, 256 * MiB)])
    try:
        result = load_bzimage(big, assets.kernel, assets.initrd, "console=ttyS0",
                              [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 255 * MiB, 1)])
        assert result.protocol == "bzimage (host-decompressed)" and result.entry == 0x1000000
        assert big.read(ZERO_PAGE_ADDR + HDR_LOADFLAGS, 1)[0] & KASLR_FLAG  # Debian: CONFIG_RANDOMIZE_BASE=y
        with open(assets.vmlinux, "rb") as vmlinux:  # the PVH asset is the same decoded payload
            vmlinux.seek(0x200000)
            assert big.read(0x1000000, 4096) == vmlinux.read(4096)
    finally:
        big.close()
