"""The CPU-state blob calibration finds fields that really are what the vCPU patches."""

from __future__ import annotations

import struct

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as x86

from pyemu.accel.tcg.calibration import GPR_UC_IDS, SEGMENT_NAMES, calibrate
from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.segments import HF_CPL_MASK, HF_LMA, SegCache, flat_code64


def test_layout_is_cached_and_shaped_like_qemu_state() -> None:
    layout = calibrate()
    assert calibrate() is layout
    offsets = list(layout.gpr.values())
    assert offsets == [offsets[0] + 8 * i for i in range(16)]           # QEMU's regs[] array
    segments = [layout.segments[name] for name in SEGMENT_NAMES]
    assert segments == [segments[0] + 24 * i for i in range(6)]        # SegmentCache segs[6]
    assert layout.exception_is_int == layout.error_code + 4
    assert (layout.cr2, layout.cr3, layout.cr4) == (layout.cr0 + 16, layout.cr0 + 24, layout.cr0 + 32)


def test_blob_reads_what_the_api_wrote() -> None:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    blob = CpuBlob(uc, calibrate())
    for index, reg in enumerate(GPR_UC_IDS.values()):
        uc.reg_write(reg, 0x1000 + index)
    uc.reg_write(x86.UC_X86_REG_RIP, 0xFFFF_8000_0000_1234)
    uc.reg_write(x86.UC_X86_REG_CR3, 0x5000)
    uc.msr_write(0xC0000082, 0xFFFF_FFFF_8100_0000)
    blob.pull()
    assert [blob.gpr(name) for name in GPR_UC_IDS] == [0x1000 + i for i in range(16)]
    assert blob.rip == 0xFFFF_8000_0000_1234
    assert blob.cr3 == 0x5000
    assert blob.msr("lstar") == 0xFFFF_FFFF_8100_0000
    assert blob.hflags & HF_LMA
    assert blob.old_exception == -1


def test_blob_patches_reach_the_engine() -> None:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    blob = CpuBlob(uc, calibrate())
    blob.pull()
    blob.set_gpr("rsp", 0x7000)
    blob.set_segment("cs", flat_code64(0x33, 3))
    blob.hflags = (blob.hflags & ~HF_CPL_MASK) | 3
    blob.push()
    assert uc.reg_read(x86.UC_X86_REG_RSP) == 0x7000
    assert uc.reg_read(x86.UC_X86_REG_CS) == 0x33
    blob.pull()
    assert blob.segment("cs") == SegCache(0x33, 0, 0xFFFFFFFF, flat_code64(0x33, 3).flags)
    assert blob.hflags & HF_CPL_MASK == 3
    raw = bytes(uc.context_save())
    assert struct.unpack_from("<Q", raw, calibrate().gpr["rsp"])[0] == 0x7000
