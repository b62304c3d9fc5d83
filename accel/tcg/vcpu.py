"""One software vCPU: a Unicorn engine, its hooks, and the run loop that makes it behave like an x86-64 CPU.

Run loop (``run``), per iteration:

1. a recorded exit (triple fault) or a host stop request ends ``run``;
2. processor events from the local APIC (:class:`~pyemu.hw.intc.api.ProcessorSignals`) are taken: INIT
   puts the vCPU in its INIT state, waiting for a start-up IPI; a SIPI starts a waiting vCPU in real mode
   at vector x 0x1000 (an application processor starts this way; it is created waiting); an NMI is
   delivered through IDT vector 2 whatever RFLAGS.IF says, unless NMIs are blocked (from an NMI's delivery
   to the handler's IRET, QEMU's HF2_NMI_MASK): then it waits for the first block after that IRET;
3. a vCPU halted with IF=1 waits until the interrupt controller has something pending: first spinning in
   C for its adaptive halt-polling window (:mod:`pyemu.accel.tcg.halt_poll`; any gate flag ends it), then
   sleeping on an Event (set by ``kick``/``request_stop``); one halted with IF=0, or waiting for SIPI,
   waits for a processor event (an NMI, INIT or SIPI ends such a HLT). On pyemu's libunicorn the spin
   happens at the HLT itself, inside the run (:meth:`~pyemu.accel.tcg.block_gate.BlockGate.poll_halts_in_engine`):
   an interrupt that comes within the window is taken there and the run goes on; only a halt that outlasts
   it, or that something else ends, comes back here, to sleep;
4. the vCPU takes its turn (:mod:`pyemu.accel.tcg.scheduler`: one engine of the VM runs at a time) and
   first drops translations of pages other engines stored to (:class:`~pyemu.accel.tcg.tlb_fill.CodeMap`);
5. a pending external interrupt is injected through the IDT if RFLAGS.IF=1 and no interrupt shadow is
   active (QEMU's HF_INHIBIT_IRQ, set for the instruction after ``sti`` and ``mov ss``/``pop ss``);
6. ``old_exception`` is reset and the CR2 shadow written back (Unicorn leaves ``old_exception`` set after
   some faults and clears CR2 across ``emu_start``), the VM's TSC offset written (see
   :mod:`pyemu.accel.tcg.guest_tsc`), then the engine runs from RIP;
7. the engine returns because the C block gate stopped it (stop request, interrupt window, the end of the
   turn or a PAUSE spin while another vCPU waits; RIP exact at a block start), because a hook recorded an exit, or because of HLT (RIP after the ``hlt``). HLT with
   IF=0, or without an interrupt controller, returns ``Halt()`` and the next ``run`` waits (step 3); with
   IF=1 the vCPU waits at once and the interrupt is delivered with the return RIP after the ``hlt``. The
   turn ends with the iteration.

Why the interrupt signal is a flag and not a queue: the interrupt controller owns pending state
(:class:`~pyemu.hw.intc.api.InterruptController`); ``kick`` only says "look again". The loop clears the flag
before asking the controller and sets it again while something stays pending, so a kick racing with the
check is never lost.

Unicorn errors (an instruction fetch from a device window, an exception no hook claimed) and typed pyemu
errors raised by device models during the run become ``Shutdown(reason)`` with a register dump logged under
``-d guest_errors``; they never escape ``run()``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TB_FLUSH,
    UC_CTL_TLB_FLUSH,
    UC_ERR_FETCH_PROT,
    UC_ERR_EXCEPTION,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_UNMAPPED,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn.x86_const import UC_X86_REG_CR4, UC_X86_REG_RFLAGS

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.exits import Exit, Halt, Shutdown, Stopped
from pyemu.accel.tcg.block_gate import BlockGate, engine_takes_interrupts
from pyemu.accel.tcg.calibration import HF2_NMI, BlobLayout
from pyemu.accel.tcg.code_cache import CodeInvalidator
from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.cpu_model import engine_model
from pyemu.accel.tcg.cr4_guard import block_span, mov_to_cr4_before, refused_cr4_bits
from pyemu.accel.tcg.delivery import Event, EventKind
from pyemu.accel.tcg.errors import EngineError, GuestFault
from pyemu.accel.tcg.guest_tsc import GuestTsc
from pyemu.accel.tcg.halt_poll import MAX_POLL_NS
from pyemu.accel.tcg.io_hooks import IoHooks, vcpu_cpuid
from pyemu.accel.tcg.port_fast_paths import PortFastPaths
from pyemu.accel.tcg.memory_map import LocalEoi, PhysicalMap
from pyemu.accel.tcg.mmio_notify import MmioNotifiers
from pyemu.accel.tcg.engine_delivery import EngineDelivery
from pyemu.accel.tcg.engine_lifetime import free_when_collected_only
from pyemu.accel.tcg.msrs import MSR_IA32_MISC_ENABLE, RESET_MISC_ENABLE, set_arch_capabilities
from pyemu.accel.tcg.paging import PagingRegs
from pyemu.accel.tcg.physmem import GuestPhysical
from pyemu.accel.tcg.scheduler import RoundRobin
from pyemu.accel.tcg.segments import DESC_B, DESC_L, HF_INHIBIT_IRQ
from pyemu.accel.tcg.state_io import load_state, save_state
from pyemu.accel.tcg.tlb_fill import CodeMap, TlbFill, tlb_hook_enabled
from pyemu.accel.tcg.traps import Traps
from pyemu.accel.tcg.vcpu_placement import SharedCpu
from pyemu.errors import PyemuError
from pyemu.hw.intc.api import InterruptController
from pyemu.system import log
from pyemu.system.wake_publish import publish_on_sleep
from pyemu.system.memory import GuestMemory
from pyemu.system.poll_window import PollWindow
from pyemu.target.x86.cpu_state import (
    EFER_LMA,
    GPR_NAMES,
    RFLAGS_IF,
    MpState,
    PendingEvents,
    Segment,
    X86CpuState,
)
from pyemu.target.x86.cpuid import CpuidTable

# emu_start's "until" address: the last byte of the address space, never the start of a block.
_UNTIL = 0xFFFF_FFFF_FFFF_FFFF
_HLT = 0xF4
_NMI_VECTOR = 2
_HLT_SITES = 32  # HLT places remembered per vCPU (a Linux guest uses one or two)
_GP_VECTOR = 13


def startup_state(vector: int) -> X86CpuState:
    """Where a start-up IPI sends a waiting CPU: real mode, CS = vector << 8, IP = 0 (SDM 8.4.4.1)."""
    state = X86CpuState()
    state.cs = Segment(vector << 8, vector << 12, 0xFFFF, type=0xB)
    state.rip = 0
    return state


class TcgVcpu:
    """A vCPU of the software CPU (implements :class:`pyemu.accel.base.Vcpu`)."""

    def __init__(self, index: int, memory: GuestMemory, dispatcher: ExitDispatcher, cpuid: CpuidTable,
                 layout: BlobLayout, interrupts: InterruptController | None = None, *,
                 scheduler: RoundRobin | None = None, code_map: CodeMap | None = None,
                 tsc: GuestTsc | None = None, placement: SharedCpu | None = None,
                 mmio_notifiers: MmioNotifiers | None = None) -> None:
        self.index = index
        self._interrupts = interrupts
        # INIT / SIPI / NMI come from a local APIC model; a plain interrupt controller has none.
        self._signals: Any = interrupts if hasattr(interrupts, "take_init") else None
        self._lock = dispatcher.lock
        self._scheduler = scheduler if scheduler is not None else RoundRobin()
        self._placement = placement if placement is not None else SharedCpu()
        # The VM's guest TSC (shared by its vCPUs): its offset goes into the blob before every run.
        self.tsc = tsc if tsc is not None else GuestTsc()
        self._tsc_offset_at = layout.tsc_offset
        try:
            self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
            free_when_collected_only(self._uc)
            # Before anything initialises the engine: its model gates instructions and CR4 bits.
            self._uc.ctl_set_cpu_model(engine_model(cpuid))
        except UcError as exc:
            raise EngineError(f"cannot create a Unicorn x86-64 engine: {exc}", operation="uc_open") from exc
        self._gate = BlockGate(self._uc)
        eoi = getattr(interrupts, "engine_eoi", None)
        self._map = PhysicalMap(self._uc, memory, dispatcher, mmio_notifiers,
                                LocalEoi(self._gate.module.ffi, eoi, self._gate.wake_flags) if eoi is not None else None)
        self._tlb = TlbFill(self._uc, memory, self._gate, code_map) if tlb_hook_enabled() else None
        self._blob = CpuBlob(self._uc, layout)
        self._io = IoHooks(self._uc, dispatcher, vcpu_cpuid(cpuid, index), self._blob, self._gate)
        set_arch_capabilities(self._gate.library, self._uc._uch, cpuid.has("arch_capabilities"))
        self._uc.msr_write(MSR_IA32_MISC_ENABLE, RESET_MISC_ENABLE)
        self._gate.watch_nmi_mask(self._io.guard.env + layout.hflags2 - layout.gpr["rax"])
        if self._tlb is not None:
            self._tlb.watch_pkru(self._io.guard.env + layout.pkru - layout.gpr["rax"])
            self._tlb.read_registers_in_place(self._io.guard.env, layout)
        self._gate.watch_cr4(self._io.guard.env + layout.cr4 - layout.gpr["rax"], refused_cr4_bits(cpuid))
        physical = GuestPhysical(self._uc, memory, dispatcher,
                                 on_write=code_map.dirty.mark if code_map is not None else None)
        self._traps = Traps(self._uc, self._blob, physical, index,
                            self._log_shutdown)
        self._traps.intercept = self._cr4_fault_before_block
        self._delivery = EngineDelivery(self._gate.library, self._uc._uch,
                                        fill_without_restore=self._tlb is not None
                                        and self._tlb.reads_registers_in_place)
        self._traps.engine_delivery = self._delivery
        self._acknowledge_failure: str | None = None
        self._engine_irq = interrupts is not None and engine_takes_interrupts() \
            and self._gate.take_interrupts_in_engine(self._acknowledge_in_engine,
                                                     getattr(interrupts, "engine_acknowledge", None))
        self._native_acks_seen = 0
        """The gate's count of INTAs answered in C when the last run ended (see _note_native_acks)."""
        self._code = CodeInvalidator(self._uc, self._blob, memory, self._gate)
        self._wake = threading.Event()
        self._hlt_sites: set[tuple[int, int]] = set()
        """(CR3, RIP) of the HLT instructions this vCPU halted at in 64-bit code (see _after_hlt)."""
        self._sleeping = False
        """In _wait, about to sleep on _wake (kick sets the event only then)."""
        self._polling = False
        """In _wait, spinning in the gate's poll with the GIL released."""
        self._kick_published = False
        """A kick left the gate's flags to an I/O thread to set as it goes to sleep (see kick)."""
        self.kicks_published = 0
        """Kicks handed to an I/O thread that way (statistics for tests and benchmarks)."""
        self.halt_polling = PollWindow(MAX_POLL_NS)
        """How long a halt spins before sleeping (the accelerator sets the maximum for the VM's size)."""
        self._halted = False
        self._halt_rflags: int | None = None
        """RFLAGS when the last run ended in a HLT (None: halted some other way, read the engine)."""
        self._halt_spun_since: int | None = None
        """When the last run ended in a HLT that had spun inside the run for nothing (``monotonic_ns``): the
        wait that follows has had its polling window (see BlockGate.poll_halts_in_engine)."""
        self._halt_wakes_counted = 0
        """The gate's count of HLTs ended inside a run, as far as halt_polling's statistics have it."""
        # An application processor starts as on a PC: waiting for INIT/SIPI from the boot processor.
        self._mp = MpState.RUNNABLE if index == 0 else MpState.WAIT_FOR_SIPI
        self._events_signalled = False
        self._nmi_latched = False  # inject_nmi without a local APIC (QEMU's CPU_INTERRUPT_NMI)
        self._nmi_held = False     # an NMI taken while NMIs were blocked (inside an NMI handler)
        self._running = threading.Lock()
        self._closed = False
        self.last_dump: str | None = None

    # -- Vcpu protocol ----------------------------------------------------------------------------------
    def load_state(self, state: X86CpuState) -> None:
        """Also drops every translated block: a state load is a reset or a restore, after which guest RAM
        was typically rewritten by the host (kernel reloaded), which the engine cannot notice itself."""
        load_state(self._uc, self._blob, state)
        self._load_nmi_state(state.events)
        self._blob.pull()
        self._gate.expect_cr4(self._blob.cr4)   # the host's CR4, not a guest MOV to check
        self._uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)
        self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        if self._tlb is not None:
            self._tlb.use_hook()
            self._tlb.forget_code()
        self._traps.flush_translations()
        self._hlt_sites.clear()
        mp_state = state.mp_state or MpState.RUNNABLE
        self._halted = mp_state is MpState.HALTED
        self._halt_rflags = None
        self._halt_spun_since = None
        self._mp = MpState.WAIT_FOR_SIPI if mp_state is MpState.WAIT_FOR_SIPI else MpState.RUNNABLE
        if self._halted:
            self._gate.signal_interrupt()  # look at the controller once: it may hold the wake-up already

    def _load_nmi_state(self, events: PendingEvents | None) -> None:
        """NMI blocking and a waiting NMI from ``events`` (KVM's names: ``nmi_masked``, ``nmi_pending``);
        without them (a reset, INIT, an older stream) the vCPU starts outside any NMI handler."""
        masked = events is not None and events.nmi_masked
        blob = self._blob
        blob.pull()
        if bool(blob.hflags2 & HF2_NMI) != masked:
            blob.hflags2 = blob.hflags2 | HF2_NMI if masked else blob.hflags2 & ~HF2_NMI
            blob.push()
        self._nmi_held = False
        self._gate.hold_nmi(False)
        if events is not None and (events.nmi_pending or events.nmi_injected):
            self._nmi_latched = True   # taken (or held, while masked) by the run loop's event step
            self._events_signalled = True

    def save_state(self) -> X86CpuState:
        state = save_state(self._uc, self._blob)
        state.mp_state = (MpState.WAIT_FOR_SIPI if self._mp is MpState.WAIT_FOR_SIPI
                          else MpState.HALTED if self._halted else MpState.RUNNABLE)
        self._blob.pull()
        masked = bool(self._blob.hflags2 & HF2_NMI)
        pending = self._nmi_held or self._nmi_latched
        if masked or pending:
            state.events = replace(state.events or PendingEvents(), nmi_masked=masked, nmi_pending=pending)
        return state

    def use_port_fast_paths(self, fast: PortFastPaths | None) -> None:
        """Let the engine serve port accesses the devices allow without Python (see
        :class:`pyemu.system.bus.RegisterFastPath`)."""
        self._io.guard.use_fast_paths(fast)

    @property
    def posted_pending(self) -> int:
        """Posted port writes this vCPU has queued (any thread; see
        :class:`pyemu.accel.tcg.port_fast_paths.PostedWriteWatch`)."""
        return self._io.guard.posted_pending

    @property
    def polling(self) -> bool:
        """Spinning for an interrupt now, between runs or at a HLT inside one (any thread)."""
        return self._polling or self._gate.polling_in_engine

    @property
    def wake_words(self) -> tuple[int, int, int]:
        """``(spinning at a HLT inside the run, interrupt pending, attention)``: the gate's words through which
        C code without the GIL wakes this vCPU while it spins at a HLT inside its run (any other time such
        code leaves the kick to :meth:`kick`; ``apic_core.c``'s ``pyemu_irq_route_kick``)."""
        return (self._gate.halt_poll_flag, *self._gate.wake_flags)

    def kick(self) -> None:
        if self.polling and publish_on_sleep(self._gate.wake_flags):
            # From an I/O thread's handler while this vCPU spins in C: flags set now would end the spin
            # while the kicker still holds the GIL, and the vCPU would sleep in the GIL's wait until woken
            # across CPUs. The I/O thread sets them once it has let the GIL go (system/wake_publish.py).
            self._kick_published = True
            self.kicks_published += 1
            self._scheduler.nudge(self)
            return
        self._gate.signal_interrupt()
        # Only a vCPU asleep on the event needs it set: a running or polling one sees the gate's flag. Both
        # sides run under the GIL, so either _wait reads the flag after it was set, or this reads _sleeping
        # after _wait set it. Saves the I/O thread an Event.set per interrupt while the vCPU waits for it.
        if self._sleeping:
            self._wake.set()
        self._scheduler.nudge(self)

    def notify_event(self) -> None:
        """INIT, a start-up IPI or an NMI is pending at the local APIC: stop at the next block start
        whatever RFLAGS.IF says, and wake a halted or waiting vCPU (any thread)."""
        self._events_signalled = True
        self._gate.request_service()
        self._wake.set()
        self._scheduler.nudge(self)

    def inject_nmi(self) -> None:
        """An NMI from outside the APIC bus (QMP ``inject-nmi``, any thread). As QEMU's
        ``nmi_monitor_handle``: through the local APIC when there is one (its state then holds the pending
        NMI and its event kick wakes this vCPU), else latched at the CPU itself."""
        if self._signals is not None:
            with self._lock:
                self._signals.raise_nmi()
            return
        self._nmi_latched = True
        self.notify_event()

    # -- Preemptible (the scheduler) ---------------------------------------------------------------------
    def preempt(self) -> None:
        self._gate.request_service()

    def set_contended(self, contended: bool) -> None:
        self._gate.set_contended(contended)

    def request_stop(self) -> None:
        self._gate.request_stop()
        self._wake.set()

    def invalidate_code(self, gpa: int, size: int) -> None:
        """Thread-safe: guest RAM ``[gpa, gpa+size)`` was written outside the engine (DMA, another vCPU);
        drop translated code from it before the guest runs on (see :mod:`pyemu.accel.tcg.code_cache`)."""
        self._code.request(gpa, size)

    def run(self) -> Exit:
        with self._running, self._placement.member():
            try:
                return self._run_loop()
            except UcError as exc:
                return self._fail(f"engine error: {exc}")
            except PyemuError as exc:
                return self._fail(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.request_stop()
        with self._running:
            if self._tlb is not None:
                self._tlb.close()
            self._gate.close()

    # -- statistics for tests and benchmarks -------------------------------------------------------------
    @property
    def gate_stops(self) -> int:
        return self._gate.stops

    @property
    def tlb_statistics(self) -> dict[str, int]:
        """TLB-fill hook counters (empty when the engine fills its TLB itself)."""
        return self._tlb.statistics if self._tlb is not None else {}

    @property
    def events_delivered(self) -> int:
        return self._traps.delivered

    @property
    def spin_yields(self) -> int:
        """Turns given up because the guest spun in a PAUSE loop while another vCPU waited."""
        return self._gate.yields

    @property
    def mp_state(self) -> MpState:
        return (MpState.WAIT_FOR_SIPI if self._mp is MpState.WAIT_FOR_SIPI
                else MpState.HALTED if self._halted else MpState.RUNNABLE)

    # -- the loop ---------------------------------------------------------------------------------------
    def _run_loop(self) -> Exit:
        while True:
            pending = self._traps.pending_exit
            if pending is not None:
                self._traps.pending_exit = None
                return pending
            if self._gate.stop_requested:
                self._gate.clear_stop()
                return Stopped()
            if self._events_signalled:
                self._take_processor_events()
                continue
            if self._mp is MpState.WAIT_FOR_SIPI:
                if not self._wait_for_event():
                    self._gate.clear_stop()
                    return Stopped()
                continue
            if self._halted:
                woken = self._wait_for_interrupt() if self._halt_wakes_on_interrupt() else self._wait_for_event()
                if not woken:
                    self._gate.clear_stop()
                    return Stopped()
                if self._events_signalled:
                    continue
            with self._scheduler.turn(self, self._has_work_waiting):
                self._start_turn()
                if self._nmi_held:
                    self._nmi_now()
                pulled = self._inject_interrupt()
                if self._traps.pending_exit is not None:
                    continue
                result = self._execute(pulled)
            if result is not None:
                return result
            if self._gate.yielded:
                # The turn ended because the guest spins waiting for another vCPU: let that vCPU's thread,
                # which shares this host CPU and may only just have been woken, run and queue for the turn
                # before this one asks again (os.sched_yield releases the GIL; alone, it returns at once).
                os.sched_yield()

    def _has_work_waiting(self) -> bool:
        """While waiting for the turn: an interrupt or processor event is pending (the turn is urgent)."""
        return self._gate.interrupt_signalled or self._events_signalled

    def _start_turn(self) -> None:
        """Drop what other engines made stale since this one last ran (see tlb_fill.CodeMap)."""
        tlb = self._tlb
        if tlb is None:
            return
        code_map = tlb.code_map
        if code_map.engines < 2:
            if code_map.take_flush_request(tlb.engine):  # a dirty-log sync (dirty_log.py)
                self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            return
        pages = code_map.take_invalidations(tlb.engine)
        if pages is None:
            self._uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)
            self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
            self._traps.flush_translations()
            tlb.forget_code()
        elif pages:
            self._code.invalidate([(page, 0x1000) for page in pages])
        if code_map.take_flush_request(tlb.engine):
            self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _take_processor_events(self) -> None:
        """INIT, SIPI and NMI from the local APIC (step 2 of the loop)."""
        self._events_signalled = False
        nmi, self._nmi_latched = self._nmi_latched, False
        signals = self._signals
        if signals is None:
            if nmi:
                self._deliver_nmi()
            return
        with self._lock:
            init = signals.take_init()
            vector = signals.take_startup()
            nmi = signals.take_nmi() or nmi
        if init:
            # SDM 8.4.1: after INIT an application processor waits for a SIPI; the boot processor (vCPU 0)
            # starts again at the reset vector, as KVM does it too.
            bsp = self.index == 0
            log.log("int", f"cpu{self.index}: INIT, " + ("restarting at the reset vector" if bsp
                                                          else "waiting for a start-up IPI"))
            with self._scheduler.turn(self):
                self.load_state(X86CpuState(mp_state=None if bsp else MpState.WAIT_FOR_SIPI))
        if vector is not None and self._mp is MpState.WAIT_FOR_SIPI:
            log.log("int", f"cpu{self.index}: start-up IPI, starting at {vector << 12:#x}")
            with self._scheduler.turn(self):
                self.load_state(startup_state(vector))
        if nmi and self._mp is not MpState.WAIT_FOR_SIPI:
            self._deliver_nmi()

    def _deliver_nmi(self) -> None:
        with self._scheduler.turn(self):
            self._nmi_now()

    def _nmi_now(self) -> None:
        """Vector 2 through the guest IDT, waking a halted vCPU (an NMI ends HLT even with IF=0), unless
        NMIs are blocked: as QEMU's TCG, delivery sets HF2_NMI_MASK in ``hflags2`` and the guest's IRET
        clears it (Unicorn's IRET helpers do; calibration checks it). A blocked NMI stays pending here (one
        at most, as on hardware) and the C block gate, which reads ``hflags2`` at every block start, stops
        at the first block after the handler's IRET."""
        blob = self._blob
        blob.pull()
        if blob.hflags2 & HF2_NMI:
            self._nmi_held = True
            self._gate.hold_nmi(True)
            return
        self._nmi_held = False
        self._gate.hold_nmi(False)
        self._halted = False
        blob.hflags2 = blob.hflags2 | HF2_NMI   # pushed by the delivery below
        self._traps.deliver(Event(_NMI_VECTOR, EventKind.EXTERNAL), return_rip=blob.rip,
                            rflags=blob.rflags)

    def _execute(self, pulled: bool = False) -> Exit | None:
        """One engine run. ``pulled``: the blob holds the engine's state already (read since the last
        change), which saves a context read on the way from an interrupt to the guest."""
        if self._gate.service_requested or self._code.pending:
            self._code.service()
            pulled = False
        blob = self._blob
        if not pulled:
            blob.pull()
        blob.old_exception = -1
        engine_delivers = self._engine_delivers()
        self._delivery.use(engine_delivers)
        self._gate.engine_interrupts(engine_delivers and self._engine_irq)
        blob.set_u64(self._tsc_offset_at, self.tsc.offset)
        blob.push()
        self._gate.arm()
        self._gate.poll_halts_in_engine(self.halt_polling.budget_ns() if self._interrupts is not None else 0)
        tlb = self._tlb
        if tlb is not None:
            tlb.state.fill_failed = 0
        try:
            self._uc.emu_start(blob.rip, _UNTIL)
        except UcError as exc:
            if self._traps.pending_exit is not None:
                return None
            if exc.errno == UC_ERR_EXCEPTION and tlb is not None and tlb.take_fill_failure():
                return None  # the TLB-fill hook left the access to the engine's MMU: run it again
            return self._fail(self._engine_error_reason(exc))
        finally:
            self._io.guard.flush_posted()   # port writes the run left queued reach their devices now
            self._note_native_acks()
        if self._acknowledge_failure is not None:
            reason, self._acknowledge_failure = self._acknowledge_failure, None
            return self._fail(reason)
        self._count_halt_wakes()
        spun_since = self._gate.take_halt_poll()
        if spun_since is not None:
            # The run ended in this HLT (IF=1) whatever else asks for attention: halted before a stop.
            self._halted = True
            self._halt_rflags = None
            self._halt_spun_since = spun_since
        if self._gate.stopped:
            fault = self._gate.take_cr4_fault()
            if fault is not None:
                self._refuse_cr4(*fault)
        if self._traps.pending_exit is not None or self._gate.stopped or self._gate.stop_requested:
            return None
        blob.pull()
        if not self._after_hlt(blob.rip):
            return self._fail(f"emulation ended without HLT at RIP {blob.rip:#x}")
        self._halted = True
        self._halt_rflags = blob.rflags
        if blob.rflags & RFLAGS_IF and self._interrupts is not None:
            return None
        # Halted with interrupts disabled: the caller hears of it, and the next run() waits for what ends
        # such a HLT on hardware (NMI, INIT, SIPI): Linux parks offline CPUs and stopped ones this way.
        return Halt()

    def _note_native_acks(self) -> None:
        """An interrupt the engine took with its INTA answered in C ended any halt, as
        :meth:`_acknowledge_in_engine` records for one Python answers."""
        acks = self._gate.native_acknowledges
        if acks != self._native_acks_seen:
            self._native_acks_seen = acks
            self._halted = False

    def _count_halt_wakes(self) -> None:
        """HLTs an interrupt ended inside the last run count as halts caught by polling."""
        wakes = self._gate.halt_wakes
        if wakes != self._halt_wakes_counted:
            caught = wakes - self._halt_wakes_counted
            self._halt_wakes_counted = wakes
            self.halt_polling.polls += caught
            self.halt_polling.poll_hits += caught

    @staticmethod
    def _engine_delivers() -> bool:
        """Whether the engine may deliver events itself now: ``-d int`` logs every delivery from Python."""
        return not log.enabled("int")

    def _acknowledge_in_engine(self) -> int:
        """The engine asks, at a block boundary where the CPU accepts an interrupt, for the vector of the
        one the gate raised (BlockGate.take_interrupts_in_engine): moved to in-service by the controller,
        as :meth:`_inject_interrupt` does, or -1 when none is deliverable any more (a TPR raised since)."""
        controller = self._interrupts
        gate = self._gate
        if controller is None:
            return -1
        gate.interrupt_taken()
        try:
            vector = self._take_vector(controller)
        except Exception as exc:  # a model error: the vCPU shuts down with the reason instead of a traceback
            self._acknowledge_failure = f"interrupt controller failed: {type(exc).__name__}: {exc}"
            gate.request_stop()
            return -1
        if vector is None:
            return -1
        self._halted = False
        return vector

    def _halt_wakes_on_interrupt(self) -> bool:
        """Whether a maskable interrupt can end the current HLT (IF=1 and an interrupt controller)."""
        if self._interrupts is None:
            return False
        rflags = self._halt_rflags
        if rflags is None:  # halted by load_state: read the engine
            blob = self._blob
            blob.pull()
            rflags = blob.rflags
        return bool(rflags & RFLAGS_IF)

    def _cr4_fault_before_block(self) -> bool:
        """In the exception hook (blob pulled): the exception came from fetching the block after a refused
        MOV to CR4, before the gate could run (SMEP with code on user pages faults that fetch). Then the
        #GP at the MOV replaces it; False (deliver the exception) otherwise. Two compares per exception."""
        gate = self._gate.state
        cr4 = self._blob.cr4
        seen = int(gate.cr4_seen)
        if cr4 == seen or not cr4 & ~seen & int(gate.cr4_refused):
            return False
        blob = self._blob
        cs = blob.segment("cs")
        after = blob.rip if blob.efer & EFER_LMA and cs.flags & DESC_L else (cs.base + blob.rip) & 0xFFFF_FFFF
        return self._refuse_cr4(seen, int(gate.last_block), after)

    def _refuse_cr4(self, old: int, block: int, after: int) -> bool:
        """The block at ``block`` ended with a MOV to CR4 that set a bit this vCPU's CPUID does not offer;
        ``after`` is the next block. Put CR4 back and raise #GP(0) at the MOV (see cr4_guard.py); False
        when the block does not end with such a MOV (nothing done)."""
        blob = self._blob
        blob.pull()
        cs = blob.segment("cs")
        bits = 64 if blob.efer & EFER_LMA and cs.flags & DESC_L else 32 if cs.flags & DESC_B else 16
        length = block_span(block, after)
        mov = None
        if length is not None:
            try:
                memory = self._traps.linear(PagingRegs(blob.cr0, blob.cr3, old, blob.efer))
                mov = mov_to_cr4_before(memory.read(block, length, fetch=True), block, after, bits)
            except GuestFault:
                mov = None
        if mov is None:   # not a MOV to CR4 (cannot happen as far as known): leave the value as written
            log.log("unimp", f"cpu{self.index}: CR4 gained reserved bits {blob.cr4 & ~old:#x} in the block at "
                             f"{block:#x}, which does not end with a MOV to CR4; kept")
            return False
        self._uc.reg_write(UC_X86_REG_CR4, old)
        self._gate.expect_cr4(old)
        blob.pull()
        rip = (blob.rip - (after - mov)) & 0xFFFF_FFFF_FFFF_FFFF
        self._traps.deliver(Event(_GP_VECTOR, EventKind.EXCEPTION, 0), return_rip=rip,
                            rflags=self._uc.reg_read(UC_X86_REG_RFLAGS))
        return True

    def _after_hlt(self, rip: int) -> bool:
        """Whether the run that ended at ``rip`` ended on a HLT (the byte before RIP is 0xF4): the engine
        stops for nothing else once the gate's reasons are ruled out, and this guards that assumption.

        A guest halts at a few places only (its idle loop), so a (CR3, RIP) once seen to hold a HLT (where
        RIP is the linear address, as in 64-bit code) is taken as one again without walking the guest's
        page tables in Python, which cost ~15 µs per halt (2026-12-06, a halt-and-wake micro-benchmark).
        What the cache could get wrong is only what the check guards against: an engine stop for an
        unknown reason exactly where a HLT used to be."""
        blob = self._blob
        site = (blob.cr3, rip)
        sites = self._hlt_sites
        if site in sites:
            return True
        cs = blob.segment("cs")
        # The byte before RIP, as a linear address: CS.base counts outside 64-bit code (real mode: an AP
        # started by SIPI runs with CS.base = vector << 12).
        linear = rip - 1 if blob.efer & EFER_LMA and cs.flags & DESC_L else (cs.base + rip - 1) & 0xFFFF_FFFF
        try:
            memory = self._traps.linear(PagingRegs(blob.cr0, blob.cr3, blob.cr4, blob.efer))
            halted = memory.read(linear, 1, fetch=True)[0] == _HLT
        except GuestFault:
            return False
        if halted and linear == rip - 1:  # 64-bit code (or a zero CS base): the site is its RIP
            if len(sites) >= _HLT_SITES:
                sites.clear()
            sites.add(site)
        return halted

    def _wait_for_interrupt(self) -> bool:
        """Halted: block until the controller has an interrupt or a processor event (True) or a stop is
        requested (False)."""
        return self._wait(self._interrupts)

    def _wait_for_event(self) -> bool:
        """Waiting for SIPI: block until a processor event (True) or a stop request (False)."""
        return self._wait(None)

    def _wait(self, controller: InterruptController | None) -> bool:
        """Wait for work; a halt waiting for an interrupt first spins for the adaptive halt-polling window
        (:mod:`pyemu.accel.tcg.halt_poll`), then sleeps on the wake-up event."""
        polling = self.halt_polling
        window = polling.budget_ns() if controller is not None else 0
        started = time.monotonic_ns() if controller is not None and polling.max_ns else 0
        spun_since, self._halt_spun_since = self._halt_spun_since, None
        if spun_since is not None and controller is not None:
            window = 0  # spent inside the run already
            polling.polls += 1
            if started:
                started = spun_since
        woken_while_polling = False
        try:
            while True:
                self._wake.clear()
                self._gate.begin_wait()
                if self._gate.stop_requested:
                    return False
                if self._events_signalled:
                    return True
                if controller is not None:
                    with self._lock:
                        pending = controller.interrupt_pending()
                    if pending:
                        self._gate.signal_interrupt()
                        return True
                if window:
                    polling.polls += 1
                    self._polling = True
                    try:
                        woken_while_polling = self._gate.poll(window)
                    finally:
                        self._polling = False
                    window = 0  # one spin per halt; a flag that was not ours leads to the sleep below
                    # A kick published during the spin may not have ended it yet (its I/O thread is still
                    # busy): its interrupt is in the controller already, so look again instead of sleeping.
                    if woken_while_polling or self._kick_published:
                        self._kick_published = False
                        continue
                woken_while_polling = False
                self._sleeping = True
                try:
                    if not self._gate.attention_raised:  # else a kick came since begin_wait: look again
                        self._wake.wait()
                finally:
                    self._sleeping = False
        finally:
            if started:
                polling.record(time.monotonic_ns() - started, woken_while_polling=woken_while_polling)

    def _take_vector(self, controller: InterruptController) -> int | None:
        """The vector the controller moves to in-service for this vCPU (INTA), or None if nothing is
        deliverable: a LAPIC whose IRR holds only blocked vectors answers INTA with the spurious vector,
        which must not be delivered. The gate's flag is left set while more is pending. Both delivery
        paths (the engine's callback and the Python one) take it here."""
        gate = self._gate
        with self._lock:
            gate.clear_interrupt()
            vector = controller.acknowledge_interrupt() if controller.interrupt_pending() else None
            if controller.interrupt_pending():
                gate.signal_interrupt()
        return vector

    def _inject_interrupt(self) -> bool:
        """Deliver a pending interrupt (or have the engine take it before its first block); True when the
        blob was read from the engine and nothing changed the engine since (see :meth:`_execute`)."""
        controller = self._interrupts
        gate = self._gate
        if controller is None or not gate.interrupt_signalled:
            return False
        gate.clear_interrupt()
        with self._lock:
            pending = controller.interrupt_pending()
        if not pending:
            return False
        gate.signal_interrupt()
        blob = self._blob
        blob.pull()
        if not blob.rflags & RFLAGS_IF or blob.hflags & HF_INHIBIT_IRQ:
            return True  # the block gate stops again once IF=1 and the shadow is over
        if self._engine_irq and self._engine_delivers():
            gate.raise_interrupt_before_run()  # the engine asks _acknowledge_in_engine before its first block
            return True
        vector = self._take_vector(controller)
        if vector is None:
            return True
        self._halted = False
        self._traps.deliver(Event(vector, EventKind.EXTERNAL), return_rip=blob.rip, rflags=blob.rflags)
        return False

    # -- failure reporting ------------------------------------------------------------------------------
    def _engine_error_reason(self, exc: UcError) -> str:
        """Why the engine gave up, in guest terms where possible."""
        try:
            self._blob.pull()
            rip = self._blob.rip
        except UcError:
            return f"engine error: {exc}"
        if exc.errno in (UC_ERR_FETCH_PROT, UC_ERR_FETCH_UNMAPPED):
            return f"instruction fetch from device space (not RAM) at RIP {rip:#x}"
        if exc.errno in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED):
            return f"access beyond the physical address space at RIP {rip:#x}"
        return f"engine error at RIP {rip:#x}: {exc}"

    def _fail(self, reason: str) -> Shutdown:
        self._log_shutdown(reason)
        return Shutdown(reason)

    def _log_shutdown(self, reason: str) -> None:
        try:
            self.last_dump = self._register_dump()
        except (UcError, PyemuError):
            self.last_dump = "(registers unavailable)"
        if log.enabled("guest_errors"):
            log.log("guest_errors", f"cpu{self.index}: shutdown: {reason}\n{self.last_dump}")

    def _register_dump(self) -> str:
        blob = self._blob
        blob.pull()
        lines = [" ".join(f"{name.upper()}={blob.gpr(name):016x}" for name in GPR_NAMES[i:i + 4])
                 for i in range(0, len(GPR_NAMES), 4)]
        lines.append(f"RIP={blob.rip:016x} RFL={blob.rflags:08x} CPL={blob.hflags & 3} HFLAGS={blob.hflags:08x}")
        for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr", "ldt"):
            seg = blob.segment(name)
            lines.append(f"{name.upper():3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} {seg.flags:08x}")
        gdt, idt = blob.table("gdt"), blob.table("idt")
        lines.append(f"GDT={gdt[0]:016x} {gdt[1]:08x} IDT={idt[0]:016x} {idt[1]:08x}")
        lines.append(f"CR0={blob.cr0:08x} CR2={blob.cr2:016x} CR3={blob.cr3:016x} CR4={blob.cr4:08x} "
                     f"EFER={blob.efer:016x}")
        return "\n".join(lines)
