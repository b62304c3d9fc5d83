"""Dirty-page tracking for live migration under the software CPU, through pyemu's own TLB-fill hook.

Why: pre-copy needs the pages the guest wrote since the previous round. Without a log, every round has
to compare all of RAM with a copy of what was sent (:class:`pyemu.migration.precopy.ShadowTracker`: one
RAM-sized host buffer and a full memcmp per round). QEMU's TCG feeds its dirty-memory bitmap from the
softmmu slow path; pyemu does the same in its C TLB-fill hook (``tlb_fill.c``), which already decides the
permissions of every TLB entry of every engine.

How (while logging):

* the hook grants WRITE to a page only once the page is marked in a byte map shared by the engines of
  the VM (one byte per 4 KiB page of RAM); a write fill marks the page, so the first store to each page
  after a sync comes back to the hook and later stores run on the fast path;
* Unicorn's own page walk, which the hook calls, sets accessed/dirty bits in page-table entries: the
  hook compares the entries it read before with what they hold after and marks the table pages that
  changed; the vCPU's own accesses made in Python (interrupt and exception frames, descriptor and
  page-table updates, :class:`pyemu.accel.tcg.physmem.GuestPhysical`) mark their pages, and so do
  device writes (``DmaMemory.wrote`` -> ``TcgAccelerator.invalidate_code``);
* a sync (:meth:`TcgDirtyLog.fetch`) takes the scheduler's turn, so no engine runs, takes and clears
  the byte map, and asks every engine to flush its TLB at the start of its next turn (the engine may
  only be touched by its own thread; the turn guarantees none runs before it flushed). A page written
  after the take is therefore seen again by a write fill and lands in the next round's set; a page
  written between the take and the flush was in the taken set already and is read by the caller after
  the sync returned.

Known limit: when the hook leaves an access to Unicorn's own MMU (a #PF, or page-table shapes the C walk
does not handle: 4 MiB PSE pages, SMAP with EFLAGS.AC=0, tables outside RAM), the rest of
that one translation block runs with Unicorn's MMU, whose stores are not seen; they are counted in
``log_fallbacks`` (a faulting store writes nothing; the shapes are not used by the guests pyemu boots:
Linux x86-64 uses no PSE, and under SMAP touches user pages only with EFLAGS.AC set). While logging, the hook flushes the
TLB when it takes the engine back, so no entry granted by Unicorn's MMU outlives that block.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyemu.accel.tcg.scheduler import RoundRobin
    from pyemu.accel.tcg.tlb_fill import CodeMap

PAGE_SHIFT = 12


class DirtyBitmap:
    """The byte map of written pages inside the C code map (``struct pyemu_code_map.dirty``).

    Marks from Python threads (devices, vCPU frame pushes) and the take are serialised by a lock; the C
    hook marks only while its engine holds the scheduler's turn, which the take holds too."""

    def __init__(self, state: Any, module: Any, pages: int) -> None:
        ffi: Any = module.ffi
        self._lib: Any = module.lib
        self._state = state
        self._pages = pages
        # Whole 8-byte words (the take scans word by word).
        self._bytes = ffi.new("uint8_t[]", max((pages + 7) // 8 * 8, 8))
        self._out = ffi.new("uint64_t[]", max(pages, 1))
        state.dirty = self._bytes
        self._lock = threading.Lock()

    @property
    def logging(self) -> bool:
        return bool(self._state.logging)

    def mark(self, gpa: int, size: int) -> None:
        """``[gpa, gpa+size)`` was written without a TLB entry (any thread); a no-op unless logging."""
        if size <= 0 or not self._state.logging:
            return
        first, last = gpa >> PAGE_SHIFT, (gpa + size - 1) >> PAGE_SHIFT
        if first >= self._pages:
            return
        with self._lock:
            self._lib.pyemu_dirty_mark(self._state, first, last)

    def take(self) -> set[int]:
        """The marked pages (guest-physical addresses), clearing the marks. Only with no engine running."""
        with self._lock:
            count = int(self._lib.pyemu_dirty_take(self._state, self._out))
            out = self._out
            return {int(out[i]) << PAGE_SHIFT for i in range(count)}

    def set_logging(self, on: bool) -> None:
        with self._lock:
            self._state.logging = 1 if on else 0

    @property
    def statistics(self) -> dict[str, int]:
        return {"dirty_marks": int(self._state.dirty_marks), "log_fallbacks": int(self._state.log_fallbacks)}


class _SyncTurn:
    """The migration thread as a participant of the round-robin: it runs no guest code, so there is
    nothing to preempt (the scheduler preempts the running vCPU on its behalf)."""

    def preempt(self) -> None:
        return None

    def set_contended(self, contended: bool) -> None:
        return None


class TcgDirtyLog:
    """:class:`pyemu.accel.base.DirtyLogging` for the software CPU (see the module docstring)."""

    def __init__(self, code_map: CodeMap, scheduler: RoundRobin) -> None:
        self._code_map = code_map
        self._scheduler = scheduler
        self._turn = _SyncTurn()

    @property
    def bitmap(self) -> DirtyBitmap:
        return self._code_map.dirty

    def start(self) -> None:
        """Record from now on: forget older marks and make every engine drop its writable entries."""
        with self._scheduler.turn(self._turn):
            self.bitmap.take()
            self.bitmap.set_logging(True)
            self._code_map.request_tlb_flush_all()

    def fetch(self) -> set[int]:
        """The pages written since :meth:`start` or the previous fetch; recording goes on."""
        with self._scheduler.turn(self._turn):
            pages = self.bitmap.take()
            self._code_map.request_tlb_flush_all()
        return pages

    def stop(self) -> None:
        """Writable entries stay valid (nothing to flush): stores simply stop coming back to be marked."""
        with self._scheduler.turn(self._turn):
            self.bitmap.set_logging(False)
            self.bitmap.take()
