"""PVH boot: the Xen PHYS32_ENTRY note, segment loading at p_paddr, and the hvm_start_info layout."""

import struct

import pytest

from pyemu.guest.assets import find_assets
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.elfimage import parse_notes, read_elf
from pyemu.target.x86.boot.errors import (
    CmdlineTooLongError,
    ImageTooLargeError,
    NotAKernelError,
    TruncatedImageError,
    UnsupportedProtocolError,
)
from pyemu.target.x86.boot.layout import BOOT_INFO_ADDR, GDT_ADDR, MEMMAP_ADDR
from pyemu.target.x86.boot.loader import KernelFormat, load_kernel, probe_kernel
from pyemu.target.x86.boot.pvh import HVM_START_MAGIC, START_INFO_SIZE, load_pvh, pvh_entry_point
from pyemu.target.x86.boot.synthetic import ElfSegment, elf_note, make_elf, make_pvh_elf
from pyemu.target.x86.cpu_state import CR0_PE, CR0_PG, RFLAGS_IF

MiB = 1 << 20
RAM = 64 * MiB
E820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, RAM - 0x100000, 1)]


@pytest.fixture
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


def start_info(memory):
    names = ("magic", "version", "flags", "nr_modules", "modlist_paddr", "cmdline_paddr", "rsdp_paddr",
             "memmap_paddr", "memmap_entries", "reserved")
    return dict(zip(names, struct.unpack("<IIIIQQQQII", memory.read(BOOT_INFO_ADDR, START_INFO_SIZE))))


def test_note_parsing_reads_numeric_xen_types():
    area = elf_note("Xen", 3, b"abc") + elf_note("Xen", 18, struct.pack("<Q", 0x1000850)) + elf_note("GNU", 3, b"id")
    notes = list(parse_notes(area))
    assert [(n.name, n.type) for n in notes] == [("Xen", 3), ("Xen", 18), ("GNU", 3)]
    assert notes[0].desc == b"abc"
    assert struct.unpack("<Q", notes[1].desc)[0] == 0x1000850


@pytest.mark.parametrize("desc_size, elf_class", [(8, 64), (4, 64), (4, 32)])
def test_entry_note_found(tmp_path, desc_size, elf_class):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf(load_addr=0x1000000, entry_offset=0x40, desc_size=desc_size, elf_class=elf_class))
    with open(path, "rb") as handle:
        image = read_elf(handle, path=str(path), file_size=path.stat().st_size)
    assert pvh_entry_point(image) == 0x1000040
    assert probe_kernel(path) == KernelFormat.PVH


def test_segments_loaded_at_paddr_with_bss_zeroed(tmp_path, memory):
    memory.fill(0x1000000, 0x3000, 0xAA)  # stale contents where the bss goes
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf(b"\xf4CODE", load_addr=0x1000000, bss=0x2000))
    result = load_pvh(memory, path, None, "", E820)
    assert memory.read(0x1000000, 5) == b"\xf4CODE"
    assert memory.read(0x1000005, 0x2000) == bytes(0x2000)
    assert (result.kernel.addr, result.kernel.size) == (0x1000000, 5 + 0x2000)


def test_start_info_layout(tmp_path, memory):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf(load_addr=0x1000000))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"RD" * 3000)
    result = load_kernel(memory, path, initrd, "console=hvc0", E820, rsdp_addr=0xF5A40)
    assert result.protocol == "pvh" and result.boot_info_addr == BOOT_INFO_ADDR
    info = start_info(memory)
    assert info["magic"] == HVM_START_MAGIC == 0x336EC578 and info["version"] == 1
    assert info["flags"] == 0 and info["reserved"] == 0
    assert memory.read(info["cmdline_paddr"], 13) == b"console=hvc0\0"
    assert info["rsdp_paddr"] == 0xF5A40
    assert info["nr_modules"] == 1
    paddr, size, cmdline, reserved = struct.unpack("<QQQQ", memory.read(info["modlist_paddr"], 32))
    assert (paddr, size, cmdline, reserved) == (result.initrd.addr, 6000, 0, 0)
    assert memory.read(paddr, 2) == b"RD" and paddr + size <= 1 << 32
    assert info["memmap_paddr"] == MEMMAP_ADDR and info["memmap_entries"] == 3
    entries = [struct.unpack_from("<QQII", memory.read(MEMMAP_ADDR, 72), 24 * i) for i in range(3)]
    assert entries == [(a, s, t, 0) for a, s, t in E820]


def test_no_initrd_means_no_modules(tmp_path, memory):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf())
    load_pvh(memory, path, None, "", E820)
    info = start_info(memory)
    assert info["nr_modules"] == 0 and info["modlist_paddr"] == 0 and info["rsdp_paddr"] == 0


def test_entry_state_is_flat_protected_mode(tmp_path, memory):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf(load_addr=0x1000000, entry_offset=0x10, bss=0x20))
    cpu = load_pvh(memory, path, None, "", E820).cpu
    assert cpu.rip == 0x1000010
    assert cpu.cr0 & CR0_PE and not cpu.cr0 & CR0_PG and not cpu.long_mode
    assert cpu.cs.selector == 0x10 and cpu.cs.db and not cpu.cs.l and cpu.cs.limit == 0xFFFFFFFF
    assert all(getattr(cpu, s).selector == 0x18 for s in ("ds", "es", "ss"))
    assert cpu.regs["rbx"] == BOOT_INFO_ADDR
    assert not cpu.rflags & RFLAGS_IF
    assert cpu.gdt.base == GDT_ADDR
    assert struct.unpack_from("<Q", memory.read(GDT_ADDR, 32), 0x10)[0] == 0x00CF9B000000FFFF


def test_elf64_without_pvh_note_is_a_clear_error(tmp_path, memory):
    path = tmp_path / "plain"
    path.write_bytes(make_elf(entry=0x1000000, segments=[ElfSegment(0x1000000, b"\xf4")]))
    with pytest.raises(NotAKernelError, match="PVH entry note"):
        load_kernel(memory, path, None, "", E820)
    with pytest.raises(UnsupportedProtocolError, match="PVH entry note"):
        load_pvh(memory, path, None, "", E820)


def test_truncated_segment(tmp_path, memory):
    data = make_pvh_elf(b"\x90" * 4096)
    path = tmp_path / "cut"
    path.write_bytes(data[:-1000])
    with pytest.raises(TruncatedImageError):
        load_kernel(memory, path, None, "", E820)


def test_corrupt_elf_header(tmp_path, memory):
    path = tmp_path / "bad"
    path.write_bytes(b"\x7fELF" + b"\x09" * 60)
    with pytest.raises(NotAKernelError, match="ELF"):
        load_kernel(memory, path, None, "", E820)


@pytest.mark.parametrize("phoff", [0x10000, 1 << 63, (1 << 64) - 8])
def test_wild_program_header_offset(tmp_path, memory, phoff):
    data = bytearray(make_pvh_elf())
    struct.pack_into("<Q", data, 32, phoff)  # e_phoff
    path = tmp_path / "wild"
    path.write_bytes(bytes(data))
    with pytest.raises((TruncatedImageError, NotAKernelError)):
        load_kernel(memory, path, None, "", E820)


def test_kernel_beyond_ram(tmp_path, memory):
    path = tmp_path / "big"
    path.write_bytes(make_pvh_elf(load_addr=0x1000000, bss=RAM))
    with pytest.raises(ImageTooLargeError, match="not all RAM"):
        load_pvh(memory, path, None, "", E820)


def test_cmdline_limit(tmp_path, memory):
    path = tmp_path / "vmlinux"
    path.write_bytes(make_pvh_elf())
    with pytest.raises(CmdlineTooLongError):
        load_pvh(memory, path, None, "x" * 2048, E820)


def test_real_vmlinux():
    assets = find_assets()
    if assets is None:
        pytest.skip("Debian guest assets not fetched (run 'pyemu-guest fetch')")
    memory = GuestMemory([(0, 256 * MiB)])
    try:
        e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 255 * MiB, 1)]
        result = load_kernel(memory, assets.vmlinux, assets.initrd, "console=ttyS0", e820, rsdp_addr=0xF0000)
        assert result.protocol == "pvh"
        assert result.kernel.addr == 0x1000000
        assert result.kernel.addr <= result.entry < result.kernel.end
        assert start_info(memory)["magic"] == HVM_START_MAGIC
        # pvh_start_xen begins with 'cld' (0xfc) in Linux 6.1.
        assert memory.read_u8(result.entry) == 0xFC
    finally:
        memory.close()
