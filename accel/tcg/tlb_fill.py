"""Fast guest stores: a C TLB-fill hook that withholds EXEC from TLB entries of pages that hold no code.

Why (Unicorn 2.1.4 source, ``qemu/accel/tcg/cputlb.c``; measured here): every TLB entry for a writable
RAM page starts "not dirty" (``tlb_set_page_with_attrs``: Unicorn's ``cpu_physical_memory_is_clean``
always answers true), so its stores take the slow path (``store_helper`` -> ``notdirty_write``: two
``address_space_translate`` look-ups and a ``tb_invalidate_phys_page_fast``). ``notdirty_write`` marks
the entry dirty, making later stores fast, only when the entry is not executable
(``tlbe->addr_code == -1``) and no memory hook exists. With the engine's own MMU, an entry is executable
whenever the guest's page tables allow execution, which for a kernel's data in its image mapping (all
RWX until late in boot), for any page with paging off, and for the bzImage decompressor's identity map
(no NX at all) means every store is slow: 25 M stores/s instead of 308 M stores/s in a guest store loop
(benchmarks/tcg_store_bench.py).

What this does: the engine runs with ``UC_TLB_VIRTUAL`` and this hook fills its TLB. The hook
(``tlb_fill.c``) walks the guest page tables to get the page and the permissions the CPU would grant;
with pyemu's libunicorn it then sets the accessed bits (and the leaf's dirty bit for a store) as the
CPU's walk does, and returns the guest's page size in two permission bits the engine patch
``fill-page-size`` reads, so Unicorn notes 2 MiB and 1 GiB pages for INVLPG. With PyPI's library,
Unicorn's own walk repeats the translation instead (``uc_vmem_translate`` with the engine briefly in
``UC_TLB_CPU`` mode), which sets those bits and notes large pages. That second walk, with its two
``uc_ctl`` switches and a second ``tlb_set_page``, was ~7% of a PVH boot of Debian's kernel (~700k
fills): interleaved boots 2.45 -> 2.26 s (medians of 10, 2026-12-06, together with the engine patch
``fill-without-state-restore``). Then it grants those permissions, minus EXEC for a physical page from
which no instruction has been fetched yet (a byte map over RAM, set at the first instruction-fetch fill). Pages
that hold code keep the executable entries and Unicorn's self-modifying-code checks on every store, as
before; a code fetch from a data page misses (its entry lacks EXEC), marks the page as code and gets a
full entry.

A page that holds code can also be written through a mapping that may not execute it (the kernel's direct
map; Linux writes a module through an NX mapping and only then makes it executable). Unicorn makes such an
entry's stores fast after its first one, and never re-checks an entry that was fast before the page got
code, so translations of the old bytes survive: a module loaded where a freed module's code had run ran
the old module's code (1 boot in ~15 here oopsed in ``insmod button``). pyemu's libunicorn restores
QEMU's rule (engine patches ``stores-to-code-stay-checked`` and ``protect-code-in-every-mapping``): an
entry stays checked while its page holds any translation, and a page's first translation makes every
entry that maps it check again. PyPI's library still has the gap (``tests/guest/test_tcg_tlb_fill.py``).

Faults are left to Unicorn: when the read-only walk would refuse the access (or meets anything unusual:
tables outside RAM, 4 MiB pages, LA57, SMAP with EFLAGS.AC=0), the hook switches the
engine back to ``UC_TLB_CPU`` and reports a miss, which ends ``emu_start`` with UC_ERR_EXCEPTION and RIP
at the instruction (``fill_failed`` is set). The vCPU re-runs it under the engine's own MMU, which raises
the architectural #PF; the block gate switches back to this hook at the next block start.

Protection keys (CR4.PKE, which Linux sets when CPUID offers PKU, as ``-cpu max`` does): the walk applies
them itself, reading PKRU from the engine's ``env`` (:meth:`TlbFill.watch_pkru`; the offset is calibrated,
:func:`pyemu.accel.tcg.calibration._calibrate_xsave_state`). For a user page (U/S=1 at every level) in
IA-32e paging, the leaf's key (bits 62:59) selects PKRU.AD (no data reads or writes) and PKRU.WD (no
writes by user accesses, nor by supervisor accesses under CR0.WP); fetches and supervisor pages are not
affected. An access the key forbids is left to Unicorn as any other fault (its #PF carries the PK bit);
a permitted one stays on the hook (before, every fill with CR4.PKE set fell back to Unicorn's MMU, and
with it the dirty log and the code map). Grants cannot outlive a PKRU change: Unicorn's WRPKRU helper
flushes the TLB, as QEMU's does. Without a located ``env`` (``pkru`` NULL) PKE falls back as before.

Also needed for this mode: ``emu_start``'s "until" address. At the end of every run Unicorn invalidates
the code at ``until - 1`` (``softmmu/cpus.c``), translating that address through the TLB; with this hook
that fill would report a miss and fail the run. The vCPU therefore uses exit mode with no exits
(``uc_ctl_exits_enable``), where ``until`` is ignored and nothing is translated.

Several engines (``-smp N``): each vCPU is its own engine with its own translation cache, and a store by
one engine does not invalidate another engine's translations (the same staleness as DMA, see
:mod:`pyemu.accel.tcg.code_cache`). The byte map of code pages is therefore shared by the engines of a VM
(:class:`CodeMap`), one bit per engine: a fetch fill sets the engine's bit; a page whose bits include
another engine is granted without WRITE, so the first store to it comes back as a write fill, which
queues the page for invalidation in every other owner, clears their bits, and then grants WRITE. An
engine serves its queue at the start of its next turn (the scheduler runs one engine at a time), and
drops all its code if the queue overflowed. A second byte map records which engines were granted WRITE
on a page since their last TLB flush: when a fetch fill makes a page code, those other engines may still
hold fast write entries for it, so each is asked to flush its TLB before its next turn. (A simpler rule,
every engine flushes whenever any page became code, cost 2.3 s of a 9 s two-CPU Linux boot.) Entries that the engine's
own MMU filled while the hook had given up (fallback) were granted without the map, so with several
engines the gate flushes the TLB when it switches back to the hook.

Accesses are checked at the current privilege level (CS.RPL); an implicit supervisor access made at
CPL 3 (a descriptor-table read for a segment load in user mode) to a supervisor-only page is refused by
the walk and so re-run under Unicorn's MMU, which uses the right MMU index. The byte map of code pages
only grows while translated code may exist; it is cleared with the translation cache on a state load.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING, Any

from unicorn import UC_HOOK_TLB_FILL, Uc
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86

from pyemu.accel.tcg.block_gate import BlockGate, native_function
from pyemu.accel.tcg.dirty_log import DirtyBitmap
from pyemu.accel.tcg.errors import EngineError
from pyemu.hw.core.dma import WriteScreen
from pyemu.system.memory import GuestMemory

if TYPE_CHECKING:
    from pyemu.accel.tcg.calibration import BlobLayout

_RAM_SLOTS = 8
_CTL_WRITE_1 = (1 << 26) | (uc_const.UC_CTL_IO_WRITE << 30)
_CTL_WRITE_0 = uc_const.UC_CTL_IO_WRITE << 30


def tlb_hook_enabled() -> bool:
    """``PYEMU_TCG_ENGINE_TLB=1`` keeps the engine's own TLB fill (for A/B measurements and bisecting)."""
    return os.environ.get("PYEMU_TCG_ENGINE_TLB", "") not in ("1", "yes", "true")


def has_fill_page_sizes(library: ctypes.CDLL) -> bool:
    """Whether ``library`` is pyemu's build, whose ``unicorn_fill_tlb`` takes the guest's page size from
    the hook (engine patch ``fill-page-size``): the hook's own walk is then the only one."""
    return hasattr(library, "uc_pyemu_native_events")


def _uc_function(library: ctypes.CDLL, name: str) -> int:
    return int(ctypes.cast(getattr(library, name), ctypes.c_void_p).value or 0)


FEW_RANGES = 4
"""Up to this many ranges are tested one by one in :meth:`CodeMap.ranges_with_code`."""


class CodeMap:
    """Which engines of one VM may hold translated code from which 4 KiB RAM page (see module docstring).

    Touched by the engine that holds the scheduler's turn (C hook) and by vCPU threads at the start of
    their turn; the scheduler's lock orders those accesses, so no lock of its own."""

    MAX_ENGINES = 8
    QUEUE_CAPACITY = 512

    def __init__(self, memory: GuestMemory, module: Any) -> None:
        ffi: Any = module.ffi
        self._ffi = ffi
        self._lib: Any = module.lib
        ram_end = max((r.end for r in memory.regions), default=0)
        pages = (ram_end + 0xFFF) >> 12
        self._owners = ffi.new("uint8_t[]", max(pages, 1))
        self._owner_bytes = memoryview(ffi.buffer(self._owners))
        self._page_count = pages
        self._writers = ffi.new("uint8_t[]", max(pages, 1))
        self.state: Any = ffi.new("struct pyemu_code_map *")
        self.state.owners = self._owners
        self.state.writers = self._writers
        self.state.page_count = pages
        self.engines = 0
        self.dirty = DirtyBitmap(self.state, module, pages)
        """Pages written while live migration logs them (:mod:`pyemu.accel.tcg.dirty_log`)."""
        self.write_screen = WriteScreen(native_function(module, "pyemu_dma_first_report"),
                                        int(ffi.cast("uintptr_t", self.state)))
        """Device DMA's :class:`~pyemu.hw.core.dma.WriteScreen` over this map: ranges from the first that
        touches code on, or all of them while the dirty log runs (``pyemu_dma_first_report``)."""

    def add_engine(self) -> int:
        """Register one more engine; returns its index (its bit in the map)."""
        if self.engines >= self.MAX_ENGINES:
            raise EngineError(f"the software CPU shares translated-code tracking between at most "
                              f"{self.MAX_ENGINES} engines (vCPUs)", operation="code_map")
        index = self.engines
        self.engines += 1
        self.state.engines = self.engines
        return index

    def take_flush_request(self, engine: int) -> bool:
        """True (once) if ``engine`` must flush its TLB before it runs: a page it was granted WRITE on
        became code in another engine. The caller flushes, and this forgets the engine's write grants."""
        if not self.state.flush_needed[engine]:
            return False
        self.state.flush_needed[engine] = 0
        self._lib.pyemu_code_forget_writes(self.state, engine)
        return True

    def request_tlb_flush_all(self) -> None:
        """Every engine flushes its TLB before it runs again (a dirty-log sync; the caller holds the
        scheduler's turn, so none is running)."""
        for engine in range(self.engines):
            self.state.flush_needed[engine] = 1

    @property
    def flush_requests(self) -> int:
        return int(self.state.flush_requests)

    def take_invalidations(self, engine: int) -> list[int] | None:
        """The physical pages other engines stored to since ``engine`` last asked, whose translations it
        must drop; ``None`` when there were too many to queue (drop all translations)."""
        state = self.state
        count = int(state.inval_count[engine])
        overflow = bool(state.inval_overflow[engine])
        if not count and not overflow:
            return []
        pages = [int(state.inval_pages[engine][i]) for i in range(count)]
        state.inval_count[engine] = 0
        state.inval_overflow[engine] = 0
        return None if overflow else pages

    def forget(self, engine: int) -> None:
        """``engine`` dropped every translation and its TLB: it owns no page and may write none."""
        self._lib.pyemu_code_forget(self.state, engine)
        self._lib.pyemu_code_forget_writes(self.state, engine)

    def has_code(self, gpa: int, size: int) -> bool:
        """Whether any engine may hold translated code from a page of ``[gpa, gpa+size)`` (``size`` > 0)."""
        first, last = gpa >> 12, (gpa + size - 1) >> 12
        if first == last:
            return first < self._page_count and self._owner_bytes[first] != 0
        return any(self._owner_bytes[first:last + 1])

    def ranges_with_code(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The ranges of ``ranges`` that some engine may hold translated code from (empty ones never).

        One block request writes up to 256 scattered pages and almost never code, so C looks for the first
        range that touches code (``pyemu_code_first_hit``, a third of the time of a :meth:`has_code` call
        per range) and only the ranges from there on are looked at one by one."""
        if len(ranges) <= FEW_RANGES:  # a 4 KiB read: the C call's packing would cost more than the test
            has_code = self.has_code
            return [(gpa, size) for gpa, size in ranges if size > 0 and has_code(gpa, size)]
        try:
            packed = struct.pack(f"<{2 * len(ranges)}Q", *chain.from_iterable(ranges))
        except struct.error:  # not 64-bit values: the per-range path decides
            first = 0
        else:
            pairs = self._ffi.from_buffer("uint64_t[]", packed)
            first = int(self._lib.pyemu_code_first_hit(self.state, pairs, len(ranges)))
            if first < 0:
                return []
        has_code = self.has_code
        return [(gpa, size) for gpa, size in ranges[first:] if size > 0 and has_code(gpa, size)]

    def owners(self, gpa: int) -> int:
        """The owner bits of the page holding ``gpa`` (tests, diagnostics)."""
        index = gpa >> 12
        return int(self._owners[index]) if index < int(self.state.page_count) else 0


class TlbFill:
    """The TLB-fill hook of one engine; also wires it into the block gate (which switches back to it)."""

    def __init__(self, uc: Uc, memory: GuestMemory, gate: BlockGate, code_map: CodeMap | None = None) -> None:
        module = gate.module
        ffi: Any = module.ffi
        self._ffi = ffi
        self._uc = uc
        regions = list(memory.regions)
        if len(regions) > _RAM_SLOTS:
            raise EngineError(f"{len(regions)} RAM regions; the TLB-fill hook handles {_RAM_SLOTS}",
                              operation="hook_add")
        library = gate.library
        state: Any = ffi.new("struct pyemu_tlb *")
        state.ctl = ffi.cast("int (*)(void *, uint32_t, ...)", _uc_function(library, "uc_ctl"))
        state.vmem_translate = ffi.cast("int (*)(void *, uint64_t, int, uint64_t *)",
                                        _uc_function(library, "uc_vmem_translate"))
        state.reg_read = ffi.cast("int (*)(void *, int, void *)", _uc_function(library, "uc_reg_read"))
        state.ctl_tlb_type = uc_const.UC_CTL_TLB_TYPE | _CTL_WRITE_1
        state.ctl_tlb_flush = uc_const.UC_CTL_TLB_FLUSH | _CTL_WRITE_0
        state.reg_cr0 = x86.UC_X86_REG_CR0
        state.reg_cr3 = x86.UC_X86_REG_CR3
        state.reg_cr4 = x86.UC_X86_REG_CR4
        state.reg_msr = x86.UC_X86_REG_MSR
        state.reg_cs = x86.UC_X86_REG_CS
        state.reg_rflags = x86.UC_X86_REG_RFLAGS
        self.code_map = code_map if code_map is not None else CodeMap(memory, module)
        self.engine = self.code_map.add_engine()
        state.engine = self.engine
        state.code = self.code_map.state
        for slot, region in enumerate(regions):
            state.ram[slot].gpa = region.gpa
            state.ram[slot].size = region.size
            state.ram[slot].host = ffi.cast("uint8_t *", memory.host_address(region))
        state.ram_count = len(regions)
        state.own_walk = int(has_fill_page_sizes(library))
        self.state = state
        self._library = library
        self._handle = ctypes.c_size_t()
        status = library.uc_hook_add(uc._uch, ctypes.byref(self._handle), UC_HOOK_TLB_FILL,
                                     ctypes.c_void_p(native_function(module, "pyemu_tlb_fill")),
                                     ctypes.c_void_p(int(ffi.cast("uintptr_t", state))),
                                     ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != 0:
            raise EngineError(f"uc_hook_add(UC_HOOK_TLB_FILL) failed with error {status}", operation="hook_add")
        uc.ctl_exits_enabled(True)
        self.use_hook()
        gate.state.tlb = state
        state.attention = ffi.addressof(gate.state, "attention")

    def read_registers_in_place(self, env: int, layout: BlobLayout) -> None:
        """Let the walk read CR0, CR3, CR4, EFER, the CS selector and RFLAGS straight from this engine's
        ``env`` (its address from :func:`pyemu.accel.tcg.io_guard.locate_cpu`, offsets calibrated) instead
        of six ``uc_reg_read`` calls per fill."""
        header = layout.gpr["rax"]  # the blob's header: env starts at the first general register
        state = self.state
        state.env_cr0 = layout.cr0 - header
        state.env_cr3 = layout.cr3 - header
        state.env_cr4 = layout.cr4 - header
        state.env_efer = layout.efer - header
        state.env_cs = layout.segments["cs"] + layout.seg.selector - header
        state.env_rflags = layout.rflags - header
        state.env = self._ffi.cast("const uint8_t *", env)

    @property
    def reads_registers_in_place(self) -> bool:
        """Whether the walk reads no lazily kept state (so the engine may skip restoring it before a fill:
        :data:`pyemu.accel.tcg.engine_delivery.FILL_WITHOUT_STATE_RESTORE`)."""
        return self.state.env != self._ffi.NULL

    def watch_pkru(self, pkru_address: int) -> None:
        """Where this engine's ``env->pkru`` lives (``env`` from :func:`pyemu.accel.tcg.io_guard.locate_cpu`
        plus the calibrated offset): the walk then applies protection keys instead of leaving every fill
        under CR4.PKE to Unicorn."""
        self.state.pkru = self._ffi.cast("const uint32_t *", pkru_address)

    def use_hook(self) -> None:
        """Fill the TLB through the hook from now on (start-up, state load)."""
        self.state.fallback = 0
        self.state.fill_failed = 0
        self._uc.ctl(uc_const.UC_CTL_TLB_TYPE, uc_const.UC_CTL_IO_WRITE, uc_const.UC_TLB_VIRTUAL)

    def forget_code(self) -> None:
        """Only after the engine dropped every translation and its TLB: it holds code from no page."""
        self.code_map.forget(self.engine)

    def take_fill_failure(self) -> bool:
        """True once after a fill reported a miss (the run ended with UC_ERR_EXCEPTION because of it)."""
        if self.state.fill_failed:
            self.state.fill_failed = 0
            return True
        return False

    @property
    def statistics(self) -> dict[str, int]:
        return {"fills": int(self.state.fills), "fallbacks": int(self.state.fallbacks),
                "code_pages": int(self.state.code_marks),
                "invalidations_sent": int(self.state.invalidations_sent)}

    def close(self) -> None:
        if self._handle.value:
            self._library.uc_hook_del(self._uc._uch, self._handle)
            self._handle = ctypes.c_size_t()
