"""Multiboot v1: header search, a.out-kludge and ELF loading, the info structure, and the entry state."""

import struct

import pytest

from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot.errors import (
    ImageTooLargeError,
    NotAKernelError,
    TruncatedImageError,
    UnsupportedProtocolError,
)
from pyemu.target.x86.boot.layout import BOOT_INFO_ADDR, MEMMAP_ADDR
from pyemu.target.x86.boot.loader import KernelFormat, load_kernel, probe_kernel
from pyemu.target.x86.boot.multiboot import (
    MB_AOUT_KLUDGE,
    MB_VIDEO_MODE,
    MULTIBOOT_BOOTLOADER_MAGIC,
    find_multiboot_header,
    load_multiboot,
)
from pyemu.target.x86.boot.synthetic import make_multiboot_binary, make_multiboot_elf, multiboot_header
from pyemu.target.x86.cpu_state import CR0_PE, CR0_PG

MiB = 1 << 20
RAM = 32 * MiB
E820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, RAM - 0x100000, 1)]


@pytest.fixture
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


def info_fields(memory):
    raw = memory.read(BOOT_INFO_ADDR, 72)
    names = {"flags": 0, "mem_lower": 4, "mem_upper": 8, "cmdline": 16, "mods_count": 20, "mods_addr": 24,
             "mmap_length": 44, "mmap_addr": 48, "boot_loader_name": 64}
    return {name: struct.unpack_from("<I", raw, offset)[0] for name, offset in names.items()}


def c_string(memory, address):
    data = memory.read(address, 256)
    return data[: data.index(b"\0")].decode()


def test_header_search_within_8k_and_checksum():
    image = make_multiboot_binary(padding=4096)
    header = find_multiboot_header(image)
    assert header is not None and header.offset == 4096 and header.has_addresses
    assert header.load_addr == 0x100000 and header.entry_addr == 0x100000 + 4096 + 32
    broken = bytearray(image)
    broken[4096 + 8] ^= 1  # checksum
    assert find_multiboot_header(bytes(broken)) is None
    assert find_multiboot_header(b"\0" * 8192 + multiboot_header(0)) is None  # beyond 8 KiB
    assert find_multiboot_header(b"\0\0" + multiboot_header(0)) is None  # not 4-byte aligned


def test_aout_kludge_load_bss_and_entry(tmp_path, memory):
    memory.fill(0x200000, 0x1000, 0xEE)
    path = tmp_path / "kernel.bin"
    path.write_bytes(make_multiboot_binary(b"\x90\xf4", load_addr=0x200000, bss=0x100))
    result = load_multiboot(memory, path, None, "", E820)
    assert result.entry == 0x200020 and memory.read(0x200020, 2) == b"\x90\xf4"
    assert memory.read(0x200000, 4) == struct.pack("<I", 0x1BADB002)
    assert memory.read(0x200022, 0x100) == bytes(0x100)  # bss zeroed
    assert (result.kernel.addr, result.kernel.size) == (0x200000, 0x22 + 0x100)


def test_elf32_load_and_entry(tmp_path, memory):
    path = tmp_path / "kernel.elf"
    path.write_bytes(make_multiboot_elf(b"\xf4", load_addr=0x300000, bss=64))
    assert probe_kernel(path) == KernelFormat.MULTIBOOT
    result = load_kernel(memory, path, None, "", E820)
    assert result.protocol == "multiboot" and result.entry == 0x30000C
    assert memory.read_u8(0x30000C) == 0xF4


def test_info_structure(tmp_path, memory):
    path = tmp_path / "kernel.bin"
    path.write_bytes(make_multiboot_binary())
    initrd = tmp_path / "module.img"
    initrd.write_bytes(b"MOD!" * 100)
    result = load_kernel(memory, path, initrd, "test arg=1", E820)
    info = info_fields(memory)
    assert info["flags"] == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert info["mem_lower"] == 639 and info["mem_upper"] == (RAM - MiB) // 1024
    assert c_string(memory, info["cmdline"]) == "test arg=1"
    assert c_string(memory, info["boot_loader_name"]) == "pyemu"
    assert info["mods_count"] == 1
    start, end, string, _ = struct.unpack("<IIII", memory.read(info["mods_addr"], 16))
    assert (start, end) == (result.initrd.addr, result.initrd.end) and end - start == 400
    assert start % 4096 == 0 and memory.read(start, 4) == b"MOD!"
    assert c_string(memory, string) == "module.img"
    assert info["mmap_addr"] == MEMMAP_ADDR and info["mmap_length"] == 3 * 24
    mmap = memory.read(MEMMAP_ADDR, 72)
    assert [struct.unpack_from("<IQQI", mmap, 24 * i) for i in range(3)] == [(20, a, s, t) for a, s, t in E820]


def test_entry_registers(tmp_path, memory):
    path = tmp_path / "kernel.bin"
    path.write_bytes(make_multiboot_binary())
    cpu = load_multiboot(memory, path, None, "", E820).cpu
    assert cpu.regs["rax"] == MULTIBOOT_BOOTLOADER_MAGIC == 0x2BADB002
    assert cpu.regs["rbx"] == BOOT_INFO_ADDR
    assert cpu.cr0 & CR0_PE and not cpu.cr0 & CR0_PG
    assert cpu.cs.db and cpu.cs.selector == 0x10 and cpu.ss.selector == 0x18


def test_unknown_required_flag_and_video_request(tmp_path, memory):
    path = tmp_path / "k"
    path.write_bytes(make_multiboot_binary(flags=MB_AOUT_KLUDGE | (1 << 5)))
    with pytest.raises(UnsupportedProtocolError, match="0x20"):
        load_multiboot(memory, path, None, "", E820)
    path.write_bytes(make_multiboot_binary(flags=MB_AOUT_KLUDGE | MB_VIDEO_MODE) + bytes(16))
    load_multiboot(memory, path, None, "", E820)  # accepted; no video info is passed
    assert not info_fields(memory)["flags"] & ((1 << 11) | (1 << 12))


def test_flat_binary_without_addresses_is_refused(tmp_path, memory):
    path = tmp_path / "k"
    path.write_bytes(multiboot_header(0) + b"\xf4")
    with pytest.raises(NotAKernelError, match="flag 16"):
        load_kernel(memory, path, None, "", E820)


def test_truncated_load_range(tmp_path, memory):
    image = bytearray(make_multiboot_binary(b"\x90" * 64))
    struct.pack_into("<I", image, 20, 0x100000 + 4096)  # load_end_addr beyond the file
    path = tmp_path / "k"
    path.write_bytes(bytes(image))
    with pytest.raises(TruncatedImageError):
        load_multiboot(memory, path, None, "", E820)


def test_load_address_over_boot_structures_or_outside_ram(tmp_path, memory):
    path = tmp_path / "k"
    path.write_bytes(make_multiboot_binary(load_addr=0x20000))  # our command-line area
    with pytest.raises(ImageTooLargeError, match="overlaps command line"):
        load_multiboot(memory, path, None, "x", E820)
    path.write_bytes(make_multiboot_binary(load_addr=RAM + 0x1000))
    with pytest.raises(ImageTooLargeError, match="outside guest RAM"):
        load_multiboot(memory, path, None, "x", E820)


def test_entry_state_runs_on_unicorn(tmp_path, memory):
    """A tiny kernel checks EAX, reads mem_upper, the command line and the module through EBX."""
    keystone = pytest.importorskip("keystone")
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as x86

    code, _ = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32).asm(
        "mov edx, 0x8000;"
        "mov dword ptr [edx + 12], eax;"
        "mov ecx, dword ptr [ebx + 8];"
        "mov dword ptr [edx], ecx;"
        "mov esi, dword ptr [ebx + 16];"
        "mov esi, dword ptr [esi];"
        "mov dword ptr [edx + 4], esi;"
        "mov esi, dword ptr [ebx + 24];"
        "mov esi, dword ptr [esi];"
        "mov esi, dword ptr [esi];"
        "mov dword ptr [edx + 8], esi;"
        "hlt"
    )
    path = tmp_path / "kernel.bin"
    path.write_bytes(make_multiboot_binary(bytes(code)))
    initrd = tmp_path / "mod"
    initrd.write_bytes(b"MODX")
    cpu = load_multiboot(memory, path, initrd, "ARGS", E820).cpu
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    uc.mem_map_ptr(0, RAM, unicorn.UC_PROT_ALL, memory.host_address(memory.regions[0]))
    uc.reg_write(x86.UC_X86_REG_EAX, cpu.regs["rax"])
    uc.reg_write(x86.UC_X86_REG_EBX, cpu.regs["rbx"])
    uc.reg_write(x86.UC_X86_REG_ESP, cpu.regs["rsp"])
    uc.emu_start(cpu.rip, 0, count=20)
    mem_upper, cmdline, module, magic = struct.unpack("<I4s4sI", memory.read(0x8000, 16))
    assert (mem_upper, cmdline, module, magic) == ((RAM - MiB) // 1024, b"ARGS", b"MODX", 0x2BADB002)
