"""The Linux x86 boot protocol: a bzImage entered at its 64-bit entry point, without firmware.

Facts from the kernel's ``Documentation/arch/x86/boot.rst`` and ``zero-page.rst``:

* The file starts with the real-mode setup code: ``setup_sects`` 512-byte sectors after the boot sector
  (0 means 4). The setup header sits at 0x1f1; it ends at ``0x202 + byte[0x201]``. The protected-mode
  kernel follows the setup code; ``syssize`` is its length in 16-byte units.
* A loader that skips the real-mode code builds ``struct boot_params`` (the "zero page") itself: zeroed,
  with the setup header copied to the same offset, then its own fields filled in.
* 64-bit entry (protocol 2.12+ with ``XLF_KERNEL_64`` in ``xloadflags``): the protected-mode kernel loaded
  at an address aligned to ``kernel_alignment`` (``pref_address`` when we can), entered at load + 0x200 in
  long mode, with paging identity-mapping the kernel, zero page and command line; a GDT with flat
  ``__BOOT_CS`` (0x10, execute/read) and ``__BOOT_DS`` (0x18, read/write), CS=__BOOT_CS, DS/ES/SS=__BOOT_DS,
  interrupts off and RSI = the zero page's address.
* ``init_size`` is the memory the kernel needs from its load address while it decompresses itself.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from pyemu.system import log
from pyemu.target.x86.boot.cmdline import place_cmdline
from pyemu.target.x86.boot.e820 import E820Map, EntryLike
from pyemu.target.x86.boot.errors import (
    BootError,
    ImageTooLargeError,
    MemoryMapError,
    NotAKernelError,
    TruncatedImageError,
    UnsupportedProtocolError,
)
from pyemu.target.x86.boot.gdt import install_gdt
from pyemu.target.x86.boot.image import ImageFile
from pyemu.target.x86.boot.initrd import place_initrd
from pyemu.target.x86.boot.layout import (
    GDT_ADDR,
    HIGH_MEMORY_START,
    PD_BASE_ADDR,
    PD_MAX_COUNT,
    PDPT_ADDR,
    PML4_ADDR,
    STACK_TOP,
    ZERO_PAGE_ADDR,
    ZERO_PAGE_SIZE,
    BootPlan,
    start_plan,
)
from pyemu.target.x86.boot.paging import build_identity_tables, identity_gib_needed
from pyemu.target.x86.boot.result import BootResult
from pyemu.target.x86.cpu_state import X86CpuState
from pyemu.system.memory import GuestMemory

if TYPE_CHECKING:
    from pyemu.target.x86.boot.bzimage_host import HostKernel

# -- setup header ---------------------------------------------------------------------------------------
SETUP_HEADER_OFFSET = 0x1F1
SETUP_HEADER_LIMIT = 0x290  # boot_params.edd_mbr_sig_buffer follows the header
BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MIN_VERSION_64BIT = 0x020C  # xloadflags (and so XLF_KERNEL_64) exists from 2.12
DEFAULT_SETUP_SECTS = 4
DEFAULT_CMDLINE_SIZE = 255  # before protocol 2.06
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # before protocol 2.03
DEFAULT_LOAD_ADDRESS = 0x100000  # before protocol 2.10 (no pref_address)
ENTRY_64_OFFSET = 0x200
HEAD_BYTES = 0x400  # enough of the file to hold the whole setup header

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4

TYPE_OF_LOADER_UNDEFINED = 0xFF  # "a boot loader without an assigned ID"
HEAP_END_PTR = 0xDE00  # heap end (0xe000) minus 0x200, per boot.rst's example; unused by the 64-bit entry

# -- boot_params (zero page) offsets --------------------------------------------------------------------
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the bzImage setup header a loader acts on (defaults applied for old versions)."""

    setup_sects: int
    syssize: int
    version: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    header_end: int  # file offset after the last header byte (0x202 + byte at 0x201)
    raw: bytes  # the header bytes 0x1f1..header_end, copied verbatim into the zero page

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code (boot sector included) before the protected-mode kernel."""
        return (self.setup_sects + 1) * 512

    @property
    def protected_mode_size(self) -> int:
        return self.syssize * 16

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def has_64bit_entry(self) -> bool:
        return self.version >= MIN_VERSION_64BIT and bool(self.xloadflags & XLF_KERNEL_64)

    @property
    def initrd_above_4g(self) -> bool:
        return self.version >= MIN_VERSION_64BIT and bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    def payload_range(self) -> tuple[int, int]:
        """File offset and length of the compressed kernel payload (protocol 2.08+)."""
        if self.version < 0x0208 or not self.payload_length:
            raise UnsupportedProtocolError(f"boot protocol {self.version_text} does not describe its payload")
        return self.setup_size + self.payload_offset, self.payload_length


def is_bzimage(head: bytes) -> bool:
    """Cheap probe: boot flag and "HdrS" magic present."""
    return (
        len(head) >= 0x206
        and struct.unpack_from("<H", head, 0x1FE)[0] == BOOT_FLAG
        and head[0x202:0x206] == HEADER_MAGIC
    )


def parse_setup_header(head: bytes, *, file_size: int, path: str | None = None) -> SetupHeader:
    """Parse and validate the setup header from the first bytes of a bzImage (``head``, >= 0x26c bytes).

    Raises NotAKernelError (no boot flag or magic), UnsupportedProtocolError (too old, no 64-bit entry,
    not loadable high) or TruncatedImageError (the file is shorter than its header says).
    """
    name = f"'{path}'" if path else "image"
    if len(head) < 0x206:
        if len(head) >= 0x200 and struct.unpack_from("<H", head, 0x1FE)[0] == BOOT_FLAG:
            raise TruncatedImageError(
                f"kernel {name} is truncated: {len(head)} bytes end inside the setup header", path=path
            )
        raise NotAKernelError(f"kernel {name} is not a bzImage: only {len(head)} bytes", path=path)
    boot_flag = struct.unpack_from("<H", head, 0x1FE)[0]
    if boot_flag != BOOT_FLAG:
        raise NotAKernelError(f"kernel {name} is not a bzImage: boot flag {boot_flag:#06x}, expected 0xaa55", path=path)
    if head[0x202:0x206] != HEADER_MAGIC:
        raise NotAKernelError(
            f"kernel {name} is not a bzImage: no 'HdrS' setup-header magic (a pre-2.00 zImage or a boot sector)",
            path=path,
        )
    header_end = min(0x202 + head[0x201], SETUP_HEADER_LIMIT)
    padded = head[:SETUP_HEADER_LIMIT].ljust(SETUP_HEADER_LIMIT, b"\0")
    if len(head) < 0x268:
        raise TruncatedImageError(
            f"kernel {name} is truncated: {len(head)} bytes end inside the setup header", path=path
        )

    def u8(offset: int) -> int:
        return padded[offset]

    def u32(offset: int) -> int:
        return int(struct.unpack_from("<I", padded, offset)[0])

    version = struct.unpack_from("<H", padded, 0x206)[0]
    version_text = f"{version >> 8}.{version & 0xFF:02d}"
    if version < MIN_VERSION_64BIT:
        raise UnsupportedProtocolError(
            f"kernel {name} uses boot protocol {version_text}; the 64-bit entry needs 2.12 or newer "
            "(Linux 3.8+)",
            path=path,
        )
    xloadflags = struct.unpack_from("<H", padded, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise UnsupportedProtocolError(
            f"kernel {name} has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags): "
            "a 32-bit kernel cannot be booted directly",
            path=path,
        )
    loadflags = u8(0x211)
    if not loadflags & LOADED_HIGH:
        raise UnsupportedProtocolError(f"kernel {name} is a zImage loaded low (LOADED_HIGH clear)", path=path)
    setup_sects = u8(0x1F1) or DEFAULT_SETUP_SECTS
    alignment = u32(0x230) or 1
    relocatable = bool(u8(0x234))
    if relocatable and alignment & (alignment - 1):
        raise UnsupportedProtocolError(
            f"kernel {name}: kernel_alignment {alignment:#x} is not a power of two", path=path
        )
    header = SetupHeader(
        setup_sects=setup_sects,
        syssize=u32(0x1F4),
        version=version,
        loadflags=loadflags,
        code32_start=u32(0x214),
        initrd_addr_max=u32(0x22C) or DEFAULT_INITRD_ADDR_MAX,
        kernel_alignment=alignment,
        relocatable=relocatable,
        min_alignment=u8(0x235),
        xloadflags=xloadflags,
        cmdline_size=u32(0x238) or DEFAULT_CMDLINE_SIZE,
        payload_offset=u32(0x248),
        payload_length=u32(0x24C),
        pref_address=int(struct.unpack_from("<Q", padded, 0x258)[0]) or DEFAULT_LOAD_ADDRESS,
        init_size=u32(0x260),
        header_end=header_end,
        raw=bytes(padded[SETUP_HEADER_OFFSET:header_end]),
    )
    needed = header.setup_size + header.protected_mode_size
    if header.syssize == 0:
        raise UnsupportedProtocolError(f"kernel {name}: syssize is 0 (no protected-mode kernel)", path=path)
    if file_size < needed:
        raise TruncatedImageError(
            f"kernel {name} is truncated: its setup header describes {needed} bytes "
            f"({header.setup_sects} setup sectors + {header.protected_mode_size} bytes of kernel) "
            f"but the file has {file_size}",
            path=path,
        )
    if header.payload_length and header.payload_offset + header.payload_length > file_size - header.setup_size:
        raise TruncatedImageError(
            f"kernel {name} is truncated: the compressed payload runs past the end of the file", path=path
        )
    return header


def build_zero_page(
    header: SetupHeader,
    *,
    cmdline_addr: int,
    initrd_addr: int = 0,
    initrd_size: int = 0,
    e820: E820Map,
    rsdp_addr: int | None = None,
) -> bytearray:
    """The 4 KiB ``struct boot_params`` for ``header``: header copied in, loader fields filled."""
    page = bytearray(ZERO_PAGE_SIZE)
    page[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(header.raw)] = header.raw
    page[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    page[HDR_LOADFLAGS] = (header.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~(QUIET_FLAG | KEEP_SEGMENTS) & 0xFF
    struct.pack_into("<H", page, HDR_HEAP_END_PTR, HEAP_END_PTR)
    struct.pack_into("<I", page, HDR_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", page, HDR_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    struct.pack_into("<I", page, HDR_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", page, BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise MemoryMapError(
            f"the memory map has {len(e820)} entries; the zero page holds at most {E820_MAX_ENTRIES_ZEROPAGE}"
        )
    page[BP_E820_ENTRIES] = len(e820)
    table = e820.pack()
    page[BP_E820_TABLE : BP_E820_TABLE + len(table)] = table
    if rsdp_addr is not None:
        struct.pack_into("<Q", page, BP_ACPI_RSDP_ADDR, rsdp_addr)
    return page


def _choose_load_address(plan: BootPlan, header: SetupHeader, size: int, path: str) -> int:
    """``pref_address`` if free; else, for a relocatable kernel, the lowest aligned free RAM above it."""
    preferred = header.pref_address
    if header.relocatable:
        preferred = max(preferred, HIGH_MEMORY_START)
        preferred += -preferred % header.kernel_alignment
    if plan.is_free(preferred, size):
        return preferred
    if header.relocatable:
        for floor in (preferred, HIGH_MEMORY_START):
            addr = plan.lowest_fit(size, align=header.kernel_alignment, floor=floor)
            if addr is not None:
                return addr
    ram = sum(end - start for start, end in plan.free_ranges(HIGH_MEMORY_START))
    where = "anywhere in" if header.relocatable else f"at {preferred:#x} (not relocatable) in"
    raise ImageTooLargeError(
        f"kernel '{path}' needs {size} bytes ({size / 2**20:.1f} MiB, its init_size) {where} guest RAM, "
        f"which has {ram / 2**20:.1f} MiB free above 1 MiB (give the machine more memory with -m)",
        path=path,
    )


@dataclass(frozen=True)
class _DirectEntry:
    """The kernel proper decompressed on the host, and where the decompressor would have put it."""

    kernel: HostKernel
    output: int  # physical address of startup_64 (the decompressor's "output")


def _host_decompressed(path: str, header: SetupHeader, load_addr: int, footprint: int) -> _DirectEntry | None:
    """The kernel proper to enter directly (see :mod:`pyemu.target.x86.boot.bzimage_host`), or None to run
    the guest's decompressor, with a ``-d boot`` line saying why."""
    # Imported here: host-side decompression brings hashing, lzma and temporary files (~12 ms of
    # imports) that only a bzImage boot needs.
    from pyemu.target.x86.boot.bzimage_host import FORCE_GUEST_ENV, forced_guest_decompression, host_kernel

    if forced_guest_decompression():
        log.log("boot", f"{FORCE_GUEST_ENV} is set: the bzImage decompresses itself in the guest")
        return None
    try:
        kernel = host_kernel(path)
    except BootError as exc:
        log.log("boot", f"host-side decompression not used, the guest decompresses the kernel: {exc}")
        return None
    elf = kernel.elf
    # The decompressor's output address without KASLR: the load address rounded up to kernel_alignment,
    # at least LOAD_PHYSICAL_ADDR (pref_address); a kernel that is not relocatable runs at pref_address.
    base = header.pref_address
    output = max(load_addr + (-load_addr % header.kernel_alignment), base) if header.relocatable else base
    reason = None
    if elf.entry != base or elf.phys_start < base:
        reason = (f"the ELF entry {elf.entry:#x} / first segment {elf.phys_start:#x} is not at the header's "
                  f"LOAD_PHYSICAL_ADDR {base:#x}")
    elif output + (elf.phys_end - base) > load_addr + footprint:
        reason = f"the kernel proper ({elf.phys_end - base:#x} bytes) does not fit the {footprint:#x} reserved"
    if reason is not None:
        log.log("boot", f"host-side decompression not used, the guest decompresses the kernel: {reason}")
        return None
    log.log("boot", f"entering the host-decompressed kernel proper at {output:#x} ({kernel.path})")
    return _DirectEntry(kernel, output)


def _place_kernel_proper(memory: GuestMemory, direct: _DirectEntry, header: SetupHeader) -> None:
    """Copy the PT_LOAD segments where the decompressor's parse_elf() puts them, tails zeroed."""
    with ImageFile(direct.kernel.path, "kernel") as image:
        for segment in direct.kernel.elf.segments:
            gpa = direct.output + segment.paddr - header.pref_address
            image.copy_to_memory(memory, gpa, segment.offset, segment.filesz, what="a PT_LOAD segment")
            if segment.memsz > segment.filesz:
                memory.fill(gpa + segment.filesz, segment.memsz - segment.filesz)


def load_bzimage(
    memory: GuestMemory,
    kernel_path: str | os.PathLike[str],
    initrd_path: str | os.PathLike[str] | None,
    cmdline: str,
    e820: E820Map | Iterable[EntryLike],
    rsdp_addr: int | None = None,
) -> BootResult:
    """Load a bzImage, its initrd and command line; return vCPU 0's 64-bit entry state."""
    memory_map = E820Map.coerce(e820)
    with ImageFile(kernel_path, "kernel") as image:
        path = image.path
        header = parse_setup_header(image.head(HEAD_BYTES), file_size=image.size, path=path)
        plan = start_plan(memory, memory_map, path=path, rsdp_addr=rsdp_addr)
        plan.reserve("zero page", ZERO_PAGE_ADDR, ZERO_PAGE_SIZE)
        cmdline_addr = place_cmdline(plan, cmdline, limit=header.cmdline_size, path=path)

        kernel_bytes = image.size - header.setup_size
        footprint = max(header.init_size, kernel_bytes)
        load_addr = _choose_load_address(plan, header, footprint, path)
        kernel = plan.reserve("kernel", load_addr, footprint, error=ImageTooLargeError)
        direct = _host_decompressed(path, header, load_addr, footprint)
        if direct is None:
            image.copy_to_memory(memory, load_addr, header.setup_size, kernel_bytes, what="protected-mode kernel")
        else:
            _place_kernel_proper(memory, direct, header)

    initrd = None
    if initrd_path is not None:
        limit = (1 << 64) if header.initrd_above_4g else header.initrd_addr_max + 1
        initrd = place_initrd(plan, initrd_path, limit=limit)

    gib = identity_gib_needed(max(memory_map.ram_end, max(r.end for r in memory.regions)), PD_MAX_COUNT)
    plan.reserve("page tables", PML4_ADDR, PD_BASE_ADDR + gib * 0x1000 - PML4_ADDR)
    tables = build_identity_tables(memory, pml4=PML4_ADDR, pdpt=PDPT_ADDR, pd_base=PD_BASE_ADDR, gib=gib)

    zero_page = build_zero_page(
        header,
        cmdline_addr=cmdline_addr,
        initrd_addr=initrd.addr if initrd else 0,
        initrd_size=initrd.size if initrd else 0,
        e820=memory_map,
        rsdp_addr=rsdp_addr,
    )
    if direct is not None:
        # What the decompressor's choose_random_location() leaves in loadflags (see bzimage_host).
        kaslr = direct.kernel.has_relocs and "nokaslr" not in cmdline.split()
        zero_page[HDR_LOADFLAGS] = (zero_page[HDR_LOADFLAGS] | KASLR_FLAG) if kaslr else (
            zero_page[HDR_LOADFLAGS] & ~KASLR_FLAG)
    memory.write(ZERO_PAGE_ADDR, zero_page)

    cpu = X86CpuState()
    entry = load_addr + ENTRY_64_OFFSET if direct is None else direct.output
    cpu.set_flat_long64(entry, tables.pml4)
    install_gdt(memory, GDT_ADDR, cpu)
    cpu.regs["rsi"] = ZERO_PAGE_ADDR
    cpu.regs["rsp"] = STACK_TOP
    return BootResult(
        protocol="bzimage" if direct is None else "bzimage (host-decompressed)",
        cpu=cpu,
        entry=entry,
        boot_info_addr=ZERO_PAGE_ADDR,
        cmdline_addr=cmdline_addr,
        kernel=kernel,
        initrd=initrd,
        placements=tuple(plan.placements),
    )
