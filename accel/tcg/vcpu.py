"""One software vCPU: a Unicorn engine, its hooks, and the run loop that makes it behave like an x86-64 CPU.

Run loop (``run``), per iteration:

1. a recorded exit (triple fault) or a host stop request ends ``run``;
2. a vCPU halted with IF=1 waits on an Event (set by ``kick``/``request_stop``) until the interrupt
   controller has something pending;
3. a pending external interrupt is injected through the IDT if RFLAGS.IF=1 and no interrupt shadow is
   active (QEMU's HF_INHIBIT_IRQ, set for the instruction after ``sti`` and ``mov ss``/``pop ss``);
4. ``old_exception`` is reset and the CR2 shadow written back (Unicorn leaves ``old_exception`` set after
   some faults and clears CR2 across ``emu_start``), then the engine runs from RIP;
5. the engine returns because the C block gate stopped it (stop request or interrupt window, RIP exact at a
   block start), because a hook recorded an exit, or because of HLT (RIP after the ``hlt``). HLT with
   IF=0, or without an interrupt controller, is ``Halt()``; with IF=1 the vCPU waits (step 2) and the
   interrupt is delivered with the return RIP after the ``hlt``.

Why the interrupt signal is a flag and not a queue: the interrupt controller owns pending state
(:class:`~pyemu.hw.intc.api.InterruptController`); ``kick`` only says "look again". The loop clears the flag
before asking the controller and sets it again while something stays pending, so a kick racing with the
check is never lost.

Unicorn errors (an instruction fetch from a device window, an exception no hook claimed) and typed pyemu
errors raised by device models during the run become ``Shutdown(reason)`` with a register dump logged under
``-d guest_errors``; they never escape ``run()``.
"""

from __future__ import annotations

import threading

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

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.exits import Exit, Halt, Shutdown, Stopped
from pyemu.accel.tcg.block_gate import BlockGate
from pyemu.accel.tcg.calibration import BlobLayout
from pyemu.accel.tcg.code_cache import CodeInvalidator
from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.delivery import Event, EventKind
from pyemu.accel.tcg.errors import EngineError, GuestFault
from pyemu.accel.tcg.io_hooks import IoHooks, vcpu_cpuid
from pyemu.accel.tcg.memory_map import PhysicalMap
from pyemu.accel.tcg.paging import PagingRegs
from pyemu.accel.tcg.physmem import GuestPhysical
from pyemu.accel.tcg.segments import HF_INHIBIT_IRQ
from pyemu.accel.tcg.state_io import load_state, save_state
from pyemu.accel.tcg.tlb_fill import TlbFill, tlb_hook_enabled
from pyemu.accel.tcg.traps import Traps
from pyemu.errors import PyemuError
from pyemu.hw.intc.api import InterruptController
from pyemu.system import log
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_state import GPR_NAMES, RFLAGS_IF, X86CpuState
from pyemu.target.x86.cpuid import CpuidTable

# emu_start's "until" address: the last byte of the address space, never the start of a block.
_UNTIL = 0xFFFF_FFFF_FFFF_FFFF
_HLT = 0xF4


class TcgVcpu:
    """A vCPU of the software CPU (implements :class:`pyemu.accel.base.Vcpu`)."""

    def __init__(self, index: int, memory: GuestMemory, dispatcher: ExitDispatcher, cpuid: CpuidTable,
                 layout: BlobLayout, interrupts: InterruptController | None = None) -> None:
        self.index = index
        self._interrupts = interrupts
        try:
            self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
        except UcError as exc:
            raise EngineError(f"cannot create a Unicorn x86-64 engine: {exc}", operation="uc_open") from exc
        self._gate = BlockGate(self._uc)
        self._map = PhysicalMap(self._uc, memory, dispatcher, lambda: self._gate.stop_requested)
        self._tlb = TlbFill(self._uc, memory, self._gate) if tlb_hook_enabled() else None
        self._blob = CpuBlob(self._uc, layout)
        self._io = IoHooks(self._uc, dispatcher, vcpu_cpuid(cpuid, index), self._blob, self._gate)
        self._traps = Traps(self._uc, self._blob, GuestPhysical(self._uc, memory, dispatcher), index,
                            self._log_shutdown)
        self._code = CodeInvalidator(self._uc, self._blob, memory, self._gate)
        self._wake = threading.Event()
        self._halted = False
        self._running = threading.Lock()
        self._closed = False
        self.last_dump: str | None = None

    # -- Vcpu protocol ----------------------------------------------------------------------------------
    def load_state(self, state: X86CpuState) -> None:
        """Also drops every translated block: a state load is a reset or a restore, after which guest RAM
        was typically rewritten by the host (kernel reloaded), which the engine cannot notice itself."""
        load_state(self._uc, self._blob, state)
        self._uc.ctl(UC_CTL_TB_FLUSH, UC_CTL_IO_WRITE)
        self._uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        if self._tlb is not None:
            self._tlb.use_hook()
            self._tlb.forget_code()
        self._traps.flush_translations()
        self._traps.cr2 = state.cr2
        self._halted = False

    def save_state(self) -> X86CpuState:
        return save_state(self._uc, self._blob, self._traps.cr2)

    def kick(self) -> None:
        self._gate.signal_interrupt()
        self._wake.set()

    def request_stop(self) -> None:
        self._gate.request_stop()
        self._wake.set()

    def invalidate_code(self, gpa: int, size: int) -> None:
        """Thread-safe: guest RAM ``[gpa, gpa+size)`` was written outside the engine (DMA, another vCPU);
        drop translated code from it before the guest runs on (see :mod:`pyemu.accel.tcg.code_cache`)."""
        self._code.request(gpa, size)

    def run(self) -> Exit:
        with self._running:
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
            if self._halted and not self._wait_for_interrupt():
                self._gate.clear_stop()
                return Stopped()
            self._inject_interrupt()
            if self._traps.pending_exit is not None:
                continue
            result = self._execute()
            if result is not None:
                return result

    def _execute(self) -> Exit | None:
        if self._gate.service_requested or self._code.pending:
            self._code.service()
        blob = self._blob
        blob.pull()
        blob.old_exception = -1
        blob.cr2 = self._traps.cr2
        blob.push()
        self._gate.arm()
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
        if self._traps.pending_exit is not None or self._gate.stopped or self._gate.stop_requested:
            return None
        blob.pull()
        if not self._after_hlt(blob.rip):
            return self._fail(f"emulation ended without HLT at RIP {blob.rip:#x}")
        if blob.rflags & RFLAGS_IF and self._interrupts is not None:
            self._halted = True
            return None
        return Halt()

    def _after_hlt(self, rip: int) -> bool:
        blob = self._blob
        try:
            memory = self._traps.linear(PagingRegs(blob.cr0, blob.cr3, blob.cr4, blob.efer))
            return memory.read(rip - 1, 1, fetch=True)[0] == _HLT
        except GuestFault:
            return False

    def _wait_for_interrupt(self) -> bool:
        """Block until the controller has an interrupt (True) or a stop is requested (False)."""
        controller = self._interrupts
        assert controller is not None
        while True:
            self._wake.clear()
            if self._gate.stop_requested:
                return False
            if controller.interrupt_pending():
                self._gate.signal_interrupt()
                return True
            self._wake.wait()

    def _inject_interrupt(self) -> None:
        controller = self._interrupts
        gate = self._gate
        if controller is None or not gate.interrupt_signalled:
            return
        gate.clear_interrupt()
        if not controller.interrupt_pending():
            return
        gate.signal_interrupt()
        blob = self._blob
        blob.pull()
        if not blob.rflags & RFLAGS_IF or blob.hflags & HF_INHIBIT_IRQ:
            return  # the block gate stops again once IF=1 and the shadow is over
        vector = controller.acknowledge_interrupt()
        gate.clear_interrupt()
        if controller.interrupt_pending():
            gate.signal_interrupt()
        if vector is None:
            return
        self._halted = False
        self._traps.deliver(Event(vector, EventKind.EXTERNAL), return_rip=blob.rip, rflags=blob.rflags)

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
        lines.append(f"CR0={blob.cr0:08x} CR2={self._traps.cr2:016x} CR3={blob.cr3:016x} CR4={blob.cr4:08x} "
                     f"EFER={blob.efer:016x}")
        return "\n".join(lines)
