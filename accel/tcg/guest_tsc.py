"""The software CPU's guest TSC: the host TSC plus one offset that every vCPU of the VM shares.

Why an offset: Unicorn's RDTSC returns the host TSC plus QEMU's ``env->tsc_offset``, a field of the CPU
state blob (found by :mod:`pyemu.accel.tcg.calibration`); RDTSC cannot be hooked and ``msr_write`` of
IA32_TSC does not move it (DESIGN.md, measured). Each vCPU writes :attr:`GuestTsc.offset` into its blob
before every ``emu_start``, so changing the offset while the vCPUs are stopped changes what the guest reads.

Semantics, as QEMU TCG's ``cpu_get_ticks``: the guest TSC counts host TSC cycles while the VM runs, reads 0
right after creation and after :meth:`reset`, and stands still between :meth:`stop` and :meth:`start`
(start continues from the value stop froze, so it never jumps, not even backwards by the small rate
difference between the host TSC and the host's monotonic clock that a recomputation from virtual
nanoseconds would bring). One offset for all vCPUs keeps them exactly in step: the guest cannot write its
TSC under Unicorn (WRMSR is not hookable), so they never legitimately differ.
"""

from __future__ import annotations

import threading
from typing import Callable

from pyemu.accel.tcg.tsc import host_tsc

_MASK = 0xFFFF_FFFF_FFFF_FFFF


class GuestTsc:
    """Offset and frozen value of one VM's guest TSC. ``stop``/``start``/``reset`` are called while
    every vCPU is parked; :attr:`offset` is read by the vCPU threads before each run of their engine."""

    def __init__(self, host: Callable[[], int] = host_tsc) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._frozen: int | None = None
        self.offset = -host() & _MASK
        """Added to the host TSC by RDTSC (mod 2^64): starts the guest TSC at 0 now."""

    @property
    def running(self) -> bool:
        return self._frozen is None

    def value(self) -> int:
        """The guest TSC now (what RDTSC would return)."""
        with self._lock:
            if self._frozen is not None:
                return self._frozen
            return (self._host() + self.offset) & _MASK

    def stop(self) -> None:
        """Freeze the guest TSC at its current value (no-op when stopped)."""
        with self._lock:
            if self._frozen is None:
                self._frozen = (self._host() + self.offset) & _MASK

    def start(self) -> None:
        """Let the guest TSC count again from the frozen value (no-op when running)."""
        with self._lock:
            if self._frozen is not None:
                self.offset = (self._frozen - self._host()) & _MASK
                self._frozen = None

    def reset(self) -> None:
        """The guest TSC reads 0 now (counting on from 0 if running, frozen at 0 if stopped)."""
        with self._lock:
            if self._frozen is not None:
                self._frozen = 0
            else:
                self.offset = -self._host() & _MASK

    def set(self, value: int) -> None:
        """The guest TSC reads ``value`` now (a restored snapshot's TSC)."""
        with self._lock:
            if self._frozen is not None:
                self._frozen = value & _MASK
            else:
                self.offset = (value - self._host()) & _MASK
