"""Find where the fields the vCPU needs live in Unicorn's CPU-state blob, by probing a scratch engine.

Why a blob at all: Unicorn 2.1.4 gives no API for the hidden parts of the x86 state a privilege change
touches (segment descriptor caches of CS/SS/DS/ES, the translation flags ``hflags`` that hold the CPL and
the 16/32/64-bit code and stack sizes) nor for ``old_exception``/``error_code``/``exception_is_int``.
``uc.context_save()`` copies QEMU's ``CPUX86State`` (up to ``end_reset_fields``) into a buffer after a
40-byte ``uc_context`` header, and ``context_restore`` copies it back, so those fields can be read and
patched there.

Why probes instead of constants: the offsets depend on the exact QEMU struct compiled into this libunicorn.
Each field is located by making the engine put a distinctive value into it through the official API (or
by running a one-instruction program that faults) and searching the blob for that value, then cross-checked
(e.g. the segment cache layout is verified on a full FS load from a GDT descriptor). A mismatch raises
:class:`~pyemu.accel.tcg.errors.CalibrationError` instead of silently patching the wrong bytes.

Measured on Unicorn 2.1.4 (x86-64, this machine), blob size 5608 bytes, offsets from the blob start:
RAX 40 (general registers in QEMU order RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15, 8 bytes each),
RIP 168, RFLAGS 176, hflags 216, segment caches ES/CS/SS/DS/FS/GS at 224 + 24*i (selector +0, base +8,
limit +16, flags +20), LDTR 368, TR 392, GDTR 416, IDTR 440, CR0 464 (CR2 480, CR3 488, CR4 496), EFER 632,
STAR 4864, LSTAR 4880, CSTAR 4888, FMASK 4896, error_code 5424, exception_is_int 5428, old_exception 5536,
tsc_offset 5552, hflags2 220 (right after hflags, as in QEMU), xcr0 4944, pkru 5344. A fresh engine holds ``old_exception = -1``.

``tsc_offset`` is QEMU's ``env->tsc_offset`` (set by SVM's VMRUN in QEMU, never by Unicorn's API): RDTSC
returns the host TSC plus it, so it is how the guest TSC starts at 0 and stops while the VM is paused.
``msr_write(IA32_TSC)`` does not move RDTSC (measured), so there is no API route. QEMU keeps it a few
fields after ``old_exception`` (``vm_vmcb`` then ``tsc_offset``); the probe tries each zero field of that
short window with a large offset and keeps the one that shifts RDTSC by it. Fields there (``vm_vmcb``,
SVM intercepts) only matter inside an SVM guest, so a wrong try is harmless. The whole calibration takes about 45 ms, once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_CTL_IO_WRITE, UC_CTL_TB_FLUSH, UC_HOOK_INTR, UC_MODE_64, Uc, UcError
from unicorn import x86_const as x86

from pyemu.accel.tcg.engine_facts import stored_text, store_text
from pyemu.accel.tcg.errors import CalibrationError

# The order QEMU keeps the general registers in (R_EAX=0, R_ECX=1, ...). Used only to present results.
GPR_UC_IDS: dict[str, int] = {
    "rax": x86.UC_X86_REG_RAX, "rcx": x86.UC_X86_REG_RCX, "rdx": x86.UC_X86_REG_RDX,
    "rbx": x86.UC_X86_REG_RBX, "rsp": x86.UC_X86_REG_RSP, "rbp": x86.UC_X86_REG_RBP,
    "rsi": x86.UC_X86_REG_RSI, "rdi": x86.UC_X86_REG_RDI, "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9, "r10": x86.UC_X86_REG_R10, "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12, "r13": x86.UC_X86_REG_R13, "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
}
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")  # QEMU's R_ES..R_GS order
_SELECTOR_IDS = {"es": x86.UC_X86_REG_ES, "cs": x86.UC_X86_REG_CS, "ss": x86.UC_X86_REG_SS,
                 "ds": x86.UC_X86_REG_DS}

MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_FMASK = 0xC0000084

# QEMU hflags bits the CR0 probe toggles (cpu_x86_update_cr0 copies CR0.MP/EM/TS to hflags bits 9..11).
_HF_MP = 1 << 9
_HF_TS = 1 << 11
_HF_LMA = 1 << 14

# Scratch memory layout of the probe engine.
_GDT = 0x1000
_CODE = 0x2000
_UNTIL = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class SegmentCacheLayout:
    """Offsets inside one QEMU ``SegmentCache`` (selector, base, limit, flags)."""

    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True)
class BlobLayout:
    """Offsets (from the start of ``bytes(uc.context_save())``) of the fields the vCPU reads or patches."""

    size: int
    gpr: dict[str, int]
    rip: int
    rflags: int
    hflags: int
    segments: dict[str, int]  # es, cs, ss, ds, fs, gs -> start of the SegmentCache
    ldt: int
    tr: int
    gdt: int
    idt: int
    seg: SegmentCacheLayout
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    star: int
    lstar: int
    cstar: int
    fmask: int
    error_code: int
    exception_is_int: int
    old_exception: int
    tsc_offset: int
    hflags2: int = -1   # QEMU's env->hflags2 (HF2_NMI_MASK: NMIs blocked until IRET); see _calibrate_hflags2
    xcr0: int = -1      # QEMU's env->xcr0 (8 bytes) and env->pkru (4 bytes); see _calibrate_xsave_state
    pkru: int = -1


def _aligned_offsets(blob: bytes, fmt: str, value: int) -> list[int]:
    """Offsets, multiples of the field's width, where ``blob`` holds ``value`` packed as ``fmt``: found with
    ``bytes.find`` (unpacking every aligned field of the 5.6 KiB blob in Python, 51 times, was half of
    the calibration's time)."""
    width = struct.calcsize(fmt)
    needle = struct.pack(fmt, value)
    found = []
    at = blob.find(needle)
    while at >= 0:
        if at % width == 0:
            found.append(at)
        at = blob.find(needle, at + 1)
    return found


def _unique(candidates: list[int] | set[int], field: str) -> int:
    found = sorted(set(candidates))
    if len(found) != 1:
        raise CalibrationError(
            f"CPU-state blob field '{field}': expected one location, found {found[:8]}", field=field
        )
    return found[0]


class _Probe:
    """A scratch x86-64 engine with 64 KiB of RAM at 0 and an INTR hook recording the blob at the fault."""

    def __init__(self) -> None:
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map(0, 0x10000)
        self.uc.reg_write(x86.UC_X86_REG_GDTR, (0, _GDT, 0xFF, 0))
        self.fault: tuple[int, bytes] | None = None
        self.uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def _on_intr(self, uc: Uc, intno: int, _user: object) -> None:
        if self.fault is None:
            self.fault = (intno, bytes(uc.context_save()))
        uc.emu_stop()

    def blob(self) -> bytes:
        return bytes(self.uc.context_save())

    def run(self, code: bytes) -> tuple[int, bytes]:
        """Run ``code`` (which must fault) and return the vector and the blob seen in the INTR hook."""
        self.uc.mem_write(_CODE, code)
        self.uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)  # new code at the same address
        self.fault = None
        try:
            self.uc.emu_start(_CODE, _UNTIL, count=16)
        except UcError as exc:
            raise CalibrationError(f"calibration probe failed: {exc}", field="probe") from exc
        if self.fault is None:
            raise CalibrationError("calibration probe did not fault", field="probe")
        return self.fault


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte GDT code/data descriptor (``access`` = P/DPL/S/type byte, ``flags`` = G/DB/L/AVL nibble)."""
    low = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    high = ((base >> 16) & 0xFF) | (access << 8) | (((limit >> 16) & 0xF) << 16) | (flags << 20) \
        | (base & 0xFF000000)
    return struct.pack("<II", low, high)


def _calibrate_registers(probe: _Probe) -> dict[str, int]:
    uc = probe.uc
    found: dict[str, int] = {}
    for index, (name, reg) in enumerate(GPR_UC_IDS.items()):
        uc.reg_write(reg, 0x5A17_0000_0000_0000 | (index << 20) | 0x0F0F)
    blob = probe.blob()
    for index, name in enumerate(GPR_UC_IDS):
        found[name] = _unique(_aligned_offsets(blob, "<Q", 0x5A17_0000_0000_0000 | (index << 20) | 0x0F0F), name)
    return found


def _calibrate_value(probe: _Probe, field: str, write, values: tuple[int, int], fmt: str = "<Q") -> int:
    """Locate the field that takes both ``values`` when ``write(value)`` is called with each."""
    candidates: set[int] | None = None
    for value in values:
        write(value)
        hits = set(_aligned_offsets(probe.blob(), fmt, value))
        candidates = hits if candidates is None else candidates & hits
    return _unique(candidates or set(), field)


def _calibrate_segment_cache(probe: _Probe) -> tuple[dict[str, int], SegmentCacheLayout]:
    """Selectors of ES/CS/SS/DS (reg_write only sets the selector in 64-bit mode) plus a full FS and GS
    load from GDT descriptors, which fixes the cache layout (selector/base/limit/flags)."""
    uc = probe.uc
    selectors = {"es": 0x0A18, "cs": 0x0B28, "ss": 0x0C38, "ds": 0x0D48}
    for name, value in selectors.items():
        uc.reg_write(_SELECTOR_IDS[name], value)
    uc.mem_write(_GDT + 0x18, _descriptor(0x12345678, 0x5432, 0x93, 0x4))
    uc.mem_write(_GDT + 0x20, _descriptor(0x23456780, 0x6543, 0x93, 0x4))
    uc.reg_write(x86.UC_X86_REG_FS, 0x18)
    uc.reg_write(x86.UC_X86_REG_GS, 0x20)
    blob = probe.blob()
    offsets = {name: _unique(_aligned_offsets(blob, "<I", value), name) for name, value in selectors.items()}
    fs_base = _unique(_aligned_offsets(blob, "<Q", 0x12345678), "fs.base")
    gs_base = _unique(_aligned_offsets(blob, "<Q", 0x23456780), "gs.base")
    stride = gs_base - fs_base
    layout = None
    for sel_delta in (-8, -4):
        if struct.unpack_from("<I", blob, fs_base + sel_delta)[0] == 0x18:
            base_delta = -sel_delta
            layout = SegmentCacheLayout(0, base_delta, base_delta + 8, base_delta + 12)
    if layout is None:
        raise CalibrationError("segment cache: FS selector not found next to its base", field="segment")
    fs = fs_base - layout.base
    expected_flags = 0x00409300  # DB, P, S, type 3 (read/write, accessed)
    if (struct.unpack_from("<I", blob, fs + layout.limit)[0] != 0x5432
            or struct.unpack_from("<I", blob, fs + layout.flags)[0] & 0x00F0FF00 != expected_flags):
        raise CalibrationError("segment cache: FS limit/flags not where expected", field="segment")
    offsets["fs"] = fs
    offsets["gs"] = gs_base - layout.base
    for index, name in enumerate(SEGMENT_NAMES):
        if offsets[name] != offsets["es"] + index * stride:
            raise CalibrationError(f"segment cache of {name} is not in QEMU's ES..GS order", field=name)
    return offsets, layout


def _calibrate_system_tables(probe: _Probe, seg: SegmentCacheLayout) -> dict[str, int]:
    uc = probe.uc
    found = {}
    for name, reg, base in (("tr", x86.UC_X86_REG_TR, 0x5678_9ABC_D000),
                            ("ldt", x86.UC_X86_REG_LDTR, 0x6789_ABCD_E000)):
        uc.reg_write(reg, (0x0E58 if name == "tr" else 0x0F68, base, 0x1E67, 0x8B00))
        start = _unique(_aligned_offsets(probe.blob(), "<Q", base), name) - seg.base
        blob = probe.blob()
        if struct.unpack_from("<I", blob, start + seg.limit)[0] != 0x1E67:
            raise CalibrationError(f"{name}: limit not where the segment cache layout says", field=name)
        found[name] = start
    for name, reg, base in (("idt", x86.UC_X86_REG_IDTR, 0x789A_BCDE_F000),):
        uc.reg_write(reg, (0, base, 0x0FFF, 0))
        found[name] = _unique(_aligned_offsets(probe.blob(), "<Q", base), name) - seg.base
    # GDTR last: the segment probe above needed it at _GDT. Restore it afterwards.
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, 0x0009_8765_4000, 0x0FFF, 0))
    found["gdt"] = _unique(_aligned_offsets(probe.blob(), "<Q", 0x0009_8765_4000), "gdt") - seg.base
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, _GDT, 0xFF, 0))
    return found


def _calibrate_control(probe: _Probe) -> dict[str, int]:
    """CR2/CR3 by unique values; CR0/CR4 and hflags by toggling bits with known effects."""
    uc = probe.uc
    cr2 = _calibrate_value(probe, "cr2", lambda v: uc.reg_write(x86.UC_X86_REG_CR2, v),
                           (0x7654_3210_F000, 0x6543_2100_E000))
    cr3 = _calibrate_value(probe, "cr3", lambda v: uc.reg_write(x86.UC_X86_REG_CR3, v),
                           (0x3F5F_6000, 0x2E4E_5000))
    cr0_value = uc.reg_read(x86.UC_X86_REG_CR0)
    cr4_value = uc.reg_read(x86.UC_X86_REG_CR4)
    uc.reg_write(x86.UC_X86_REG_CR0, cr0_value & ~0xA)
    plain = probe.blob()
    uc.reg_write(x86.UC_X86_REG_CR0, (cr0_value & ~0xA) | 0x2)  # MP
    with_mp = probe.blob()
    uc.reg_write(x86.UC_X86_REG_CR0, (cr0_value & ~0xA) | 0x8)  # TS
    with_ts = probe.blob()
    uc.reg_write(x86.UC_X86_REG_CR0, cr0_value)
    cr0 = _unique([o for o in _aligned_offsets(with_mp, "<Q", (cr0_value & ~0xA) | 0x2)
                   if struct.unpack_from("<Q", with_ts, o)[0] == (cr0_value & ~0xA) | 0x8], "cr0")
    hflags_hits = []
    for off in range(0, len(plain) - 3, 4):
        a, b, c = (struct.unpack_from("<I", blob, off)[0] for blob in (plain, with_mp, with_ts))
        if a ^ b == _HF_MP and a ^ c == _HF_TS and a & _HF_LMA:
            hflags_hits.append(off)
    hflags = _unique(hflags_hits, "hflags")
    uc.reg_write(x86.UC_X86_REG_CR4, cr4_value ^ (1 << 9))  # OSFXSR
    toggled = probe.blob()
    uc.reg_write(x86.UC_X86_REG_CR4, cr4_value)
    cr4 = _unique([o for o in _aligned_offsets(toggled, "<Q", cr4_value ^ (1 << 9))
                   if struct.unpack_from("<Q", probe.blob(), o)[0] == cr4_value], "cr4")
    if (cr2 - cr0, cr3 - cr0, cr4 - cr0) != (16, 24, 32):
        raise CalibrationError("control registers are not an array cr[0..4]", field="cr")
    return {"cr0": cr0, "cr2": cr2, "cr3": cr3, "cr4": cr4, "hflags": hflags}


def _calibrate_msrs(probe: _Probe) -> dict[str, int]:
    uc = probe.uc
    found = {}
    for name, index, values in (("star", MSR_STAR, (0x0023_0010_0000_0000, 0x001B_0008_0000_0000)),
                                ("lstar", MSR_LSTAR, (0xFFFF_8000_1234_5670, 0xFFFF_8000_2345_6780)),
                                ("cstar", MSR_CSTAR, (0xFFFF_8000_3456_7890, 0xFFFF_8000_4567_8900)),
                                ("fmask", MSR_FMASK, (0x0004_7FD5, 0x0004_7AD5))):
        found[name] = _calibrate_value(probe, name, lambda v, i=index: uc.msr_write(i, v), values)
        uc.msr_write(index, 0)
    efer = uc.msr_read(MSR_EFER)
    found["efer"] = _calibrate_value(probe, "efer", lambda v: uc.msr_write(MSR_EFER, v),
                                     (efer | 1, efer & ~1))
    uc.msr_write(MSR_EFER, efer)
    return found


def _calibrate_exceptions(probe: _Probe, known: set[int]) -> dict[str, int]:
    """error_code / exception_is_int / old_exception from faulting one-instruction programs.

    ``mov ds, ax`` with a selector beyond the GDT limit raises #GP(selector); ``int 0x21`` is a software
    interrupt; ``div`` by zero after an unreset #GP is promoted to #DF by QEMU's check_exception, which
    identifies old_exception, and resetting the candidate to -1 must turn it back into #DE.
    """
    uc = probe.uc
    start = uc.context_save()

    def mov_ds(selector: int) -> bytes:  # mov ax, imm16; mov ds, ax; hlt
        return b"\x66\xb8" + struct.pack("<H", selector) + b"\x8e\xd8\xf4"

    gp = []
    for selector in (0x1238, 0x2460):
        uc.context_restore(start)
        vector, blob = probe.run(mov_ds(selector))
        if vector != 13:
            raise CalibrationError(f"#GP probe raised vector {vector}", field="error_code")
        gp.append(blob)
    error_code = _unique([o for o in _aligned_offsets(gp[0], "<I", 0x1238)
                          if struct.unpack_from("<I", gp[1], o)[0] == 0x2460 and o not in known],
                         "error_code")
    # #DE right after the (unreset) #GP: contributory + contributory -> #DF.
    vector, after = probe.run(bytes.fromhex("31c9f7f1f4"))  # xor ecx, ecx; div ecx; hlt
    if vector != 8:
        raise CalibrationError(f"#DE after #GP raised vector {vector}, not #DF", field="old_exception")
    candidates = [o for o in _aligned_offsets(gp[1], "<i", 13) if struct.unpack_from("<i", after, o)[0] == 8]
    verified = []
    for offset in candidates:
        uc.context_restore(start)
        probe.run(mov_ds(0x1238))
        ctx = uc.context_save()
        raw = bytearray(bytes(ctx))
        struct.pack_into("<i", raw, offset, -1)
        _write_context(ctx, raw)
        uc.context_restore(ctx)
        if probe.run(bytes.fromhex("31c9f7f1f4"))[0] == 0:
            verified.append(offset)
    old_exception = _unique(verified, "old_exception")
    uc.context_restore(start)
    vector, soft = probe.run(bytes.fromhex("cd21f4"))  # int 0x21; hlt
    if vector != 0x21:
        raise CalibrationError(f"int 0x21 probe raised vector {vector}", field="exception_is_int")
    flags = [o for o in _aligned_offsets(soft, "<I", 1)
             if all(struct.unpack_from("<I", blob, o)[0] == 0 for blob in gp)]
    # QEMU keeps exception_is_int right after error_code; require the probe to agree.
    if error_code + 4 not in flags:
        raise CalibrationError("exception_is_int is not next to error_code", field="exception_is_int")
    uc.context_restore(start)
    return {"error_code": error_code, "exception_is_int": error_code + 4, "old_exception": old_exception}


_TSC_WINDOW = 64  # bytes after old_exception searched for tsc_offset
_TSC_SHIFT = 1 << 50


def _calibrate_tsc_offset(probe: _Probe, old_exception: int) -> int:
    """The 8-byte field that RDTSC adds to the host TSC (see the module docstring)."""
    uc = probe.uc
    uc.mem_write(_CODE, bytes.fromhex("0f31"))  # rdtsc
    uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)

    def rdtsc() -> int:
        uc.emu_start(_CODE, _CODE + 2)
        return (uc.reg_read(x86.UC_X86_REG_RDX) << 32) | (uc.reg_read(x86.UC_X86_REG_RAX) & 0xFFFF_FFFF)

    ctx = uc.context_save()
    plain = bytes(ctx)
    found = []
    start = (old_exception + 8) & ~7
    for offset in range(start, min(len(plain) - 8, old_exception + _TSC_WINDOW), 8):
        if struct.unpack_from("<Q", plain, offset)[0] != 0:
            continue
        raw = bytearray(plain)
        struct.pack_into("<Q", raw, offset, _TSC_SHIFT)
        _write_context(ctx, raw)
        uc.context_restore(ctx)
        before = rdtsc()
        _write_context(ctx, plain)
        uc.context_restore(ctx)
        after = rdtsc()
        # shifted by 2^50 minus the few microseconds between the two reads
        if 0 < before - after <= _TSC_SHIFT and _TSC_SHIFT - (before - after) < 1 << 40:
            found.append(offset)
    return _unique(found, "tsc_offset")


HF2_GIF = 1 << 0        # QEMU's HF2_GIF_MASK: set at reset (SVM's global interrupt flag)
HF2_NMI = 1 << 2        # QEMU's HF2_NMI_MASK: an NMI is being handled; IRET clears it
_HFLAGS2_WINDOW = 32    # bytes after hflags searched for hflags2
_STACK = 0x8000


def _calibrate_hflags2(probe: _Probe, hflags: int) -> int:
    """``hflags2``: the 32-bit field after ``hflags`` that holds GIF (1) at reset and whose NMI bit an
    ``iretq`` clears. Each candidate gets the NMI bit alone, then the probe runs ``iretq`` to a flat 64-bit
    code segment; the field QEMU's IRET helper clears is the one. This also checks, on this libunicorn, that
    IRET ends NMI blocking (what the vCPU relies on)."""
    uc = probe.uc
    uc.mem_write(_GDT + 0x28, _descriptor(0, 0xFFFFF, 0x9B, 0xA))   # 64-bit code, DPL 0
    uc.mem_write(_GDT + 0x30, _descriptor(0, 0xFFFFF, 0x93, 0xC))   # flat data, DPL 0
    target = _CODE + 0x10
    uc.mem_write(_CODE, bytes.fromhex("48cf"))                      # iretq
    uc.mem_write(target, b"\xf4")
    uc.mem_write(_STACK - 40, struct.pack("<5Q", target, 0x28, 0x2, _STACK, 0x30))
    uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)
    start = uc.context_save()
    plain = bytes(start)
    found = []
    for offset in range(hflags + 4, min(len(plain) - 4, hflags + _HFLAGS2_WINDOW), 4):
        value = struct.unpack_from("<I", plain, offset)[0]
        if value & (HF2_GIF | HF2_NMI) != HF2_GIF:
            continue
        raw = bytearray(plain)
        struct.pack_into("<I", raw, offset, value | HF2_NMI)
        ctx = uc.context_save()
        _write_context(ctx, raw)
        uc.context_restore(ctx)
        uc.reg_write(x86.UC_X86_REG_RSP, _STACK - 40)
        try:
            uc.emu_start(_CODE, target)
        except UcError:
            continue
        after = bytes(uc.context_save())
        if uc.reg_read(x86.UC_X86_REG_RIP) == target and struct.unpack_from("<I", after, offset)[0] == value:
            found.append(offset)
    uc.context_restore(start)
    return _unique(found, "hflags2")


_CR4_OSXSAVE = 1 << 18
_CR4_PKE = 1 << 22


def _calibrate_xsave_state(gpr: dict[str, int]) -> tuple[int, int]:
    """(``xcr0``, ``pkru``): the fields XSETBV and WRPKRU write, found by running each twice with different
    values in a scratch engine whose model has XSAVE and PKU (Skylake-Server; the layout of the CPU state
    does not depend on the model). The general registers that carried the values are not candidates.
    Needed because the vCPU state carries both (XSAVE components 0/1 and 9) and the TLB-fill hook reads
    PKRU for protection keys."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_cpu_model(x86.UC_CPU_X86_SKYLAKE_SERVER)
    uc.mem_map(0, 0x10000)
    uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | _CR4_OSXSAVE | _CR4_PKE)
    known = set(gpr.values())

    def run(code: bytes, eax: int) -> bytes:
        uc.mem_write(_CODE, code)
        uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)
        uc.reg_write(x86.UC_X86_REG_RAX, eax)
        uc.reg_write(x86.UC_X86_REG_RCX, 0)
        uc.reg_write(x86.UC_X86_REG_RDX, 0)
        try:
            uc.emu_start(_CODE, _CODE + len(code))
        except UcError as exc:
            raise CalibrationError(f"XSETBV/WRPKRU probe failed: {exc}", field="xsave") from exc
        return bytes(uc.context_save())

    def locate(code: bytes, fmt: str, values: tuple[int, int], field: str) -> int:
        blobs = [run(code, value) for value in values]
        return _unique([o for o in _aligned_offsets(blobs[0], fmt, values[0])
                        if struct.unpack_from(fmt, blobs[1], o)[0] == values[1] and o not in known], field)

    xcr0 = locate(bytes.fromhex("0f01d1"), "<Q", (0x7, 0x203), "xcr0")             # xsetbv
    pkru = locate(bytes.fromhex("0f01ef"), "<I", (0x5A5A_1234, 0x3C3C_5678), "pkru")  # wrpkru
    return xcr0, pkru


def _write_context(ctx: object, raw: bytes | bytearray) -> None:
    import ctypes

    pointer = ctypes.cast(ctx.context, ctypes.c_void_p).value  # type: ignore[attr-defined]
    if pointer is None:
        raise CalibrationError("context buffer has no address", field="context")
    ctypes.memmove(pointer, bytes(raw), len(raw))


@functools.cache
def calibrate() -> BlobLayout:
    """The blob layout of the loaded libunicorn: as an earlier process stored it for this very library
    (:mod:`pyemu.accel.tcg.engine_facts`), else probed now and stored. Once per process.

    Why stored: probing takes two scratch engines and ~60 runs of them, 10-25 ms of every VM's start
    on this host, for offsets fixed by the library's build. A stored layout that does not parse into
    every field of :class:`BlobLayout` is probed again."""
    stored = stored_layout(LAYOUT_FACTS)
    if stored is not None:
        return stored
    layout = probe_layout()
    store_layout(LAYOUT_FACTS, layout)
    return layout


LAYOUT_FACTS = "blob-layout"


def stored_layout(name: str) -> BlobLayout | None:
    """The layout stored under ``name`` for the loaded library, or None (none, another library, damaged)."""
    text = stored_text(name)
    if text is None:
        return None
    try:
        fields = json.loads(text)
        fields["seg"] = SegmentCacheLayout(**fields["seg"])
        layout = BlobLayout(**fields)
    except (ValueError, TypeError, KeyError):
        return None
    nested = ("size", "gpr", "segments", "seg")
    offsets = [value for key, value in dataclasses.asdict(layout).items() if key not in nested]
    offsets += [*layout.gpr.values(), *layout.segments.values(), *dataclasses.astuple(layout.seg)]
    if (type(layout.size) is not int or layout.size <= 0 or list(layout.gpr) != list(GPR_UC_IDS)
            or list(layout.segments) != list(SEGMENT_NAMES)
            or not all(type(value) is int and -1 <= value < layout.size for value in offsets)):
        return None
    return layout


def store_layout(name: str, layout: BlobLayout) -> None:
    store_text(name, json.dumps(dataclasses.asdict(layout)))  # in field order: gpr's order is QEMU's


def probe_layout() -> BlobLayout:
    """Probe a scratch engine for every offset of :class:`BlobLayout` (see the module docstring)."""
    probe = _Probe()
    uc = probe.uc
    size = len(probe.blob())
    gpr = _calibrate_registers(probe)
    rip = _calibrate_value(probe, "rip", lambda v: uc.reg_write(x86.UC_X86_REG_RIP, v),
                           (0x1234_5678_9AB0, 0x2345_6789_ABC0))
    rflags = _calibrate_value(probe, "rflags", lambda v: uc.reg_write(x86.UC_X86_REG_RFLAGS, v),
                              (0x0020_0846, 0x0004_0002))
    uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x2)
    segments, seg = _calibrate_segment_cache(probe)
    tables = _calibrate_system_tables(probe, seg)
    control = _calibrate_control(probe)
    msrs = _calibrate_msrs(probe)
    for name in GPR_UC_IDS.values():
        uc.reg_write(name, 0)
    exceptions = _calibrate_exceptions(probe, set(gpr.values()))
    tsc_offset = _calibrate_tsc_offset(probe, exceptions["old_exception"])
    hflags2 = _calibrate_hflags2(probe, control["hflags"])
    xcr0, pkru = _calibrate_xsave_state(gpr)
    return BlobLayout(size=size, gpr=gpr, rip=rip, rflags=rflags, segments=segments, seg=seg, **tables,
                      **control, **msrs, **exceptions, tsc_offset=tsc_offset, hflags2=hflags2, xcr0=xcr0,
                      pkru=pkru)
