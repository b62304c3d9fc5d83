"""load_kernel: probing the file type, dispatching, and clear errors for files that are not kernels."""

import gzip
import io
import lzma

import pytest

from pyemu.system import log
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot import BootError, E820Map, KernelFormat, load_kernel, probe_kernel
from pyemu.target.x86.boot.errors import ImageReadError, MemoryMapError, NotAKernelError
from pyemu.target.x86.boot.layout import LOW_AREA_LIMIT, PAGE_TABLE_AREA_END
from pyemu.target.x86.boot.synthetic import (
    ElfSegment,
    make_bzimage,
    make_elf,
    make_multiboot_binary,
    make_multiboot_elf,
    make_pvh_elf,
)

MiB = 1 << 20
RAM = 64 * MiB
E820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, RAM - 0x100000, 1)]


@pytest.fixture
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


@pytest.mark.parametrize(
    "data, kind",
    [
        (make_bzimage(), KernelFormat.BZIMAGE),
        (make_pvh_elf(), KernelFormat.PVH),
        (make_multiboot_binary(), KernelFormat.MULTIBOOT),
        (make_multiboot_elf(), KernelFormat.MULTIBOOT),
        (make_multiboot_elf(elf_class=64), KernelFormat.MULTIBOOT),
    ],
)
def test_probe_and_dispatch(tmp_path, memory, data, kind):
    path = tmp_path / "kernel"
    path.write_bytes(data)
    assert probe_kernel(path) == kind
    result = load_kernel(memory, path, None, "hello", E820)
    assert result.protocol == kind.value
    assert memory.read(result.cmdline_addr, 6) == b"hello\0"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "is empty"),
        (gzip.compress(b"x" * 100), "gzip data"),
        (lzma.compress(b"x" * 100), "xz data"),
        (b"070701" + b"0" * 200, "cpio"),
        (b"\0" * 0x1FE + b"\x55\xaa" + b"\0" * 100, "boot sector"),
        (b"just some text\n" * 100, "not a bzImage, an ELF kernel with a PVH note, or a multiboot image"),
        (make_elf(elf_class=32, machine=3, entry=0x100000, segments=[ElfSegment(0x100000, b"\xf4")]),
         "32-bit ELF without a multiboot header"),
        (make_elf(entry=0x100000, segments=[ElfSegment(0x100000, b"\xf4")]), "64-bit ELF without a PVH"),
    ],
)
def test_not_a_kernel(tmp_path, memory, data, message):
    path = tmp_path / "thing"
    path.write_bytes(data)
    with pytest.raises(NotAKernelError, match=message) as info:
        load_kernel(memory, path, None, "", E820)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_missing_kernel_and_initrd(tmp_path, memory):
    with pytest.raises(ImageReadError, match="No such file"):
        load_kernel(memory, tmp_path / "absent", None, "", E820)
    kernel = tmp_path / "k"
    kernel.write_bytes(make_bzimage())
    with pytest.raises(ImageReadError, match="cannot open initrd"):
        load_kernel(memory, kernel, tmp_path / "absent.img", "", E820)


def test_invalid_e820_is_a_boot_error(tmp_path, memory):
    kernel = tmp_path / "k"
    kernel.write_bytes(make_bzimage())
    with pytest.raises(MemoryMapError):
        load_kernel(memory, kernel, None, "", [(0, 0x1000, 1), (0x800, 0x1000, 2)])
    # A directory is not a kernel either, and still a typed error.
    with pytest.raises(BootError):
        load_kernel(memory, tmp_path, None, "", E820)


def test_low_memory_layout_stays_below_the_board_area(tmp_path, memory):
    assert PAGE_TABLE_AREA_END <= LOW_AREA_LIMIT == 0x9FC00
    for data in (make_bzimage(), make_pvh_elf(), make_multiboot_binary()):
        path = tmp_path / "k"
        path.write_bytes(data)
        result = load_kernel(memory, path, None, "x", E820Map(E820), rsdp_addr=0xF0000)
        for placement in result.placements:
            if placement.addr < 0x100000 and placement.name != "ACPI RSDP":
                assert placement.end <= LOW_AREA_LIMIT, placement


def test_boot_log_category(tmp_path, memory, monkeypatch):
    path = tmp_path / "k"
    path.write_bytes(make_bzimage())
    stream = io.StringIO()
    monkeypatch.setattr(log._state, "stream", stream)  # the log keeps the stderr of import time
    log.set_mask({"boot"})
    try:
        load_kernel(memory, path, None, "", E820)
    finally:
        log.set_mask(set())
    err = stream.getvalue()
    assert "boot: loaded in" in err and "kernel 0x1000000" in err
