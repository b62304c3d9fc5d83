"""The block-start gate: precise, cheap stops of a running engine, written in C and built with cffi.

Why: stopping Unicorn 2.1.4 from another thread (``uc_emu_stop`` or ``emu_start(timeout=...)``) leaves RIP
at the start of a translation block some of whose instructions already ran, so resuming re-executes them
(DESIGN.md; unicorn issues #1105/#1565). A ``UC_HOOK_BLOCK`` callback runs before the first instruction
of every block; calling ``uc_emu_stop`` from there stops with RIP exactly at that block start. In Python
such a hook costs ~1 µs per block; in C it costs a few ns, measured here at ~7% of a tight loop's speed
(dec/jnz loop: 348 M instr/s without the hook, 325 M instr/s with it).

What it decides (``block_gate.c``): stop when the host requested a stop or needs the vCPU thread to do
engine work (code invalidation after DMA); stop when an interrupt may be
pending and RFLAGS.IF=1 (the interrupt window: an interrupt raised while the guest runs with IF=0 is taken
at the first block after IF becomes 1, e.g. right after ``sti``, ``popf`` or ``iretq``, all of which end a
block). The first block after each ``emu_start`` is exempt from the window check, so resuming inside an
interrupt shadow (the one instruction after ``sti``/``mov ss``, which QEMU translates as a block of its
own) executes it before the next check. With several vCPUs it also ends the vCPU's turn when the
scheduler says another vCPU waits (``contended``) and the guest spins: a block start that keeps coming
back within a few blocks, in a loop one of whose blocks ends with PAUSE (Linux's ``cpu_relax()``; PAUSE
ends a block in QEMU's translator), since such a loop waits for something only another vCPU can do.

With pyemu's libunicorn (:mod:`pyemu.accel.tcg.engine_patches`), the translated code calls the gate only
when its ``attention`` word is set (every flag setter below sets it, and so does the engine's CR4 write
helper; the gate clears it and sets it again while a flag still needs it); a PVH boot went from 3.52 s to
3.15 s. ``last_block`` is then kept current only on request (:func:`track_block_starts`). With PyPI's
library the gate runs at every block start (``conditional``).

Build: cffi API mode compiles ``block_gate.c`` once into pyemu's cache, ``~/.cache/pyemu`` (see
:func:`pyemu.system.cache.cache_root`; a
module name carrying the source hash, so an edit rebuilds). The hook receives libunicorn's ``uc_reg_read``
and ``uc_emu_stop`` as function pointers taken from the library the Python binding loaded, so no link-time
dependency on libunicorn exists and exactly one copy of it is in the process.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from unicorn import UC_HOOK_BLOCK, Uc
from unicorn import x86_const as x86

from pyemu.accel.tcg.errors import BlockHookBuildError, EngineError
from pyemu.system.native import NativeBuildError, load_native

# One compiled module holds the engine callbacks: the TLB-fill hook (tlb_fill.c, first: the gate reads
# its state), the block gate, the I/O permission guard (io_guard.c, see io_guard.py) and the device
# windows' write callback (mmio_notify.c, see mmio_notify.py).
_SOURCES = (Path(__file__).with_name("tlb_fill.c"), Path(__file__).with_name("block_gate.c"),
            Path(__file__).with_name("io_guard.c"), Path(__file__).with_name("mmio_notify.c"))
_CDEF = """
struct pyemu_tlb_entry { uint64_t paddr; int perms; };
struct pyemu_ram_slot { uint64_t gpa; uint64_t size; uint8_t *host; };
struct pyemu_code_map {
    uint8_t *owners;
    uint8_t *writers;
    uint64_t page_count;
    uint64_t flush_requests;
    uint32_t engines;
    int32_t flush_needed[8];
    uint32_t inval_count[8];
    int32_t inval_overflow[8];
    uint64_t inval_pages[8][512];
    uint8_t *dirty;
    int32_t logging;
    uint64_t dirty_marks;
    uint64_t log_fallbacks;
};
struct pyemu_tlb {
    int (*ctl)(void *uc, uint32_t control, ...);
    int (*vmem_translate)(void *uc, uint64_t address, int prot, uint64_t *paddr);
    int (*reg_read)(void *uc, int regid, void *value);
    uint32_t ctl_tlb_type;
    uint32_t ctl_tlb_flush;
    int32_t fallback;
    int32_t fill_failed;
    int32_t reg_cr0, reg_cr3, reg_cr4, reg_msr, reg_cs, reg_rflags;
    int32_t engine;
    uint64_t fills, fallbacks, code_marks, invalidations_sent;
    struct pyemu_code_map *code;
    uint32_t ram_count;
    struct pyemu_ram_slot ram[8];
    const uint32_t *pkru;
    int32_t *attention;
    int32_t own_walk;
    const uint8_t *env;
    int32_t env_cr0, env_cr3, env_cr4, env_efer, env_cs, env_rflags;
};
_Bool pyemu_tlb_fill(void *uc, uint64_t vaddr, int type, struct pyemu_tlb_entry *result, void *user_data);
void pyemu_tlb_resume(void *uc, struct pyemu_tlb *s);
void pyemu_code_forget(struct pyemu_code_map *m, int engine);
int64_t pyemu_code_first_hit(const struct pyemu_code_map *m, const uint64_t *pairs, uint64_t count);
int64_t pyemu_dma_first_report(const void *map, const uint64_t *pairs, uint64_t count);
void pyemu_code_forget_writes(struct pyemu_code_map *m, int engine);
void pyemu_dirty_mark(struct pyemu_code_map *m, uint64_t first, uint64_t last);
uint64_t pyemu_dirty_take(struct pyemu_code_map *m, uint64_t *out);
int pyemu_read_code(void *uc, struct pyemu_tlb *s, uint64_t address, uint8_t *out, int len);
struct pyemu_gate {
    int32_t stop_request;
    int32_t irq_pending;
    int32_t skip_first;
    int32_t stopped;
    int32_t rflags_regid;
    int32_t service_request;
    uint64_t stops;
    int (*reg_read)(void *uc, int regid, void *value);
    int (*emu_stop)(void *uc);
    struct pyemu_tlb *tlb;
    int32_t contended;
    int32_t yielded;
    uint64_t yields;
    uint64_t spin_anchor;
    uint32_t spin_hits;
    uint32_t spin_gap;
    uint32_t verify_left;
    uint64_t not_pause;
    uint64_t last_block;
    const uint32_t *hflags2;
    int32_t nmi_held;
    const uint64_t *cr4;
    uint64_t cr4_seen;
    uint64_t cr4_refused;
    int32_t cr4_fault;
    uint64_t cr4_old;
    uint64_t fault_block;
    int32_t attention;
    int (*raise_irq)(void *uc);
    int32_t engine_irq;
    uint64_t irq_raised;
    uint64_t raised_at;
    uint32_t spin_burst;
    uint64_t halt_budget_ns;
    int32_t in_halt_poll;
    int32_t halt_polled;
    uint64_t halt_started_ns;
    uint64_t halt_wakes;
};
void pyemu_block_gate(void *uc, uint64_t address, uint32_t size, void *user_data);
void pyemu_gate_pause(void *uc, void *opaque);
int pyemu_gate_halt(void *uc, void *opaque);
int pyemu_gate_poll(struct pyemu_gate *gate, uint64_t budget_ns);
struct pyemu_gate_ack {
    struct pyemu_gate *gate;
    int (*controller_ack)(void *controller, int32_t *irq_pending);
    void *controller;
    int (*fallback)(void *opaque);
    uint64_t acks;
};
int pyemu_gate_acknowledge(void *opaque);
struct pyemu_port_fast {
    uint32_t count;
    uint32_t port[8];
    int32_t read_value[8];
    int32_t posted[8];
    uint64_t read_hits;
    uint64_t posted_writes;
};
struct pyemu_io_guard {
    uint8_t *env;
    void *cpu;
    int32_t off_hflags;
    int32_t off_eflags;
    int32_t off_tr_base;
    int32_t off_tr_limit;
    int32_t off_tr_flags;
    int32_t enabled;
    uint32_t (*py_in)(void *uc, uint32_t port, int size, void *key);
    void (*py_out)(void *uc, uint32_t port, int size, uint32_t value, void *key);
    _Bool (*restore_state)(void *cpu, uintptr_t host_pc, _Bool will_exit);
    void (*raise_err_ra)(void *env, int intno, int error_code, uintptr_t retaddr);
    uint32_t (*lduw_mmuidx_ra)(void *env, uint64_t addr, int mmu_idx, uintptr_t retaddr);
    uint64_t checks;
    uint64_t faults;
    uint64_t unrestored;
    uint64_t code_lo, code_hi;
    uint64_t helpers[6];
    struct pyemu_port_fast *fast;
    void (*py_flush)(void *uc, uint32_t count, void *key);
    uint32_t reads_since_post;
    uint32_t ring_used;
    uint32_t ring[512];
};
uint32_t pyemu_io_in(void *uc, uint32_t port, int size, void *user_data);
void pyemu_io_out(void *uc, uint32_t port, int size, uint32_t value, void *user_data);
struct pyemu_mmio_notify {
    uint32_t count;
    uint64_t addr[64];
    uint32_t value[64];
    int32_t fd[64];
    uint64_t hits;
    uint32_t status_count;
    uint64_t status_addr[64];
    uint32_t *status_word[64];
    uint64_t status_hits;
};
struct pyemu_mmio_eoi {
    uint64_t addr;
    int (*eoi)(void *core);
    void *core;
    int32_t *irq_pending;
    int32_t *attention;
    uint64_t hits;
};
struct pyemu_mmio_window {
    uint64_t base;
    struct pyemu_mmio_notify *notify;
    void (*py_write)(void *uc, uint64_t offset, unsigned size, uint64_t value, void *key);
    uint64_t (*py_read)(void *uc, uint64_t offset, unsigned size, void *key);
    struct pyemu_mmio_eoi *eoi;
};
void pyemu_mmio_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data);
uint64_t pyemu_mmio_read(void *uc, uint64_t offset, unsigned size, void *user_data);
"""
def load_gate_module() -> ModuleType:
    """Build (first use) and import the compiled gate; later calls return the loaded module."""
    try:
        return load_native("block_gate", _SOURCES, _CDEF, what="the C block gate")
    except NativeBuildError as exc:
        raise BlockHookBuildError(str(exc), build_dir=exc.build_dir) from exc


def native_function(module: ModuleType, name: str) -> int:
    """The address of the C function itself. ``ffi.addressof(lib, name)`` gives cffi's direct-call
    wrapper, which adds a call and a PLT jump per invocation (measured: ~5% of a Linux boot's CPU time
    was spent in the block gate's wrapper and PLT stub, against ~2% in the gate itself)."""
    library = ctypes.CDLL(str(module.__file__))  # the already-loaded extension: same handle
    return int(ctypes.cast(getattr(library, name), ctypes.c_void_p).value or 0)


def _uc_library() -> ctypes.CDLL:
    """The libunicorn instance the Python binding uses."""
    try:
        from unicorn.unicorn_py3.unicorn import uclib  # type: ignore[attr-defined]

        return uclib
    except ImportError:  # older binding layout
        import unicorn

        path = Path(unicorn.__file__).parent / "lib" / "libunicorn.so.2"
        return ctypes.CDLL(str(path))


_NO_BLOCK = (1 << 64) - 1
SPIN_BURST = 2048
"""Block starts the spin detector looks at per "contended" from the scheduler: a PAUSE loop of up to 16
blocks shows itself within 48 rounds (``SPIN_GAP``, ``SPIN_HITS`` in ``block_gate.c``), a short one within
the first hundred blocks; at the tens of millions of blocks per second a booting kernel runs, 2048 are some
tens of microseconds. (A dozen-block loop needs about 600.)"""


GATE_CR4_NOTIFY = 1
"""``uc_pyemu_gate_options``: the CR4 write helper asks for the gate (engine patch ``cr4-write-notifies-gate``);
translated blocks carry no CR4 watch."""
GATE_TRACK_BLOCKS = 2
"""``uc_pyemu_gate_options``: every translated block stores its start in ``last_block``."""

_track_block_starts = False


def track_block_starts(on: bool = True) -> bool:
    """For sampling profilers and tests that watch where the guest runs: engines made from now on keep
    :attr:`BlockGate.last_block` current at every block start. Off by default with pyemu's libunicorn,
    where that store was a per-block cost of every guest (PyPI's library calls the gate at every block,
    which keeps it current anyway). Returns the previous setting."""
    global _track_block_starts
    previous, _track_block_starts = _track_block_starts, on
    return previous


def engine_takes_interrupts() -> bool:
    """``PYEMU_TCG_ENGINE_IRQ=0`` keeps external interrupts in Python even on pyemu's libunicorn (for A/B
    measurements and bisecting), as ``-d int`` does without its log."""
    return os.environ.get("PYEMU_TCG_ENGINE_IRQ", "") not in ("0", "no", "false")


class BlockGate:
    """The gate of one engine: flags set by host threads, read by the C hook at every block start."""

    def __init__(self, uc: Uc) -> None:
        module = load_gate_module()
        self._ffi: Any = module.ffi
        self._lib: Any = module.lib
        self._uc = uc
        self.state: Any = self._ffi.new("struct pyemu_gate *")
        self._wake_flags: tuple[int, int] | None = None
        library = _uc_library()
        self.state.reg_read = self._ffi.cast("int (*)(void *, int, void *)", ctypes.cast(library.uc_reg_read, ctypes.c_void_p).value)
        self.state.emu_stop = self._ffi.cast("int (*)(void *)", ctypes.cast(library.uc_emu_stop, ctypes.c_void_p).value)
        self.state.rflags_regid = x86.UC_X86_REG_RFLAGS
        self.state.cr4 = self._ffi.addressof(self.state, "cr4_seen")  # never differs: no CR4 check yet
        self._library = library
        self._raise_before_run: Any = None  # uc_pyemu_raise_interrupt, once take_interrupts_in_engine found it
        self._native_ack: Any = None  # the C INTA's struct (take_interrupts_in_engine with ``native``)
        self._handle = ctypes.c_size_t()
        self.module = module
        callback = native_function(module, "pyemu_block_gate")
        user_data = int(self._ffi.cast("uintptr_t", self.state))
        status = library.uc_hook_add(uc._uch, ctypes.byref(self._handle), UC_HOOK_BLOCK,
                                     ctypes.c_void_p(callback), ctypes.c_void_p(user_data),
                                     ctypes.c_uint64(1), ctypes.c_uint64(0))
        if status != 0:
            raise EngineError(f"uc_hook_add(UC_HOOK_BLOCK) failed with error {status}", operation="hook_add")
        self.conditional = self._make_conditional(library, uc)
        self.pause_yields = self._yield_at_pause(library, uc, module, user_data)
        self.halts_in_engine = self._poll_at_halt(library, uc, module, user_data)
        """Whether a HLT with IF=1 can spin inside the run (:meth:`poll_halts_in_engine`)."""

    @staticmethod
    def _yield_at_pause(library: ctypes.CDLL, uc: Uc, module: ModuleType, user_data: int) -> bool:
        """With pyemu's libunicorn, every PAUSE the guest executes while the turn is contended ends the run
        (``pyemu_gate_pause`` in ``block_gate.c``); PyPI's library has only the spin detector. Returns which."""
        register = getattr(library, "uc_pyemu_on_pause", None)
        if register is None:
            return False
        status = register(uc._uch, ctypes.c_void_p(native_function(module, "pyemu_gate_pause")),
                          ctypes.c_void_p(user_data))
        if status != 0:
            raise EngineError(f"uc_pyemu_on_pause failed with error {status}", operation="hook_add")
        return True

    @staticmethod
    def _poll_at_halt(library: ctypes.CDLL, uc: Uc, module: ModuleType, user_data: int) -> bool:
        """With pyemu's libunicorn, every HLT with IF=1 calls ``pyemu_gate_halt`` (``block_gate.c``), which
        spins for :meth:`poll_halts_in_engine`'s budget. PyPI's library halts as Unicorn does. Returns which."""
        register = getattr(library, "uc_pyemu_on_halt", None)
        if register is None:
            return False
        status = register(uc._uch, ctypes.c_void_p(native_function(module, "pyemu_gate_halt")),
                          ctypes.c_void_p(user_data))
        if status != 0:
            raise EngineError(f"uc_pyemu_on_halt failed with error {status}", operation="hook_add")
        return True

    def _make_conditional(self, library: ctypes.CDLL, uc: Uc) -> bool:
        """With pyemu's libunicorn, have the translated code call the gate only when it has something to
        do (``attention`` set, or CR4 changed) and store ``last_block`` itself: the call at every block
        start was the largest single cost of a Linux boot after Unicorn's own checks were gone. With PyPI's
        library (no ``uc_pyemu_block_gate``) the gate runs at every block, as before. Returns which."""
        register = getattr(library, "uc_pyemu_block_gate", None)
        if register is None:
            return False
        state, ffi = self.state, self._ffi

        def address(field: str) -> ctypes.c_void_p:
            return ctypes.c_void_p(int(ffi.cast("uintptr_t", ffi.addressof(state, field))))

        status = register(uc._uch, address("attention"), address("cr4"), address("cr4_seen"), address("last_block"))
        if status != 0:
            raise EngineError(f"uc_pyemu_block_gate failed with error {status}", operation="hook_add")
        options = GATE_CR4_NOTIFY | (GATE_TRACK_BLOCKS if _track_block_starts else 0)
        status = library.uc_pyemu_gate_options(uc._uch, ctypes.c_int32(options))
        if status != 0:
            raise EngineError(f"uc_pyemu_gate_options failed with error {status}", operation="hook_add")
        return True  # attention is first set by arm(), before every emu_start

    def take_interrupts_in_engine(self, acknowledge: Callable[[], int],
                                  native: tuple[int, int] | None = None) -> bool:
        """With pyemu's libunicorn: when an interrupt is pending and IF=1, the gate raises it in the engine
        instead of stopping the run, and QEMU's own hardirq path delivers it at the next block boundary
        that accepts one (no interrupt shadow), calling ``acknowledge`` (on this engine's thread, inside
        the run) for the vector, or -1 for none. Before, each interrupt cost a stop of the run, the return
        of ``emu_start``, the IDT walk and frame push in Python and a new ``emu_start`` (~40 µs).

        ``native``: the controller's INTA in C, ``(address of int (*)(void *controller, int32_t
        *irq_pending), controller address)`` (a local APIC's :attr:`engine_acknowledge`); the engine then
        asks it without Python or the GIL, and ``acknowledge`` only when it answers -2 (see
        ``pyemu_gate_acknowledge``). :attr:`native_acknowledges` counts its vectors.

        Returns False (nothing changes) on PyPI's library. :meth:`engine_interrupts` switches it on."""
        register = getattr(self._library, "uc_pyemu_interrupt_controller", None)
        raise_irq = getattr(self._library, "uc_pyemu_raise_interrupt", None)
        if register is None or raise_irq is None:
            return False
        ffi = self._ffi
        self._acknowledge = ffi.callback("int(void *)", lambda _opaque: acknowledge(), error=-1)
        callback, opaque = int(ffi.cast("uintptr_t", self._acknowledge)), None
        if native is not None:
            self._native_ack = ack = ffi.new("struct pyemu_gate_ack *")
            ack.gate = self.state
            ack.controller_ack = ffi.cast("int (*)(void *, int32_t *)", native[0])
            ack.controller = ffi.cast("void *", native[1])
            ack.fallback = self._acknowledge
            callback = native_function(self.module, "pyemu_gate_acknowledge")
            opaque = ctypes.c_void_p(int(ffi.cast("uintptr_t", ack)))
        status = register(self._uc._uch, ctypes.c_void_p(callback), opaque)
        if status != 0:
            raise EngineError(f"uc_pyemu_interrupt_controller failed with error {status}", operation="hook_add")
        self.state.raise_irq = self._ffi.cast("int (*)(void *)", ctypes.cast(raise_irq, ctypes.c_void_p).value)
        self._raise_before_run = raise_irq
        return True

    def raise_interrupt_before_run(self) -> None:
        """Between runs (the vCPU's thread; IF=1 and no interrupt shadow, which the caller checked): QEMU's
        hardirq path takes the pending interrupt at the start of the next run, before its first block, as
        the gate does within a run. A vCPU woken from HLT thus needs no delivery in Python."""
        status = self._raise_before_run(self._uc._uch)
        if status != 0:
            raise EngineError(f"uc_pyemu_raise_interrupt failed with error {status}", operation="emu_start")
        self.state.irq_raised += 1

    def interrupt_taken(self) -> None:
        """The engine asked for the vector of a raised interrupt (its thread, inside the run)."""
        self.state.raised_at = _NO_BLOCK

    def engine_interrupts(self, on: bool) -> None:
        """Raise pending interrupts in the engine (True, after :meth:`take_interrupts_in_engine`) or stop
        the run for the vCPU to deliver them (False: ``-d int`` logs deliveries from Python)."""
        self.state.engine_irq = 1 if on else 0

    @property
    def interrupts_raised(self) -> int:
        """Interrupts raised in the engine so far (statistics)."""
        return int(self.state.irq_raised)

    @property
    def native_acknowledges(self) -> int:
        """Vectors the interrupt controller gave the engine in C (statistics; 0 without a native one)."""
        return 0 if self._native_ack is None else int(self._native_ack.acks)

    def _attention(self) -> None:
        """After setting a flag: make the translated code call the gate at the next block start."""
        self.state.attention = 1

    @property
    def library(self) -> ctypes.CDLL:
        """The libunicorn the engine lives in (other native hooks of the same engine take their
        function pointers from it)."""
        return self._library

    # Host side (any thread) ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        self.state.stop_request = 1
        self._attention()

    def clear_stop(self) -> None:
        self.state.stop_request = 0

    @property
    def stop_requested(self) -> bool:
        return bool(self.state.stop_request)

    def request_service(self) -> None:
        """The vCPU thread must do engine work (it alone may touch the engine): stop at the next block."""
        self.state.service_request = 1
        self._attention()

    def clear_service(self) -> None:
        self.state.service_request = 0

    @property
    def service_requested(self) -> bool:
        return bool(self.state.service_request)

    def signal_interrupt(self) -> None:
        self.state.irq_pending = 1
        self._attention()

    def clear_interrupt(self) -> None:
        self.state.irq_pending = 0

    @property
    def interrupt_signalled(self) -> bool:
        return bool(self.state.irq_pending)

    def set_contended(self, contended: bool) -> None:
        """The scheduler: another vCPU waits for this one's turn, so a PAUSE spin should give it up. Each
        call with True gives the spin detector a new burst of :data:`SPIN_BURST` block starts
        (``block_gate.c`` says why in bursts)."""
        self.state.contended = 1 if contended else 0
        if contended:
            self.state.spin_burst = SPIN_BURST
            self._attention()

    # vCPU side ---------------------------------------------------------------------------------------
    def watch_nmi_mask(self, hflags2_address: int) -> None:
        """Where this engine's ``env->hflags2`` lives (see :mod:`pyemu.accel.tcg.io_guard`)."""
        self.state.hflags2 = self._ffi.cast("const uint32_t *", hflags2_address)

    def watch_cr4(self, cr4_address: int, refused: int) -> None:
        """Where this engine's ``env->cr[4]`` lives, and the CR4 bits a MOV to CR4 may not set (reserved
        under the vCPU's CPUID): a block start that sees one newly set stops with :attr:`cr4_fault`."""
        self.state.cr4_refused = refused & 0xFFFF_FFFF_FFFF_FFFF
        self.state.cr4 = self._ffi.cast("const uint64_t *", cr4_address)
        self.state.cr4_seen = self.state.cr4[0]

    def expect_cr4(self, value: int) -> None:
        """The host set CR4 itself (state load, a refused MOV undone): no guest write to check."""
        self.state.cr4_seen = value

    def take_cr4_fault(self) -> tuple[int, int, int] | None:
        """(CR4 before the refused MOV, start of the block that ended with it, start of the block after
        it) once after the gate stopped for a refused CR4 bit; None otherwise."""
        state = self.state
        if not state.cr4_fault:
            return None
        state.cr4_fault = 0
        return int(state.cr4_old), int(state.fault_block), int(state.last_block)

    def hold_nmi(self, held: bool) -> None:
        """An NMI waits while NMIs are blocked: stop at the first block start after the IRET that ends it."""
        self.state.nmi_held = 1 if held else 0
        if held:
            self._attention()

    def arm(self) -> None:
        """Before each emu_start: exempt the resume block, forget the previous stop."""
        self.state.raised_at = _NO_BLOCK
        self.state.skip_first = 1
        self.state.stopped = 0
        self.state.yielded = 0
        self._attention()

    def poll_halts_in_engine(self, budget_ns: int) -> None:
        """Before a run: a HLT with IF=1 spins up to ``budget_ns`` inside the run, and an interrupt that
        arrives meanwhile is taken there (0: every HLT ends the run). Why: woken from HLT between runs, the
        vCPU's Python from the end of the spin to the next ``emu_start`` -- the loop, the turn, the
        interrupt's acknowledgement, the engine's state read and written back -- took ~40 µs per
        interrupt (stamped on 2026-12-07 with virtio-blk 1 MiB reads, ~350 µs a request outside the host
        read); inside the run only the acknowledgement is Python's. Only when :attr:`halts_in_engine`."""
        self.state.halt_budget_ns = budget_ns if self.halts_in_engine else 0
        self.state.halt_polled = 0

    def take_halt_poll(self) -> int | None:
        """After a run: when it ended in a HLT that spun inside the run for nothing (its budget ran out, or
        the vCPU thread has something to do), when that spin began (``time.monotonic_ns``); else None."""
        state = self.state
        if not state.halt_polled:
            return None
        state.halt_polled = 0
        return int(state.halt_started_ns)

    @property
    def polling_in_engine(self) -> bool:
        """Spinning at a HLT inside the run right now (any thread; see :meth:`poll_halts_in_engine`)."""
        return bool(self.state.in_halt_poll)

    @property
    def halt_wakes(self) -> int:
        """HLTs an interrupt ended inside the run (statistics)."""
        return int(self.state.halt_wakes)

    # Halted (vCPU side, the engine not running) -------------------------------------------------------
    def begin_wait(self) -> None:
        """Before a halted vCPU looks for work: forget ``attention`` so that :meth:`poll` sees only flags
        set from now on. Safe because the engine is not running; :meth:`arm` sets it again before the
        next run."""
        self.state.attention = 0

    @property
    def attention_raised(self) -> bool:
        """Some thread set a flag since :meth:`begin_wait` (a halted vCPU's last look before it sleeps)."""
        return bool(self.state.attention)

    def poll(self, budget_ns: int) -> bool:
        """Spin up to ``budget_ns`` (GIL released) until some thread sets a flag: True if one did. A halted
        vCPU's alternative to sleeping on its wake-up event (see :mod:`pyemu.accel.tcg.halt_poll`)."""
        return bool(self._lib.pyemu_gate_poll(self.state, budget_ns))

    @property
    def wake_flags(self) -> tuple[int, int]:
        """Addresses of the two flags :meth:`signal_interrupt` sets (interrupt pending, then attention), for
        a thread that sets them later in C (:func:`pyemu.system.wake_publish.publish_on_sleep`)."""
        flags = self._wake_flags
        if flags is None:
            ffi, state = self._ffi, self.state
            flags = self._wake_flags = (int(ffi.cast("intptr_t", ffi.addressof(state, "irq_pending"))),
                                        int(ffi.cast("intptr_t", ffi.addressof(state, "attention"))))
        return flags

    @property
    def halt_poll_flag(self) -> int:
        """Address of the 32-bit word that is 1 while the vCPU spins at a HLT inside its run
        (:attr:`polling_in_engine`), for a C kicker (:func:`pyemu.hw.intc.apic_core.NativeRoute.kick_function`)."""
        return int(self._ffi.cast("intptr_t", self._ffi.addressof(self.state, "in_halt_poll")))

    @property
    def yielded(self) -> bool:
        """True when the last emu_start ended because the guest spun in a PAUSE loop while contended."""
        return bool(self.state.yielded)

    @property
    def yields(self) -> int:
        return int(self.state.yields)

    @property
    def last_block(self) -> int:
        """The guest address of the block the engine entered last (any thread; for sampling). With pyemu's
        libunicorn only current while :func:`track_block_starts` was on when the engine was made; otherwise
        the last block start the gate itself looked at, or the last MOV to CR4."""
        return int(self.state.last_block)

    @property
    def stopped(self) -> bool:
        """True when the last emu_start ended because this gate stopped it."""
        return bool(self.state.stopped)

    @property
    def stops(self) -> int:
        return int(self.state.stops)

    def close(self) -> None:
        """Retire the gate with its engine: it keeps asking for a stop, so an engine started again stops at
        its first block, and its state lives as long as the engine object does (the hook stays installed).

        Why not ``uc_hook_del``: deleting a block hook invalidates every block translated under it, one
        region at a time -- 44 ms after a Linux boot, spent between the guest's power-off and the exit."""
        self.request_stop()
        self._uc._pyemu_gate_state = self.state  # type: ignore[attr-defined]
