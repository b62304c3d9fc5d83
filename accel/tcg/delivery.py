"""Exception and interrupt delivery through the guest's IDT, as the hardware does it.

Unicorn 2.1.4 never delivers an exception or ``INT n`` itself: it reports the vector to ``UC_HOOK_INTR``
and expects the embedder to act. This module is that act, written from the Intel SDM (vol. 3, ch. 6) and
checked against QEMU's ``do_interrupt64``/``do_interrupt_protected`` behaviour:

* 64-bit mode (IA-32e): 16-byte interrupt/trap gates, gate DPL check for software interrupts
  (``INT n``/``INT3``/``INTO`` from a lower privilege -> #GP(vector*8+2)), not-present gate -> #NP,
  target code-segment checks, stack switch to TSS.RSPn on a privilege change or to TSS.ISTn when the gate
  names an IST slot, 16-byte stack alignment, frame SS:RSP/RFLAGS/CS:RIP(/error code), RFLAGS with TF, NT,
  RF, VM cleared (and IF for interrupt gates), SS = null selector with RPL = new CPL.
* 32-bit protected mode: 8-byte gates (16- and 32-bit interrupt/trap gates), ring switch through the
  32-bit (or 16-bit) TSS's SSn:ESPn with SS descriptor checks, 2- or 4-byte frames.
* real mode: the IVT (for completeness; no boot protocol pyemu supports enters the kernel in real mode).
* nesting: a fault raised while delivering is delivered next, or combined into #DF (contributory after
  contributory, #PF or contributory after #PF); a fault while delivering #DF is a triple fault
  (:class:`~pyemu.accel.tcg.errors.TripleFault`). Error codes of delivery faults carry the EXT bit unless
  the event was a software interrupt.

Not modelled: task gates and hardware task switches, virtual-8086 mode
(:class:`~pyemu.accel.tcg.errors.UnsupportedGuestState`), shadow stacks.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from pyemu.accel.tcg.errors import GuestFault, TripleFault, UnsupportedGuestState
from pyemu.accel.tcg.paging import LinearMemory, PageWalker, PagingRegs, canonical
from pyemu.accel.tcg.physmem import GuestPhysical
from pyemu.accel.tcg.segments import DESC_CONFORMING, SegCache, null_segment, parse_descriptor
from pyemu.target.x86.cpu_state import CR0_PE, EFER_LMA, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF

RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

DE, DB, NMI, BP, OF, BR, UD, NM, DF = 0, 1, 2, 3, 4, 5, 6, 7, 8
TS, NP, SS, GP, PF, MF, AC = 10, 11, 12, 13, 14, 16, 17
VECTORS_WITH_ERROR_CODE = frozenset({DF, TS, NP, SS, GP, PF, AC, 21, 29, 30})
_CONTRIBUTORY = frozenset({DE, TS, NP, SS, GP})


class EventKind(enum.Enum):
    EXCEPTION = "exception"   # raised by the CPU (faults, traps, aborts)
    SOFTWARE = "software"     # INT n, INT3, INTO: gate DPL is checked, no error code, EXT=0
    EXTERNAL = "external"     # an interrupt from the interrupt controller


class Event(NamedTuple):
    vector: int
    kind: EventKind
    error_code: int | None = None


class InterruptedState(NamedTuple):
    """The architectural state delivery starts from; ``rip`` is the return address to push."""

    rip: int
    rsp: int
    rflags: int
    cpl: int
    cs: SegCache
    ss: SegCache
    cr0: int
    cr3: int
    cr4: int
    efer: int
    idt: tuple[int, int]
    gdt: tuple[int, int]
    ldt: SegCache
    tr: SegCache

    @property
    def paging(self) -> PagingRegs:
        return PagingRegs(self.cr0, self.cr3, self.cr4, self.efer)


class HandlerEntry(NamedTuple):
    """Where the handler starts: the registers delivery changed."""

    rip: int
    rsp: int
    rflags: int
    cpl: int
    cs: SegCache
    ss: SegCache


class Delivered(NamedTuple):
    entry: HandlerEntry
    event: Event              # what finally got delivered (#DF, or a fault raised during delivery)
    cr2: int | None           # set when a #PF was raised during delivery


def double_fault_combination(first: int, second: int) -> bool:
    """SDM table 6-5: which first/second exception pairs become #DF."""
    if first in _CONTRIBUTORY and second in _CONTRIBUTORY:
        return True
    return first == PF and (second == PF or second in _CONTRIBUTORY)


class InterruptDelivery:
    def __init__(self, walker: PageWalker, phys: GuestPhysical) -> None:
        self._walker = walker
        self._phys = phys

    def deliver(self, event: Event, state: InterruptedState, *, instruction_rip: int | None = None) -> Delivered:
        """Deliver ``event``; faults during delivery are resolved here (serially, as #DF, or TripleFault).

        ``instruction_rip`` is where a software interrupt instruction starts: ``state.rip`` is past it
        (a trap returns after it), but a fault raised while delivering it (gate DPL, not-present gate)
        reports the instruction itself."""
        current = event
        cr2: int | None = None
        for _ in range(4):
            try:
                return Delivered(self._deliver_once(current, state), current, cr2)
            except GuestFault as fault:
                if current.kind is EventKind.SOFTWARE and instruction_rip is not None:
                    state = state._replace(rip=instruction_rip)
                if fault.vector == PF:
                    cr2 = fault.cr2
                if current.vector == DF and current.kind is EventKind.EXCEPTION:
                    raise TripleFault(f"fault {fault.vector} while delivering #DF") from fault
                if current.kind is EventKind.EXCEPTION and double_fault_combination(current.vector, fault.vector):
                    current = Event(DF, EventKind.EXCEPTION, 0)
                else:
                    current = Event(fault.vector, EventKind.EXCEPTION, fault.error_code)
        raise TripleFault("exception delivery did not converge")

    def _deliver_once(self, event: Event, state: InterruptedState) -> HandlerEntry:
        ext = 0 if event.kind is EventKind.SOFTWARE else 1
        memory = LinearMemory(self._walker, self._phys, state.paging)
        if not state.cr0 & CR0_PE:
            return self._real_mode(event, state, memory)
        if state.rflags & RFLAGS_VM:
            raise UnsupportedGuestState("interrupt in virtual-8086 mode")
        if state.efer & EFER_LMA:
            return self._long_mode(event, state, memory, ext)
        return self._protected_mode(event, state, memory, ext)

    # -- shared checks ----------------------------------------------------------------------------------
    def _descriptor(self, selector: int, state: InterruptedState, memory: LinearMemory, ext: int,
                    fault_vector: int = GP) -> SegCache:
        """Load the GDT/LDT descriptor ``selector`` names; outside the table -> fault(selector)."""
        if selector & 4:
            base, limit = state.ldt.base, state.ldt.limit
            if not state.ldt.present:
                raise GuestFault(fault_vector, (selector & 0xFFFC) + ext)
        else:
            base, limit = state.gdt
        index = selector & ~7
        if index + 7 > limit:
            raise GuestFault(fault_vector, (selector & 0xFFFC) + ext)
        return parse_descriptor(memory.read(base + index, 8), selector)

    def _handler_code_segment(self, selector: int, state: InterruptedState, memory: LinearMemory,
                              ext: int) -> SegCache:
        if selector & 0xFFFC == 0:
            raise GuestFault(GP, ext)
        code = self._descriptor(selector, state, memory, ext)
        if not code.is_code or code.dpl > state.cpl:
            raise GuestFault(GP, (selector & 0xFFFC) + ext)
        if not code.present:
            raise GuestFault(NP, (selector & 0xFFFC) + ext)
        return code

    def _tss_read(self, state: InterruptedState, memory: LinearMemory, offset: int, size: int, ext: int) -> int:
        tr = state.tr
        if not tr.present or offset + size - 1 > tr.limit:
            raise GuestFault(TS, (tr.selector & 0xFFFC) + ext)
        return int.from_bytes(memory.read(tr.base + offset, size), "little")

    @staticmethod
    def _handler_rflags(rflags: int, interrupt_gate: bool) -> int:
        rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if interrupt_gate:
            rflags &= ~RFLAGS_IF
        return rflags

    def _gate_checks(self, event: Event, state: InterruptedState, gate_dpl: int, present: bool, ext: int) -> None:
        vector_code = event.vector * 8 + 2
        if event.kind is EventKind.SOFTWARE and gate_dpl < state.cpl:
            raise GuestFault(GP, vector_code)
        if not present:
            raise GuestFault(NP, vector_code + ext)

    # -- IA-32e -----------------------------------------------------------------------------------------
    def _long_mode(self, event: Event, state: InterruptedState, memory: LinearMemory, ext: int) -> HandlerEntry:
        vector = event.vector
        idt_base, idt_limit = state.idt
        if vector * 16 + 15 > idt_limit:
            raise GuestFault(GP, vector * 8 + 2 + ext)
        low, high = struct.unpack("<QQ", memory.read(idt_base + vector * 16, 16))
        gate_type = (low >> 40) & 0x1F  # includes the S bit, which must be 0
        if gate_type not in (0xE, 0xF):
            raise GuestFault(GP, vector * 8 + 2 + ext)
        self._gate_checks(event, state, (low >> 45) & 3, bool(low >> 47 & 1), ext)
        selector = (low >> 16) & 0xFFFF
        target = (low & 0xFFFF) | ((low >> 32) & 0xFFFF0000) | ((high & 0xFFFFFFFF) << 32)
        ist = (low >> 32) & 7
        code = self._handler_code_segment(selector, state, memory, ext)
        if not code.long or code.big:
            raise GuestFault(GP, (selector & 0xFFFC) + ext)
        new_cpl = state.cpl if code.flags & DESC_CONFORMING else code.dpl
        if ist:
            rsp = self._tss_read(state, memory, 0x24 + 8 * (ist - 1), 8, ext)
        elif new_cpl < state.cpl:
            rsp = self._tss_read(state, memory, 4 + 8 * new_cpl, 8, ext)
        else:
            rsp = state.rsp
        ss = null_segment(new_cpl) if new_cpl != state.cpl else state.ss
        rsp &= ~0xF
        frame = struct.pack("<QQQQQ", state.rip, state.cs.selector, state.rflags, state.rsp, state.ss.selector)
        if event.error_code is not None:
            frame = struct.pack("<Q", event.error_code & 0xFFFF_FFFF) + frame
        rsp = (rsp - len(frame)) & 0xFFFF_FFFF_FFFF_FFFF
        if not canonical(rsp) or not canonical(rsp + len(frame) - 1):
            raise GuestFault(SS, ext)
        try:
            memory.write(rsp, frame, user=new_cpl == 3)
        except GuestFault as fault:
            if fault.vector == GP:  # non-canonical stack is #SS
                raise GuestFault(SS, ext) from fault
            raise
        if not canonical(target):
            raise GuestFault(GP, ext)
        cs = SegCache((selector & 0xFFFC) | new_cpl, code.base, code.limit, code.flags)
        rflags = self._handler_rflags(state.rflags, interrupt_gate=gate_type == 0xE)
        return HandlerEntry(target, rsp, rflags, new_cpl, cs, ss)

    # -- 32-bit protected mode --------------------------------------------------------------------------
    def _protected_mode(self, event: Event, state: InterruptedState, memory: LinearMemory,
                        ext: int) -> HandlerEntry:
        vector = event.vector
        idt_base, idt_limit = state.idt
        if vector * 8 + 7 > idt_limit:
            raise GuestFault(GP, vector * 8 + 2 + ext)
        low, high = struct.unpack("<II", memory.read((idt_base + vector * 8) & 0xFFFF_FFFF, 8))
        gate_type = (high >> 8) & 0x1F
        if gate_type == 0x5:
            self._gate_checks(event, state, (high >> 13) & 3, bool(high >> 15 & 1), ext)
            raise UnsupportedGuestState(f"task gate in IDT entry {vector}")
        if gate_type not in (0x6, 0x7, 0xE, 0xF):
            raise GuestFault(GP, vector * 8 + 2 + ext)
        self._gate_checks(event, state, (high >> 13) & 3, bool(high >> 15 & 1), ext)
        gate32 = bool(gate_type & 0x8)
        selector = low >> 16
        target = (high & 0xFFFF0000) | (low & 0xFFFF)
        if not gate32:
            target &= 0xFFFF
        code = self._handler_code_segment(selector, state, memory, ext)
        if target > code.limit:
            raise GuestFault(GP, ext)
        old_items: list[int] = []
        if not code.flags & DESC_CONFORMING and code.dpl < state.cpl:
            new_cpl = code.dpl
            ss, esp = self._inner_stack(state, memory, new_cpl, ext)
            old_items = [state.ss.selector, state.rsp & 0xFFFF_FFFF]
        else:
            new_cpl = state.cpl
            ss, esp = state.ss, state.rsp
        items = old_items + [state.rflags & 0xFFFF_FFFF, state.cs.selector, state.rip & 0xFFFF_FFFF]
        if event.error_code is not None:
            items.append(event.error_code)
        width = 4 if gate32 else 2
        frame = b"".join((item & ((1 << (8 * width)) - 1)).to_bytes(width, "little") for item in reversed(items))
        mask = 0xFFFF_FFFF if ss.big else 0xFFFF
        new_sp = (esp - len(frame)) & mask
        memory.write((ss.base + new_sp) & 0xFFFF_FFFF, frame, user=new_cpl == 3)
        rsp = new_sp if ss.big else (esp & ~0xFFFF) | new_sp
        cs = SegCache((selector & 0xFFFC) | new_cpl, code.base, code.limit, code.flags)
        rflags = self._handler_rflags(state.rflags, interrupt_gate=not gate_type & 1)
        return HandlerEntry(target, rsp & 0xFFFF_FFFF, rflags, new_cpl, cs, ss)

    def _inner_stack(self, state: InterruptedState, memory: LinearMemory, new_cpl: int,
                     ext: int) -> tuple[SegCache, int]:
        """SSn:ESPn from the current TSS, with the checks that make a bad TSS raise #TS."""
        if state.tr.type & 8:  # 32-bit TSS
            esp = self._tss_read(state, memory, 4 + 8 * new_cpl, 4, ext)
            selector = self._tss_read(state, memory, 8 + 8 * new_cpl, 2, ext)
        else:
            esp = self._tss_read(state, memory, 2 + 4 * new_cpl, 2, ext)
            selector = self._tss_read(state, memory, 4 + 4 * new_cpl, 2, ext)
        if selector & 0xFFFC == 0 or selector & 3 != new_cpl:
            raise GuestFault(TS, (selector & 0xFFFC) + ext)
        ss = self._descriptor(selector, state, memory, ext, fault_vector=TS)
        writable_data = ss.flags & (1 << 12) and not ss.flags & (1 << 11) and ss.flags & (1 << 9)
        if not writable_data or ss.dpl != new_cpl:
            raise GuestFault(TS, (selector & 0xFFFC) + ext)
        if not ss.present:
            raise GuestFault(SS, (selector & 0xFFFC) + ext)
        return ss, esp

    # -- real mode --------------------------------------------------------------------------------------
    def _real_mode(self, event: Event, state: InterruptedState, memory: LinearMemory) -> HandlerEntry:
        vector = event.vector
        idt_base, idt_limit = state.idt
        if vector * 4 + 3 > idt_limit:
            raise GuestFault(GP, vector * 8 + 2)
        ip, segment = struct.unpack("<HH", memory.read(idt_base + vector * 4, 4))
        frame = struct.pack("<HHH", state.rip & 0xFFFF, state.cs.selector, state.rflags & 0xFFFF)
        sp = (state.rsp - len(frame)) & 0xFFFF
        memory.write(state.ss.base + sp, frame)
        rflags = state.rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF)
        cs = SegCache(segment, segment << 4, state.cs.limit, state.cs.flags)
        return HandlerEntry(ip, (state.rsp & ~0xFFFF) | sp, rflags, 0, cs, state.ss)
