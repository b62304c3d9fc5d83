"""Engines are freed when collected, and the interpreter's exit handlers leave them to the kernel."""

from __future__ import annotations

import gc
import subprocess
import sys

import pyemu.accel.tcg  # noqa: F401  (selects the libunicorn before unicorn is imported)
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

from pyemu.accel.tcg.engine_lifetime import free_when_collected_only


def test_a_dropped_engine_is_still_freed() -> None:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    free_when_collected_only(uc)
    finalizer = uc._Uc__finalizer  # type: ignore[attr-defined]
    assert finalizer.alive and finalizer.atexit is False
    del uc
    gc.collect()
    assert not finalizer.alive  # uc_close ran


def test_exit_handlers_do_not_close_a_kept_engine() -> None:
    probe = """
import pyemu.accel.tcg, atexit, sys
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from pyemu.accel.tcg.engine_lifetime import free_when_collected_only
kept, plain = Uc(UC_ARCH_X86, UC_MODE_64), Uc(UC_ARCH_X86, UC_MODE_64)
kept.mem_map(0, 0x1000); plain.mem_map(0, 0x1000)
free_when_collected_only(kept)
atexit._run_exitfuncs()
print(kept._Uc__finalizer.alive, plain._Uc__finalizer.alive)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
