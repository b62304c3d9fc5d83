"""Keeping Unicorn's translated code coherent with guest RAM written behind the engine's back.

Measured on Unicorn 2.1.4: the engine does not notice writes to guest RAM that do not go through it. A
page that was executed, then rewritten through the shared mapping (a device model's DMA into guest
memory, another vCPU's engine, the host), keeps running its old translation. Even ``uc.mem_write`` of the
page does not invalidate it. QEMU avoids this because DMA goes through its own memory API; in pyemu
device models write guest RAM directly through memoryviews, so whoever writes guest memory that may hold
code must tell the accelerator (:meth:`pyemu.accel.tcg.accel.TcgAccelerator.invalidate_code`).

How a physical range is invalidated: Unicorn's only invalidation entry point (``uc_ctl_remove_cache``)
takes a *virtual* address and translates it with the current page tables. The vCPU thread therefore
turns paging off for the duration (``reg_write(CR0)``, which also flushes the TLB), so that virtual ==
physical, removes the translations, puts the exact CPU state back from the blob and flushes the TLB
again (``UC_CTL_TLB_FLUSH``) so no identity-mapped TLB entry survives. The engine may only be touched by
the vCPU thread: other threads queue ranges and ask the block gate for a service stop.
"""

from __future__ import annotations

import threading

from unicorn import Uc
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86

from pyemu.accel.tcg.block_gate import BlockGate
from pyemu.accel.tcg.context import CpuBlob
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_state import CR0_PG


class CodeInvalidator:
    def __init__(self, uc: Uc, blob: CpuBlob, memory: GuestMemory, gate: BlockGate) -> None:
        self._uc = uc
        self._blob = blob
        self._memory = memory
        self._gate = gate
        self._lock = threading.Lock()
        self._pending: list[tuple[int, int]] = []

    def request(self, gpa: int, size: int) -> None:
        """Thread-safe: translations of ``[gpa, gpa+size)`` must go before the guest runs on."""
        if size <= 0:
            return
        with self._lock:
            self._pending.append((gpa, size))
        self._gate.request_service()

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def service(self) -> None:
        """On the vCPU thread, between runs: invalidate every queued range."""
        self._gate.clear_service()
        with self._lock:
            ranges, self._pending = self._pending, []
        if ranges:
            self.invalidate(ranges)

    def invalidate(self, ranges: list[tuple[int, int]]) -> None:
        """On the vCPU thread, between runs: drop translations of the ``(gpa, size)`` ranges now. The TLB
        is flushed afterwards in every case, so the next fetch from those pages goes through the TLB-fill
        hook again (which records the page as holding this engine's code)."""
        pieces = [piece for gpa, size in ranges for piece in self._ram_pieces(gpa, size)]
        if not pieces:
            return
        blob = self._blob
        blob.pull()
        paging = bool(blob.cr0 & CR0_PG)
        saved = blob.snapshot() if paging else b""
        if paging:
            self._uc.reg_write(x86.UC_X86_REG_CR0, blob.cr0 & ~CR0_PG)
        for start, end in pieces:
            self._uc.ctl_remove_cache(start, end)
        if paging:
            blob.restore(saved)
            blob.push()
        self._uc.ctl(uc_const.UC_CTL_TLB_FLUSH, uc_const.UC_CTL_IO_WRITE)

    def _ram_pieces(self, gpa: int, size: int) -> list[tuple[int, int]]:
        """The parts of the range inside RAM regions (device windows hold no translated code)."""
        end = gpa + size
        return [(max(gpa, r.gpa), min(end, r.end)) for r in self._memory.regions
                if r.gpa < end and gpa < r.end]
