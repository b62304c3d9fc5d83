"""The engine hooks that turn Unicorn's reports into architectural events: exceptions, ``INT n``, #UD,
SYSCALL and SYSENTER, plus external-interrupt injection between runs.

Where each event comes from (Unicorn 2.1.4, measured):

* faults, traps and ``INT n``/``INT3``/``INTO`` reach ``UC_HOOK_INTR(intno)``; for faults RIP is the
  faulting instruction and the error code is in the CPU-state blob, for software interrupts RIP is already
  past the instruction and ``exception_is_int`` is set; for #PF, CR2 is right at this point.
* ``ud2`` and every invalid opcode (#UD) never reach the INTR hook: they end emulation with
  UC_ERR_INSN_INVALID unless ``UC_HOOK_INSN_INVALID`` claims them (RIP at the instruction).
* ``syscall``/``sysenter`` call their instruction hooks with RIP at the instruction and then add the
  instruction length to RIP themselves, so every RIP written from those hooks is written minus that
  length.

Delivery happens inside the hook: the blob is patched (segment caches, RSP, hflags, ``old_exception``
reset to -1 so the next fault is not mistaken for a double fault) and RFLAGS/RIP are written through
``reg_write``. Writing RIP inside a hook makes Unicorn leave the current translation block and restart at
the new RIP (``quit_request``), which also re-derives its internal flags representation from the RFLAGS
written. A triple fault records ``Shutdown("triple fault")`` and stops the engine.
"""

from __future__ import annotations

from typing import Callable

from unicorn import UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, Uc
from unicorn import x86_const as x86

from pyemu.accel.exits import Exit, Shutdown
from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.delivery import (
    UD,
    VECTORS_WITH_ERROR_CODE,
    Delivered,
    Event,
    EventKind,
    HandlerEntry,
    InterruptDelivery,
    InterruptedState,
)
from pyemu.accel.tcg.engine_delivery import EngineDelivery
from pyemu.accel.tcg.errors import GuestFault, TripleFault, UnsupportedGuestState
from pyemu.accel.tcg.paging import LinearMemory, PageWalker, PagingRegs
from pyemu.accel.tcg.physmem import GuestPhysical
from pyemu.accel.tcg.segments import compute_hflags
from pyemu.accel.tcg.msrs import MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP, MSR_IA32_SYSENTER_ESP
from pyemu.accel.tcg.syscall import fast_call_length, syscall_entry, sysenter_entry
from pyemu.system import log
from pyemu.target.x86.cpu_state import EFER_LMA

_RFLAGS = x86.UC_X86_REG_RFLAGS
_RIP = x86.UC_X86_REG_RIP


class Traps:
    """Exception/interrupt/SYSCALL handling of one engine. CR2 lives in the engine's state only: the
    engine keeps it across runs, sets it for a #PF it raises, and the guest's ``mov cr2`` writes it."""

    def __init__(self, uc: Uc, blob: CpuBlob, phys: GuestPhysical, index: int,
                 on_shutdown: Callable[[str], None]) -> None:
        self._uc = uc
        self._blob = blob
        self._phys = phys
        self._walker = PageWalker(phys)
        self._delivery = InterruptDelivery(self._walker, phys)
        self._index = index
        self._on_shutdown = on_shutdown
        self.pending_exit: Exit | None = None
        self.delivered = 0
        self.engine_delivery: EngineDelivery | None = None
        """The engine's own #PF delivery (pyemu's libunicorn), switched off when the vCPU shuts down."""
        self.intercept: Callable[[], bool] | None = None
        """Asked first on every exception (blob pulled): True when it delivered something else instead
        (the vCPU's check for a refused MOV to CR4 whose next code fetch faulted, cr4_guard.py)."""
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, self._on_sysenter, None, 1, 0, x86.UC_X86_INS_SYSENTER)

    # -- engine hooks -----------------------------------------------------------------------------------
    def _on_intr(self, uc: Uc, intno: int, _user: object) -> None:
        if self.pending_exit is not None:
            uc.emu_stop()
            return
        blob = self._blob
        blob.pull()
        if self.intercept is not None and self.intercept():
            return
        instruction_rip = None
        if blob.exception_is_int:
            event = Event(intno, EventKind.SOFTWARE)
            instruction_rip = self._software_interrupt_start(blob.rip, intno)
        else:
            code = blob.error_code if intno in VECTORS_WITH_ERROR_CODE else None
            event = Event(intno, EventKind.EXCEPTION, code)
        self.deliver(event, return_rip=blob.rip, rflags=uc.reg_read(_RFLAGS), instruction_rip=instruction_rip)

    def _software_interrupt_start(self, next_rip: int, vector: int) -> int:
        """Where the INT n / INT3 / INTO / INT1 instruction that raised ``vector`` starts (Unicorn reports
        only the address after it). Prefixes before the opcode are not looked for."""
        blob = self._blob
        try:
            before = self.linear(PagingRegs(blob.cr0, blob.cr3, blob.cr4, blob.efer)).read(next_rip - 2, 2, fetch=True)
        except GuestFault:
            return next_rip - 2
        if before[0] == 0xCD and before[1] == vector:
            return next_rip - 2
        if before[1] in (0xCC, 0xCE, 0xF1):
            return next_rip - 1
        return next_rip - 2

    def _on_invalid(self, uc: Uc, _user: object) -> bool:
        if self.pending_exit is None:
            self._blob.pull()
            self.deliver(Event(UD, EventKind.EXCEPTION), return_rip=self._blob.rip, rflags=uc.reg_read(_RFLAGS))
        else:
            uc.emu_stop()
        return True

    def _on_syscall(self, uc: Uc, _user: object) -> None:
        if self.pending_exit is not None:
            uc.emu_stop()
            return
        blob = self._blob
        blob.pull()
        rip = blob.rip
        rflags = uc.reg_read(_RFLAGS)
        length = self._instruction_length(rip, 0x05)
        cs = blob.segment("cs")
        try:
            entry = syscall_entry(return_rip=rip + length, rflags=rflags, cs_long=cs.long, cr0=blob.cr0,
                                  efer=blob.efer, star=blob.msr("star"), lstar=blob.msr("lstar"),
                                  cstar=blob.msr("cstar"), fmask=blob.msr("fmask"))
        except GuestFault as fault:
            self.deliver(Event(fault.vector, EventKind.EXCEPTION), return_rip=rip, rflags=rflags,
                         rip_bias=length)
            return
        blob.set_gpr("rcx", entry.rcx)
        if entry.r11 is not None:
            blob.set_gpr("r11", entry.r11)
        if log.enabled("int"):
            log.log("int", f"cpu{self._index}: syscall at {rip:#x} -> {entry.rip:#x}")
        self._enter(HandlerEntry(entry.rip, blob.gpr("rsp"), entry.rflags, 0, entry.cs, entry.ss),
                    rip_bias=length)

    def _instruction_length(self, rip: int, opcode: int) -> int:
        """Length of the ``0F opcode`` instruction at RIP (the blob is pulled): 2 unless prefixed."""
        blob = self._blob
        memory = self.linear(PagingRegs(blob.cr0, blob.cr3, blob.cr4, blob.efer))
        try:
            code = memory.read(rip, 2, fetch=True)
            if code == bytes((0x0F, opcode)):
                return 2
            return fast_call_length(memory.read(rip, 15, fetch=True), opcode)
        except GuestFault:
            return 2

    def _on_sysenter(self, uc: Uc, _user: object) -> None:
        """Like SYSCALL: RIP is at the instruction, the engine adds its length after the hook."""
        if self.pending_exit is not None:
            uc.emu_stop()
            return
        blob = self._blob
        blob.pull()
        rip = blob.rip
        rflags = uc.reg_read(_RFLAGS)
        length = self._instruction_length(rip, 0x34)
        try:
            entry = sysenter_entry(rflags=rflags, cr0=blob.cr0, efer=blob.efer,
                                   sysenter_cs=uc.msr_read(MSR_IA32_SYSENTER_CS),
                                   sysenter_esp=uc.msr_read(MSR_IA32_SYSENTER_ESP),
                                   sysenter_eip=uc.msr_read(MSR_IA32_SYSENTER_EIP))
        except GuestFault as fault:
            self.deliver(Event(fault.vector, EventKind.EXCEPTION, fault.error_code), return_rip=rip,
                         rflags=rflags, rip_bias=length)
            return
        if log.enabled("int"):
            log.log("int", f"cpu{self._index}: sysenter at {rip:#x} -> {entry.rip:#x}")
        self._blob.pull()  # msr_read went through the engine; take its state again before patching
        self._enter(HandlerEntry(entry.rip, entry.rsp, entry.rflags, 0, entry.cs, entry.ss), rip_bias=length)

    # -- delivery ---------------------------------------------------------------------------------------
    def flush_translations(self) -> None:
        self._walker.flush()

    def linear(self, regs: PagingRegs) -> LinearMemory:
        return LinearMemory(self._walker, self._phys, regs)

    def interrupted_state(self, return_rip: int, rflags: int) -> InterruptedState:
        """The state to deliver from, read from the (already pulled) blob."""
        blob = self._blob
        return InterruptedState(
            rip=return_rip, rsp=blob.gpr("rsp"), rflags=rflags, cpl=blob.hflags & 3,
            cs=blob.segment("cs"), ss=blob.segment("ss"), cr0=blob.cr0, cr3=blob.cr3, cr4=blob.cr4,
            efer=blob.efer, idt=blob.table("idt"), gdt=blob.table("gdt"), ldt=blob.segment("ldt"),
            tr=blob.segment("tr"),
        )

    def deliver(self, event: Event, *, return_rip: int, rflags: int, rip_bias: int = 0,
                instruction_rip: int | None = None) -> bool:
        """Deliver ``event`` with the blob already pulled; False if the CPU shut down instead.

        ``rip_bias`` is added back by the engine after the hook returns (SYSCALL hook), so it is
        subtracted from the handler RIP written here."""
        state = self.interrupted_state(return_rip, rflags)
        try:
            delivered = self._delivery.deliver(event, state, instruction_rip=instruction_rip)
        except TripleFault as exc:
            self._shutdown("triple fault", f"{exc}; first event vector {event.vector} at RIP {return_rip:#x}")
            return False
        except UnsupportedGuestState as exc:
            self._shutdown(str(exc), f"vector {event.vector} at RIP {return_rip:#x}")
            return False
        if delivered.cr2 is not None:
            self._blob.cr2 = delivered.cr2  # a #PF raised while delivering (pushed by _enter)
        self._log_delivery(event, delivered, state)
        self._enter(delivered.entry, rip_bias=rip_bias)
        self.delivered += 1
        return True

    def _enter(self, entry: HandlerEntry, *, rip_bias: int = 0) -> None:
        blob = self._blob
        blob.set_segment("cs", entry.cs)
        blob.set_segment("ss", entry.ss)
        blob.set_gpr("rsp", entry.rsp)
        efer = blob.efer
        if efer & EFER_LMA and entry.cs.long:
            ds = es = entry.ss  # 64-bit code: DS/ES bases do not enter the hflags
        else:
            ds, es = blob.segment("ds"), blob.segment("es")
        blob.hflags = compute_hflags(blob.hflags, cpl=entry.cpl, cs=entry.cs, ss=entry.ss, ds=ds, es=es,
                                     cr0=blob.cr0, cr4=blob.cr4, efer=efer)
        blob.old_exception = -1
        blob.push()
        self._uc.reg_write(_RFLAGS, entry.rflags)
        self._uc.reg_write(_RIP, (entry.rip - rip_bias) & 0xFFFF_FFFF_FFFF_FFFF)

    def _shutdown(self, reason: str, detail: str) -> None:
        self.pending_exit = Shutdown(reason)
        if self.engine_delivery is not None:
            self.engine_delivery.use(False)  # nothing more is delivered before the run stops
        self._on_shutdown(f"{reason}: {detail}")
        self._uc.emu_stop()

    def _log_delivery(self, event: Event, delivered: Delivered, state: InterruptedState) -> None:
        if not log.enabled("int"):
            return
        final = delivered.event
        code = "" if final.error_code is None else f" error {final.error_code:#x}"
        nested = "" if final is event else f" (while delivering vector {event.vector:#x})"
        log.log("int", f"cpu{self._index}: {final.kind.value} vector {final.vector:#x}{code}{nested} "
                       f"at RIP {state.rip:#x} CPL{state.cpl} -> {delivered.entry.rip:#x} CPL{delivered.entry.cpl}")
