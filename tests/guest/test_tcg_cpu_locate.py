"""What the I/O guard and the NMI gate find in the engine: QEMU's CPUX86State (env), the TCG code buffer,
and the calibrated ``hflags2``."""

from __future__ import annotations

import os

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as x86

from pyemu.accel.tcg.calibration import HF2_GIF, HF2_NMI, calibrate
from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.io_guard import locate_code_buffer, locate_cpu


def _engine() -> tuple[Uc, CpuBlob]:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000)   # makes the engine allocate its TCG context
    return uc, CpuBlob(uc, calibrate())


def _read(address: int, size: int) -> bytes:
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        return os.pread(fd, size, address)
    finally:
        os.close(fd)


def test_hflags2_follows_hflags_and_holds_gif_at_reset() -> None:
    layout = calibrate()
    assert layout.hflags2 == layout.hflags + 4      # QEMU: uint32_t hflags, hflags2
    _uc, blob = _engine()
    blob.pull()
    assert blob.hflags2 & (HF2_GIF | HF2_NMI) == HF2_GIF


def test_env_is_found_and_is_live_cpu_state() -> None:
    layout = calibrate()
    header = layout.gpr["rax"]
    engines = [_engine() for _ in range(2)]
    envs = []
    for uc, blob in engines:
        uc.reg_write(x86.UC_X86_REG_RBX, 0x0123_4567_89AB_CDEF)
        _cpu, env = locate_cpu(uc, blob)   # the second engine goes through the cached offsets
        assert uc.reg_read(x86.UC_X86_REG_RBX) == 0x0123_4567_89AB_CDEF   # registers put back
        rbx = layout.gpr["rbx"] - header
        assert int.from_bytes(_read(env + rbx, 8), "little") == 0x0123_4567_89AB_CDEF
        uc.reg_write(x86.UC_X86_REG_RBX, 42)       # env is the engine's live state, not a copy
        assert int.from_bytes(_read(env + rbx, 8), "little") == 42
        envs.append(env)
    assert envs[0] != envs[1]


def test_code_buffer_is_the_engines_own_rwx_mapping() -> None:
    (uc1, _b1), (uc2, _b2) = _engine(), _engine()
    first, second = locate_code_buffer(uc1), locate_code_buffer(uc2)
    assert first != second
    with open("/proc/self/maps") as maps:
        rwx = {tuple(int(part, 16) for part in line.split()[0].split("-"))
               for line in maps if line.split()[1].startswith("rwx")}
    assert first in rwx and second in rwx
