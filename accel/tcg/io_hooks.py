"""Port I/O and CPUID: instruction hooks that hand the guest's request to the machine.

IN/OUT (including the string forms, which QEMU executes through the same helpers) reach the PIO bus
through the dispatcher, as a KVM_EXIT_IO would, once the C guard of :mod:`pyemu.accel.tcg.io_guard` has
checked them against IOPL and the TSS I/O permission bitmap. CPUID is answered from the machine's
:class:`~pyemu.target.x86.cpuid.CpuidTable` for this vCPU's APIC ID, minus what the software CPU cannot
provide: x2APIC and the TSC-deadline timer need RDMSR/WRMSR interception, which Unicorn 2.1.4 does not
offer (see :mod:`pyemu.accel.tcg.msrs`).
"""

from __future__ import annotations

from unicorn import UC_HOOK_INSN, Uc
from unicorn import x86_const as x86

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.tcg.block_gate import BlockGate
from pyemu.accel.tcg.context import CpuBlob
from pyemu.accel.tcg.io_guard import IoGuard
from pyemu.target.x86.cpu_models import TCG_WITHHELD_FEATURES
from pyemu.target.x86.cpuid import CpuidTable

_XSAVE, _OSXSAVE, _CR4_OSXSAVE = 1 << 26, 1 << 27, 1 << 18  # CPUID.1:ECX, CR4
_PKU, _OSPKE, _CR4_PKE = 1 << 3, 1 << 4, 1 << 22  # CPUID.(7,0):ECX, CR4


def vcpu_cpuid(table: CpuidTable, apic_id: int) -> CpuidTable:
    """The table one software vCPU presents: its APIC ID, without x2APIC and the TSC-deadline timer."""
    return table.with_apic_id(apic_id).without(*TCG_WITHHELD_FEATURES)


class IoHooks:
    def __init__(self, uc: Uc, dispatcher: ExitDispatcher, cpuid: CpuidTable, blob: CpuBlob,
                 gate: BlockGate) -> None:
        self._dispatcher = dispatcher
        self._gate = gate
        self._cpuid = cpuid
        self._blob = blob
        self.cpuid_count = 0
        # IN/OUT go through the C permission guard (io_guard.py), which raises #GP(0) where a CPU does.
        self.guard = IoGuard(uc, blob, gate, self._on_in, self._on_out, self._on_posted)
        uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)

    def _on_in(self, uc: Uc, port: int, size: int, _user: object) -> int:
        value = self._dispatcher.io_in(port, size) & ((1 << (8 * size)) - 1)
        if self._gate.stop_requested:
            uc.emu_stop()
        return value

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _user: object) -> None:
        self._dispatcher.io_out(port, size, value & ((1 << (8 * size)) - 1))
        if self._gate.stop_requested:  # e.g. the device asked the machine to stop: end the run soon
            uc.emu_stop()

    def _on_posted(self, port: int, data: bytes) -> None:
        # No emu_stop here for a stop the device asked for: the block gate ends the run at the next block
        # start, and this may run after the run ended (the vCPU's own flush).
        self._dispatcher.io_out_burst(port, data)

    def _on_cpuid(self, _uc: Uc, _user: object) -> int:
        """Answer through the CPU-state blob (QEMU syncs the registers around the CPUID helper): one
        context copy each way instead of six ~2 µs register calls. Returns 1: skip Unicorn's own CPUID."""
        blob = self._blob
        blob.pull()
        leaf = blob.gpr("rax") & 0xFFFF_FFFF
        eax, ebx, ecx, edx = self._cpuid.lookup(leaf, blob.gpr("rcx") & 0xFFFF_FFFF)
        if leaf == 1 and ecx & _XSAVE:  # OSXSAVE mirrors CR4.OSXSAVE, OSPKE CR4.PKE (what Linux re-reads)
            ecx = ecx & ~_OSXSAVE | (_OSXSAVE if blob.cr4 & _CR4_OSXSAVE else 0)
        elif leaf == 7 and blob.gpr("rcx") & 0xFFFF_FFFF == 0 and ecx & _PKU:
            ecx = ecx & ~_OSPKE | (_OSPKE if blob.cr4 & _CR4_PKE else 0)
        blob.set_gpr("rax", eax)
        blob.set_gpr("rbx", ebx)
        blob.set_gpr("rcx", ecx)
        blob.set_gpr("rdx", edx)
        blob.push()
        self.cpuid_count += 1
        return 1
