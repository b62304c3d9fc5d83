"""The bzImage loader: setup-header validation, the zero page, placement, page tables and the entry state.

Synthetic images (pyemu.target.x86.boot.synthetic) cover every error without assets; the real Debian
vmlinuz is checked too when ``pyemu-guest fetch`` has run. One test runs the entry state on Unicorn to
prove the page tables, GDT and RSI work on a real CPU model.
"""

import struct

import pytest

from pyemu.guest.assets import find_assets
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.boot import bzimage
from pyemu.target.x86.boot.bzimage import (
    CAN_USE_HEAP,
    LOADED_HIGH,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    load_bzimage,
    parse_setup_header,
)
from pyemu.target.x86.boot.errors import (
    CmdlineError,
    CmdlineTooLongError,
    ImageReadError,
    ImageTooLargeError,
    MemoryMapError,
    NotAKernelError,
    TruncatedImageError,
    UnsupportedProtocolError,
)
from pyemu.target.x86.boot.gdt import encode_descriptor
from pyemu.target.x86.boot.layout import CMDLINE_ADDR, GDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR
from pyemu.target.x86.boot.paging import translate
from pyemu.target.x86.boot.synthetic import BzImageSpec, make_bzimage
from pyemu.target.x86.cpu_state import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_IF

MiB = 1 << 20
GiB = 1 << 30
RAM = 64 * MiB


def e820_for(ram_end: int, high: tuple[int, int] | None = None) -> list[tuple[int, int, int]]:
    entries = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, ram_end - 0x100000, 1)]
    if high:
        entries.append((high[0], high[1], 1))
    return entries


@pytest.fixture
def memory():
    mem = GuestMemory([(0, RAM)])
    yield mem
    mem.close()


def write_image(tmp_path, spec=None, name="bzImage"):
    path = tmp_path / name
    path.write_bytes(make_bzimage(spec))
    return path


def test_header_fields_parsed(tmp_path):
    data = make_bzimage(BzImageSpec(payload=b"\xfd7zXZ\0" + b"x" * 100, init_size=0x800000))
    header = parse_setup_header(data[:0x400], file_size=len(data))
    assert header.version == 0x020F and header.version_text == "2.15"
    assert header.has_64bit_entry and header.initrd_above_4g
    assert header.setup_sects == 4 and header.setup_size == 5 * 512
    assert header.kernel_alignment == 0x200000 and header.relocatable
    assert header.pref_address == 0x1000000 and header.init_size == 0x800000
    assert header.cmdline_size == 2047 and header.initrd_addr_max == 0x7FFFFFFF
    offset, length = header.payload_range()
    assert data[offset : offset + 6] == b"\xfd7zXZ\0" and length == 106
    assert header.header_end == 0x26C and len(header.raw) == 0x26C - 0x1F1


def test_setup_sects_zero_means_four(tmp_path):
    data = make_bzimage(BzImageSpec(setup_sects=0))
    assert parse_setup_header(data[:0x400], file_size=len(data)).setup_sects == 4


@pytest.mark.parametrize(
    "spec, error, message",
    [
        (BzImageSpec(boot_flag=0x1234), NotAKernelError, "boot flag 0x1234"),
        (BzImageSpec(magic=b"XXXX"), NotAKernelError, "HdrS"),
        (BzImageSpec(version=0x020A), UnsupportedProtocolError, "2.10"),
        (BzImageSpec(xloadflags=0), UnsupportedProtocolError, "XLF_KERNEL_64"),
        (BzImageSpec(loadflags=0), UnsupportedProtocolError, "LOADED_HIGH"),
        (BzImageSpec(kernel_alignment=0x300000), UnsupportedProtocolError, "power of two"),
    ],
)
def test_invalid_headers_give_typed_errors(tmp_path, memory, spec, error, message):
    path = write_image(tmp_path, spec)
    with pytest.raises(error, match=message) as info:
        load_bzimage(memory, path, None, "", e820_for(RAM))
    assert info.value.path == str(path)


def test_truncated_kernel_body(tmp_path, memory):
    data = make_bzimage(BzImageSpec(entry64_code=b"\x90" * 4096))
    path = tmp_path / "cut"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(TruncatedImageError, match="truncated"):
        load_bzimage(memory, path, None, "", e820_for(RAM))


def test_truncated_inside_header(tmp_path, memory):
    path = tmp_path / "tiny"
    path.write_bytes(make_bzimage()[:0x220])
    with pytest.raises(TruncatedImageError):
        load_bzimage(memory, path, None, "", e820_for(RAM))


def test_missing_file_is_a_read_error(tmp_path, memory):
    with pytest.raises(ImageReadError, match="cannot open kernel"):
        load_bzimage(memory, tmp_path / "nope", None, "", e820_for(RAM))


def test_cmdline_longer_than_cmdline_size(tmp_path, memory):
    path = write_image(tmp_path, BzImageSpec(cmdline_size=16))
    load_bzimage(memory, path, None, "x" * 16, e820_for(RAM))  # exactly the limit is fine
    with pytest.raises(CmdlineTooLongError, match="17 bytes .* at most 16") as info:
        load_bzimage(memory, path, None, "x" * 17, e820_for(RAM))
    assert (info.value.length, info.value.limit) == (17, 16)
    with pytest.raises(CmdlineError, match="NUL"):
        load_bzimage(memory, path, None, "a\0b", e820_for(RAM))


def test_kernel_too_large_for_ram(tmp_path, memory):
    path = write_image(tmp_path, BzImageSpec(init_size=128 * MiB))
    with pytest.raises(ImageTooLargeError, match="init_size"):
        load_bzimage(memory, path, None, "", e820_for(RAM))


def test_initrd_too_large_for_ram(tmp_path, memory):
    path = write_image(tmp_path)
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as handle:
        handle.truncate(60 * MiB)
    with pytest.raises(ImageTooLargeError, match="initrd .* does not fit"):
        load_bzimage(memory, path, initrd, "", e820_for(RAM))


def test_zero_page_fields(tmp_path, memory):
    path = write_image(tmp_path)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INITRD" * 1000)
    e820 = e820_for(RAM)
    result = load_bzimage(memory, path, initrd, "console=ttyS0 quiet", e820, rsdp_addr=0xF5A40)
    zp = memory.read(ZERO_PAGE_ADDR, 4096)
    image = path.read_bytes()

    def u32(offset):
        return struct.unpack_from("<I", zp, offset)[0]

    # Setup header copied verbatim except the loader-owned fields.
    for offset in (0x1F1, 0x1F4, 0x202, 0x206, 0x230, 0x236, 0x238, 0x258, 0x260):
        assert zp[offset : offset + 4] == image[offset : offset + 4], hex(offset)
    assert zp[0x210] == 0xFF  # type_of_loader
    assert zp[0x211] & (CAN_USE_HEAP | LOADED_HIGH) == CAN_USE_HEAP | LOADED_HIGH
    assert u32(0x228) == CMDLINE_ADDR == result.cmdline_addr and u32(0x0C8) == 0
    assert memory.read(CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert u32(0x218) == result.initrd.addr and u32(0x21C) == 6000
    assert u32(0x0C0) == 0 and u32(0x0C4) == 0
    assert memory.read(result.initrd.addr, 6) == b"INITRD"
    assert result.initrd.addr % 4096 == 0 and result.initrd.end <= RAM
    assert zp[0x1E8] == 3  # e820_entries
    assert [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(3)] == sorted(e820)
    assert struct.unpack_from("<Q", zp, 0x070)[0] == 0xF5A40  # acpi_rsdp_addr
    assert zp[0x1EF] == 0  # sentinel untouched


def test_kernel_loaded_at_pref_address_with_64bit_entry(tmp_path, memory):
    path = write_image(tmp_path, BzImageSpec(entry64_code=b"\x90\x90\xf4"))
    result = load_bzimage(memory, path, None, "", e820_for(RAM))
    assert result.kernel.addr == 0x1000000
    assert result.entry == 0x1000200 == result.cpu.rip
    assert memory.read(0x1000200, 3) == b"\x90\x90\xf4"
    image = path.read_bytes()
    assert memory.read(0x1000000, 0x200) == image[5 * 512 : 5 * 512 + 0x200]


def test_relocatable_kernel_moves_when_pref_address_is_not_ram(tmp_path, memory):
    path = write_image(tmp_path, BzImageSpec(init_size=2 * MiB))
    e820 = [(0, 0x9FC00, 1), (0x100000, 15 * MiB, 1), (16 * MiB, 8 * MiB, 2), (24 * MiB, RAM - 24 * MiB, 1)]
    result = load_bzimage(memory, path, None, "", e820)
    assert result.kernel.addr == 24 * MiB  # first 2 MiB-aligned free RAM above pref_address
    fixed = write_image(tmp_path, BzImageSpec(init_size=2 * MiB, relocatable=False), name="fixed")
    with pytest.raises(ImageTooLargeError, match="not relocatable"):
        load_bzimage(memory, fixed, None, "", e820)


def test_cpu_entry_state(tmp_path, memory):
    result = load_bzimage(memory, write_image(tmp_path), None, "", e820_for(RAM))
    cpu = result.cpu
    assert cpu.long_mode and cpu.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert cpu.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG and cpu.cr4 & CR4_PAE
    assert cpu.cr3 == PML4_ADDR
    assert cpu.cs.selector == 0x10 and cpu.cs.l and not cpu.cs.db
    assert all(getattr(cpu, s).selector == 0x18 for s in ("ds", "es", "ss"))
    assert cpu.regs["rsi"] == ZERO_PAGE_ADDR
    assert not cpu.rflags & RFLAGS_IF
    # The GDT in RAM holds the very descriptors the segment caches were loaded from.
    assert cpu.gdt.base == GDT_ADDR and cpu.gdt.limit == 31
    gdt = memory.read(GDT_ADDR, 32)
    assert struct.unpack_from("<Q", gdt, 0x10)[0] == encode_descriptor(cpu.cs) | 1 << 40
    assert struct.unpack_from("<Q", gdt, 0x18)[0] == encode_descriptor(cpu.ds) | 1 << 40
    assert struct.unpack_from("<Q", gdt, 0x10)[0] == 0x00AF9B000000FFFF  # flat 64-bit code
    assert struct.unpack_from("<Q", gdt, 0x18)[0] == 0x00CF93000000FFFF  # flat data


def test_page_tables_identity_map_first_4_gib(tmp_path, memory):
    result = load_bzimage(memory, write_image(tmp_path), None, "", e820_for(RAM))
    for address in (0, 0x7000, 0x1000200, 0xFEE00000, 4 * GiB - 1, 0x12345678):
        assert translate(memory, result.cpu.cr3, address) == address
    assert translate(memory, result.cpu.cr3, 4 * GiB) is None


def test_initrd_above_4g_when_allowed_and_ram_is_there(tmp_path):
    memory = GuestMemory([(0, RAM), (4 * GiB, 64 * MiB)])
    try:
        initrd = tmp_path / "initrd"
        initrd.write_bytes(b"I" * 10000)
        e820 = e820_for(RAM, high=(4 * GiB, 64 * MiB))
        result = load_bzimage(memory, write_image(tmp_path), initrd, "", e820)
        assert result.initrd.addr >= 4 * GiB and result.initrd.end <= 4 * GiB + 64 * MiB
        zp = memory.read(ZERO_PAGE_ADDR, 4096)
        assert struct.unpack_from("<I", zp, 0x0C0)[0] == result.initrd.addr >> 32 == 1
        assert struct.unpack_from("<I", zp, 0x218)[0] == result.initrd.addr & 0xFFFFFFFF
        # RAM above 4 GiB is identity-mapped too (5 GiB mapped).
        assert translate(memory, result.cpu.cr3, result.initrd.addr) == result.initrd.addr
        # Without XLF_CAN_BE_LOADED_ABOVE_4G the initrd stays below initrd_addr_max.
        low_only = write_image(tmp_path, BzImageSpec(xloadflags=XLF_KERNEL_64, initrd_addr_max=0x2FFFFFF), "low")
        memory.clear()
        result = load_bzimage(memory, low_only, initrd, "", e820)
        assert result.initrd.end <= 0x3000000
    finally:
        memory.close()


def test_placements_never_overlap_and_respect_rsdp(tmp_path, memory):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"I" * 5000)
    result = load_bzimage(memory, write_image(tmp_path), initrd, "x", e820_for(RAM), rsdp_addr=0xF0000)
    spans = sorted((p.addr, p.end) for p in result.placements)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    with pytest.raises(MemoryMapError, match="RSDP"):
        load_bzimage(memory, write_image(tmp_path), None, "x", e820_for(RAM), rsdp_addr=CMDLINE_ADDR)


def test_kernel_over_board_acpi_tables_is_refused(tmp_path, memory):
    e820 = [(0, 0x9FC00, 1), (0x100000, RAM - 0x100000 - 2 * MiB, 1), (RAM - 2 * MiB, 2 * MiB, 3)]
    path = write_image(tmp_path, BzImageSpec(pref_address=RAM - 2 * MiB, relocatable=False, init_size=0x1000))
    with pytest.raises(ImageTooLargeError):
        load_bzimage(memory, path, None, "", e820)


def test_entry_state_runs_on_unicorn(tmp_path, memory):
    """The entry code reads the command line through RSI and memory at 3 GiB through the page tables."""
    keystone = pytest.importorskip("keystone")
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as x86

    code, _ = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64).asm(
        "mov eax, dword ptr [rsi + 0x228];"  # cmd_line_ptr
        "mov rbx, qword ptr [rax];"
        "mov qword ptr [rsi + 0x800], rbx;"
        "mov rdx, 0xC0000000;"
        "mov rcx, qword ptr [rdx];"
        "mov qword ptr [rsi + 0x808], rcx;"
        "hlt"
    )
    high = GuestMemory([(0, RAM), (3 * GiB, 2 * MiB)])
    try:
        high.write(3 * GiB, b"HIGHMEM!")
        e820 = e820_for(RAM, high=(3 * GiB, 2 * MiB))
        kernel = write_image(tmp_path, BzImageSpec(entry64_code=bytes(code)))
        result = load_bzimage(high, kernel, None, "pyemu-ok", e820)
        cpu = result.cpu
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        for region in high.regions:
            uc.mem_map_ptr(region.gpa, region.size, unicorn.UC_PROT_ALL, high.host_address(region))
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, cpu.gdt.base, cpu.gdt.limit, 0))
        uc.reg_write(x86.UC_X86_REG_CR3, cpu.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, cpu.cr4)
        uc.reg_write(x86.UC_X86_REG_MSR, (0xC0000080, cpu.efer))
        uc.reg_write(x86.UC_X86_REG_CR0, cpu.cr0)
        uc.reg_write(x86.UC_X86_REG_RSI, cpu.regs["rsi"])
        uc.reg_write(x86.UC_X86_REG_RSP, cpu.regs["rsp"])
        uc.emu_start(cpu.rip, 0, count=20)
        assert high.read(ZERO_PAGE_ADDR + 0x800, 16) == b"pyemu-ok" + b"HIGHMEM!"
        assert uc.reg_read(x86.UC_X86_REG_RIP) == cpu.rip + len(code)
    finally:
        high.close()


def test_real_debian_vmlinuz_header():
    assets = find_assets()
    if assets is None:
        pytest.skip("Debian guest assets not fetched (run 'pyemu-guest fetch')")
    data = assets.kernel.read_bytes()
    header = parse_setup_header(data[: bzimage.HEAD_BYTES], file_size=len(data), path=str(assets.kernel))
    assert header.version >= 0x020F
    wanted = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    assert header.xloadflags & wanted == wanted
    assert header.relocatable and header.kernel_alignment == 0x200000
    assert header.pref_address == 0x1000000
    assert header.cmdline_size == 2047
    assert header.init_size > header.protected_mode_size
    offset, length = header.payload_range()
    assert data[offset : offset + 6] == b"\xfd7zXZ\0"


def test_real_debian_vmlinuz_loads(tmp_path, monkeypatch):
    assets = find_assets()
    if assets is None:
        pytest.skip("Debian guest assets not fetched (run 'pyemu-guest fetch')")
    # The in-guest decompressor's path (the host-side one: tests/unit/test_boot_bzimage_host.py).
    monkeypatch.setenv("PYEMU_BZIMAGE_GUEST_DECOMPRESS", "1")
    memory = GuestMemory([(0, 256 * MiB)])
    try:
        result = load_bzimage(memory, assets.kernel, assets.initrd, "console=ttyS0", e820_for(256 * MiB))
        assert result.kernel.addr == 0x1000000 and result.entry == 0x1000200
        assert result.initrd.size == assets.initrd.stat().st_size
        assert memory.read(result.initrd.addr, 2) == b"\x1f\x8b"
    finally:
        memory.close()
