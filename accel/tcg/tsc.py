"""The host TSC rate, which is what a guest of the software CPU sees.

Why measure: Unicorn's RDTSC returns the host's TSC and cannot be hooked (DESIGN.md), while Linux takes the
TSC rate from CPUID leaf 0x15/0x16 without calibrating. If the CPUID table claimed a rate other than the
host's, guest time would run fast or slow by the difference. So the board asks for the measured rate and
builds CPUID (and the LAPIC's TSC-deadline conversion) from it.

How: a tiny engine executes RDTSC twice, ``SAMPLE_S`` of host CLOCK_MONOTONIC apart. Each RDTSC is
bracketed by two clock readings and paired with their midpoint: an ``emu_start`` takes tens of µs, and
pairing with one side only biased the rate low by ~0.4% (measured: 2586 vs 2594.6 MHz). The rate is
rounded to whole MHz, the precision CPUID 0x15's ratio carries anyway.

Measured once per host boot: the rate is kept in ``<cache>/host-tsc-hz`` with the kernel's boot id
(``/proc/sys/kernel/random/boot_id``), since an invariant TSC keeps its rate until the host reboots, and the
30 ms measurement was a tenth of every VM's start-up. A file from another boot, or one that does not parse,
is measured again and replaced; a cache that cannot be written only costs the measurement.

:func:`host_tsc` reads the host TSC now the same way (one RDTSC on a scratch engine, ~20 us): the guest
TSC is the host TSC plus an offset (:mod:`pyemu.accel.tcg.guest_tsc`), recomputed at each start and reset.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RDX

from pyemu.accel.tcg.engine_lifetime import free_when_collected_only
from pyemu.system.cache import cache_root, store_small_file

SAMPLE_S = 0.03
_CODE_ADDR = 0x1000
_RDTSC = bytes([0x0F, 0x31])  # rdtsc


def _read_tsc(uc: Uc) -> int:
    uc.emu_start(_CODE_ADDR, _CODE_ADDR + len(_RDTSC))
    return (uc.reg_read(UC_X86_REG_RDX) << 32) | (uc.reg_read(UC_X86_REG_RAX) & 0xFFFFFFFF)


def _sample(uc: Uc, tries: int = 20) -> tuple[float, int]:
    """(host ns, TSC): the TSC read paired with the midpoint of the clock readings around it. Of
    ``tries`` readings the one with the tightest bracket wins: on a busy host a thread preempted between
    the clock reads would otherwise pair the TSC with a time milliseconds off."""
    best: tuple[int, float, int] | None = None
    for _ in range(tries):
        before = time.monotonic_ns()
        tsc = _read_tsc(uc)
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) / 2, tsc)
    assert best is not None
    return best[1], best[2]


def _scratch_engine() -> Uc:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x2000)
    uc.mem_write(_CODE_ADDR, _RDTSC)
    _read_tsc(uc)  # translate once
    return uc


_reader: Uc | None = None
_reader_lock = threading.Lock()


def host_tsc() -> int:
    """The host TSC now (what RDTSC in a software-CPU guest returns before its TSC offset is added)."""
    global _reader
    with _reader_lock:
        if _reader is None:
            _reader = _scratch_engine()
            free_when_collected_only(_reader)  # lives as long as the process
        return _read_tsc(_reader)


@functools.cache
def host_tsc_hz() -> int:
    """The TSC rate a software-CPU guest observes, in Hz, rounded to whole MHz (cached per host boot)."""
    boot_id = _boot_id()
    cache = cache_root() / "host-tsc-hz"
    if boot_id is not None:
        cached = _cached_rate(cache, boot_id)
        if cached is not None:
            return cached
    hz = measure_tsc_hz()
    if boot_id is not None:
        _store_rate(cache, boot_id, hz)
    return hz


def measure_tsc_hz() -> int:
    """Measure the rate now: two RDTSC samples ``SAMPLE_S`` apart (see the module docstring)."""
    uc = _scratch_engine()  # translated once, so both samples cost the same
    start_ns, start_tsc = _sample(uc)
    time.sleep(SAMPLE_S)
    end_ns, end_tsc = _sample(uc)
    hz = (end_tsc - start_tsc) * 1_000_000_000 / max(1.0, end_ns - start_ns)
    return int(round(hz / 1_000_000)) * 1_000_000


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _cached_rate(cache: Path, boot_id: str) -> int | None:
    """The rate stored for this boot, or None (no file, another boot's, or not two plain fields)."""
    try:
        fields = cache.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) != 2 or fields[0] != boot_id or not fields[1].isdigit():
        return None
    hz = int(fields[1])
    return hz if 100_000_000 <= hz <= 10_000_000_000 else None


def _store_rate(cache: Path, boot_id: str, hz: int) -> None:
    store_small_file(cache, f"{boot_id} {hz}\n")
