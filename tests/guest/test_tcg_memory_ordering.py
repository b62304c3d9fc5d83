"""A guest's full barriers are full barriers on the host: the store-buffering litmus test between a vCPU
and a host thread, as a virtio driver and its device meet at notification suppression.

Why it matters: the driver stores the available index, executes ``smp_mb()`` (Linux on x86-64: ``lock
add $0, -4(%rsp)``) and loads ``avail_event``; the device stores ``avail_event``, fences and loads the
available index. If the driver's load passes its own store, both sides read the old values: the driver
does not notify and the device does not look again -- the queue stalls (the same for used_event and the
used index, which loses an interrupt). QEMU 5.0's TCG, outside its parallel mode, emits no host barrier
for a guest's fences or locked instructions (one vCPU thread needs none among vCPUs), so the host's
store buffer let exactly that happen; pyemu's engine patch ``guest-barriers-are-host-barriers`` emits
one (:mod:`pyemu.accel.tcg.engine_patches`).

The test: the guest stores X = i, runs its barrier, loads Y (recording it) for i = 1..N, while a host
thread (C, on another CPU) stores Y = j, fences, loads X (recording it). With both barriers real no pair
(i, j) can have each side miss the other's store. Each barrier here fails on Unicorn's own code in 4-18%
of the iterations that overlap. (``lock cmpxchg8b`` is patched too but cannot be shown this way: its
helper call is long enough for the host's store buffer to drain anyway.)
"""

from __future__ import annotations

import array
import ctypes
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from pyemu.accel.exits import Stopped
from pyemu.accel.tcg.engine_library import build_dir, loaded_library
from pyemu.testing import GuestProgram, describe, prepared
from pyemu.testing.environment import DATA
from pyemu.testing.handlers import exit_with

ITERATIONS = 1 << 19
X = DATA              # written by the guest
Y = DATA + 0x100      # written by the host thread (another cache line)
GUEST_RECORDS = 0x200000   # the guest's Y after iteration i, as uint32 at 4 * i
RAM = 8 << 20
ATTEMPTS = 4
MIN_OVERLAP = 1000    # iterations of the host thread that saw the guest mid-way: the two really ran at once

HOST_SIDE = r"""
#include <stdint.h>

/* Wait (boundedly) for the guest's first store, then race it: Y = j; full fence; record X. Returns the
   number of iterations run (0: the guest never started). */
uint32_t host_side(volatile uint32_t *x, volatile uint32_t *y, uint32_t *records, uint32_t count)
{
    for (uint64_t spins = 0; *x == 0; spins++) {
        if (spins > 4000000000ull)
            return 0;
    }
    for (uint32_t j = 1; j <= count; j++) {
        *y = j;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        records[j] = *x;
    }
    return count;
}
"""


def _barrier_program(barrier: str) -> GuestProgram:
    return GuestProgram(code=f"""
        mov rsi, {X}
        mov rdi, {Y}
        mov rbx, {GUEST_RECORDS}
        mov ecx, 1
    again:
        mov dword ptr [rsi], ecx
        {barrier}
        mov eax, dword ptr [rdi]
        mov dword ptr [rbx + rcx * 4], eax
        inc ecx
        cmp ecx, {ITERATIONS}
        jbe again
        {exit_with(0x600d)}
    """)


@pytest.fixture(scope="module")
def host_side(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot build the host side of the litmus test")
    directory: Path = tmp_path_factory.mktemp("litmus")
    source, library = directory / "host_side.c", directory / "host_side.so"
    source.write_text(HOST_SIDE)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True,
                   capture_output=True, timeout=60)
    lib = ctypes.CDLL(str(library))
    lib.host_side.restype = ctypes.c_uint32
    lib.host_side.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32)
    return lib


def _race(lib: ctypes.CDLL, program: GuestProgram) -> tuple[int, int]:
    """One run: (pairs where both sides missed each other's store, host iterations that saw the guest
    between its first and last store)."""
    host_records = array.array("I", bytes(4 * (ITERATIONS + 1)))
    with prepared(program, ram_size=RAM) as machine:
        memory = machine.board.memory
        base = memory.host_address(memory.region_of(0))
        address, _ = host_records.buffer_info()
        ran: list[int] = []
        racer = threading.Thread(target=lambda: ran.append(lib.host_side(base + X, base + Y, address, ITERATIONS)),
                                 daemon=True)
        racer.start()
        while machine.board.exit_device.value is None:
            result = machine.vcpu.run()
            assert isinstance(result, Stopped), describe(result)
        racer.join(60.0)
        assert ran == [ITERATIONS], "the host thread did not run its iterations"
        assert machine.board.exit_device.value == 0x600D
        guest_records = memory.view(GUEST_RECORDS, 4 * (ITERATIONS + 1)).cast("I").tolist()
    missed_both = overlap = 0
    for j in range(1, ITERATIONS + 1):
        seen = host_records[j]          # the host's load missed the guest's stores from seen + 1 on
        if 0 < seen < ITERATIONS:
            overlap += 1
            if guest_records[seen + 1] < j:   # ...and the guest's load in iteration seen + 1 missed Y = j
                missed_both += 1
    return missed_both, overlap


@pytest.mark.skipif(Path(loaded_library()).parent != build_dir(),
                    reason="PyPI's libunicorn emits no host barrier for a guest's (pyemu's build does: "
                           "pyemu-engine build)")
@pytest.mark.parametrize("barrier", ["lock add dword ptr [rsp - 4], 0", "mfence", "xchg dword ptr [rsp - 4], eax",
                                     "lock cmpxchg dword ptr [rsp - 4], ecx"])
def test_a_guest_barrier_orders_its_store_before_its_load_on_the_host(host_side: ctypes.CDLL,
                                                                      barrier: str) -> None:
    program = _barrier_program(barrier)
    overlaps = []
    for _ in range(ATTEMPTS):
        missed_both, overlap = _race(host_side, program)
        assert missed_both == 0, (f"with `{barrier}` between them, the guest's load passed its store "
                                  f"{missed_both} times in {overlap} overlapping iterations")
        overlaps.append(overlap)
    if max(overlaps) < MIN_OVERLAP:
        pytest.skip(f"the vCPU and the host thread hardly ran at the same time (overlaps {overlaps}): "
                    "a host with one free CPU cannot show the reordering")
