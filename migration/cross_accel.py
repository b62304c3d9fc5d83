"""Loading a VM-state stream saved under the other accelerator (``-accel kvm`` <-> ``-accel tcg``).

Why a conversion and not one common format: the boards differ where the accelerators differ. Under the
software CPU each vCPU's local APIC is a userspace device (``lapic<N>``, driver ``apic``, next to the
``apic-bus`` that routes MMIO to them); under KVM the APIC is in the kernel and its state travels inside the
vCPU section (``X86CpuState.lapic``, KVM's register page, with IA32_APIC_BASE, IA32_TSC_DEADLINE and the
pending NMI in other fields). The rest of the stream (RAM, the other devices, registers, segments, control
registers, the common MSRs, the clock and the guest TSC) is the same on both sides and loads unchanged.

So a destination that sees a stream of the other accelerator:

1. compares the headers without the accelerator-only devices (:func:`board_devices`): another board, other
   devices, other RAM, another vCPU count stay :class:`~pyemu.migration.errors.StreamMismatch`;
2. reads the accelerator-only device sections aside (:func:`foreign_device_ids`);
3. converts (:func:`convert`) before anything is applied: the LAPIC through
   :mod:`pyemu.hw.intc.lapic_kvm_page`, the vCPU's accelerator-only parts (pending events, MP state, MSRs
   only one side has) as described at :func:`cpu_to_tcg` and :func:`cpu_to_kvm`. A value one side cannot hold is
   a typed error (StreamCorrupt for a value no APIC holds, StreamMismatch for a guest that uses a feature
   the destination does not offer), raised before the destination changes.

The guest TSC moves in the clock section as always: the destination makes its TSC read the saved value
(:meth:`Machine.set_guest_tsc`). Where KVM cannot set the guest TSC (this host's KVM, DESIGN.md), the guest
sees its TSC jump forward to the host's; it never goes back.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pyemu.accel.kvm.state import (
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_ASYNC_PF_EN,
    MSR_KVM_PV_EOI_EN,
    MSR_KVM_STEAL_TIME,
    MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW,
)
from pyemu.accel.tcg.msrs import SAVED_MSRS as TCG_MSRS
from pyemu.hw.core.state import StateError
from pyemu.hw.intc.lapic import LapicState, LocalApic
from pyemu.hw.intc.lapic_kvm_page import KvmLapic
from pyemu.hw.intc.lapic_kvm_page import from_kvm as lapic_from_kvm
from pyemu.hw.intc.lapic_kvm_page import to_kvm as lapic_to_kvm
from pyemu.hw.intc.lapic_timer import MODE_TSC_DEADLINE
from pyemu.migration.errors import StreamCorrupt, StreamMismatch
from pyemu.system import log
from pyemu.target.x86.cpu_state import XFEATURE_PKRU, MpState, PendingEvents, X86CpuState, XsaveComponents
from pyemu.target.x86.cpuid import TSC_CRYSTAL_HZ

if TYPE_CHECKING:
    from pyemu.machines.base import Machine

USERSPACE_APIC_DRIVERS = frozenset({"apic", "apic-bus"})
"""Devices only a software-CPU board has (the in-kernel APIC replaces them under KVM)."""
ACCELERATORS = ("kvm", "tcg")

_KVM_PARAVIRT_MSRS = {
    MSR_KVM_SYSTEM_TIME_NEW: "kvmclock", MSR_KVM_ASYNC_PF_EN: "KVM async page faults",
    MSR_KVM_STEAL_TIME: "KVM steal time", MSR_KVM_PV_EOI_EN: "KVM paravirtual EOI"}
"""KVM paravirtual features enabled by bit 0 of their MSR: a guest using one would hang without it."""
_TCG_XCR0 = 0b11 | XFEATURE_PKRU
"""XSAVE components the software CPU holds (x87, SSE: :class:`FpuState`; PKRU: ``xsave`` as
:meth:`XsaveComponents.with_pkru`); the rest of KVM's XSAVE area (AVX and later) has no place there."""


def board_devices(devices: Any) -> Any:
    """The accelerator-neutral part of a header's device list (entries ``[id, driver, class, version]``);
    anything that is not such a list is returned as it is, for the caller's comparison to refuse."""
    if not isinstance(devices, list):
        return devices
    return [d for d in devices if not (isinstance(d, list) and len(d) > 1 and d[1] in USERSPACE_APIC_DRIVERS)]


def foreign_device_ids(header: dict[str, Any], own: dict[str, Any]) -> frozenset[str]:
    """Ids of the stateful devices the stream's board has and this one lacks because the accelerators
    differ (the userspace LAPICs of a software-CPU stream loaded under KVM); empty for the same one."""
    if header.get("accel") == own["accel"] or not isinstance(header.get("devices"), list):
        return frozenset()
    return frozenset(str(d[0]) for d in header["devices"]
                     if isinstance(d, list) and len(d) == 4 and d[1] == "apic" and d[2] is not None)


def lapic_id(index: int) -> str:
    """The device id of vCPU ``index``'s userspace LAPIC on pyemu's boards."""
    return f"lapic{index}"


def convert(machine: Machine, source_accel: str, cpus: dict[int, X86CpuState], foreign: dict[str, Any],
            devices: dict[str, Any]) -> None:
    """Turn the parsed sections of a ``source_accel`` stream into what ``machine`` (the other accelerator)
    loads: ``cpus`` are replaced in place, the LAPIC states of a KVM stream are added to ``devices``.
    Raises StreamCorrupt/StreamMismatch before anything is applied."""
    own = machine.accel.name
    if source_accel not in ACCELERATORS or own not in ACCELERATORS:
        raise StreamMismatch(f"the stream was saved under -accel {str(source_accel)[:20]}, this VM runs {own}; "
                             f"only kvm <-> tcg states convert")
    if own == "kvm":
        apic_bus_hz = getattr(getattr(machine.accel, "vm", None), "apic_bus_hz", TSC_CRYSTAL_HZ)
        if apic_bus_hz != TSC_CRYSTAL_HZ:
            log.log("unimp", f"migration: KVM's LAPIC timer counts at {apic_bus_hz} Hz here, the software CPU's "
                             f"at {TSC_CRYSTAL_HZ} Hz; the converted timer keeps its counts, not their duration")
        for index in sorted(cpus):
            lapic = foreign.get(lapic_id(index))
            if lapic is None:
                raise StreamCorrupt(f"the stream lacks the state of device '{lapic_id(index)}'")
            cpus[index] = cpu_to_kvm(cpus[index], lapic, index)
        extra = sorted(set(foreign) - {lapic_id(index) for index in cpus})
        if extra:
            raise StreamCorrupt(f"a LAPIC of no vCPU of this VM ({len(cpus)} vCPUs)", f"section device '{extra[0]}'")
        return
    for index in sorted(cpus):
        device = machine.devices.get(lapic_id(index))
        model = device.model if device is not None else None
        if not isinstance(model, LocalApic):
            raise StreamMismatch(f"this VM has no userspace LAPIC '{lapic_id(index)}' for vCPU {index}")
        cpus[index], devices[lapic_id(index)] = cpu_to_tcg(cpus[index], index, model.timer.crystal_hz)


def cpu_to_kvm(state: X86CpuState, lapic: Any, index: int) -> X86CpuState:
    """A software-CPU vCPU state and its userspace LAPIC as one KVM vCPU state: the register page, APIC
    base, TSC deadline, pending NMI and SIPI vector go where KVM keeps them; CR8 mirrors the TPR (KVM loads
    CR8 before the page, so both agree); a latched INIT or start-up IPI becomes KVM's MP state."""
    where = f"section device '{lapic_id(index)}'"
    if not isinstance(lapic, LapicState):
        raise StreamCorrupt(f"holds a {type(lapic).__name__}, not a LapicState", where)
    try:
        kvm = lapic_to_kvm(lapic, crystal_hz=TSC_CRYSTAL_HZ, bsp=index == 0)
    except StateError as exc:
        raise StreamCorrupt(str(exc), where) from None
    out = state.copy()
    out.lapic = kvm.page
    out.apic_base = kvm.apic_base
    out.cr8 = lapic.tpr >> 4
    out.msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    if kvm.tsc_deadline:
        out.msrs[MSR_IA32_TSC_DEADLINE] = kvm.tsc_deadline
    own = state.events or PendingEvents()  # the software CPU's NMI blocking and held NMI (KVM's names)
    out.events = PendingEvents(nmi_pending=kvm.nmi_pending or own.nmi_pending, nmi_masked=own.nmi_masked,
                               sipi_vector=lapic.startup_vector or 0)
    if lapic.init_pending:
        out.mp_state = MpState.INIT_RECEIVED
    elif lapic.startup_vector is not None and state.mp_state is MpState.WAIT_FOR_SIPI:
        out.mp_state = MpState.SIPI_RECEIVED
    return out


def cpu_to_tcg(state: X86CpuState, index: int, crystal_hz: int) -> tuple[X86CpuState, LapicState]:
    """A KVM vCPU state as a software-CPU vCPU state plus its userspace LAPIC.

    * An external interrupt KVM had started to inject (``events.interrupt``) was already moved from IRR to
      ISR by KVM's acknowledge; it goes back to IRR, so the software CPU delivers it again from the start.
    * An NMI being injected or pending becomes the LAPIC's pending NMI; NMI blocking (inside a handler,
      until its IRET) stays blocking.
    * INIT received / SIPI received become the LAPIC's latched INIT / start-up vector.
    * MSRs the software CPU cannot hold are dropped (IA32_TSC: the clock section carries the TSC; the TSC
      deadline went into the LAPIC timer; MISC_ENABLE, TSC_ADJUST, the KVM paravirtual MSRs when disabled).
    * The x87/SSE registers (``fpu``) load as they are; of the rest of the XSAVE area XCR0 and PKRU are kept
      (the software CPU holds both), the other components are dropped when the guest enabled nothing
      beyond x87/SSE/PKRU in XCR0 (pyemu's default CPU model has no XSAVE at all).
    * Refused (StreamMismatch): a guest using x2APIC, the TSC-deadline timer, a KVM paravirtual feature or
      XSAVE components beyond SSE (the software CPU offers none of them and the guest could not go on), or a vCPU stopped in the middle of
      delivering an exception or software interrupt (the software CPU cannot resume a half-done delivery).
    """
    where = f"section cpu{index}"
    if state.lapic is None:
        raise StreamCorrupt("a KVM vCPU state without its LAPIC page", where)
    for msr, feature in _KVM_PARAVIRT_MSRS.items():
        if state.msrs.get(msr, 0) & 1:
            raise StreamMismatch(f"vCPU {index} uses {feature} (MSR {msr:#x}), which the software CPU does not "
                                 "provide", where)
    if state.xsave is not None and state.xsave.xcr0 & ~_TCG_XCR0:
        raise StreamMismatch(f"vCPU {index} enabled XSAVE components {state.xsave.xcr0 & ~_TCG_XCR0:#x} (XCR0 "
                             f"{state.xsave.xcr0:#x}) beyond x87/SSE/PKRU, which the software CPU does not have",
                             where)
    events = state.events or PendingEvents()
    if events.exception_vector is not None:
        raise StreamMismatch(f"vCPU {index} was saved while delivering exception {events.exception_vector}, "
                             "which the software CPU cannot resume", where)
    if events.interrupt_vector is not None and events.interrupt_soft:
        raise StreamMismatch(f"vCPU {index} was saved while delivering software interrupt "
                             f"{events.interrupt_vector:#x}, which the software CPU cannot resume", where)
    kvm = KvmLapic(page=state.lapic, apic_base=state.apic_base if state.apic_base is not None else 0,
                   tsc_deadline=state.msrs.get(MSR_IA32_TSC_DEADLINE, 0),
                   nmi_pending=events.nmi_pending or events.nmi_injected)
    try:
        lapic = lapic_from_kvm(kvm, crystal_hz=crystal_hz)
    except StateError as exc:
        message = str(exc)
        if "x2APIC" in message:
            raise StreamMismatch(message, where) from None
        raise StreamCorrupt(message, where) from None
    if lapic.timer.mode == MODE_TSC_DEADLINE:
        raise StreamMismatch(f"vCPU {index}'s LAPIC timer is in TSC-deadline mode, which the software CPU does "
                             "not offer (it cannot take IA32_TSC_DEADLINE writes)", where)
    irr, isr = lapic.irr, lapic.isr
    if events.interrupt_vector is not None:
        bit = 1 << events.interrupt_vector
        if isr & bit:
            isr &= ~bit
        irr |= bit
    mp_state = state.mp_state
    init_pending = mp_state is MpState.INIT_RECEIVED
    startup = events.sipi_vector if mp_state is MpState.SIPI_RECEIVED else None
    if init_pending:
        mp_state = MpState.RUNNABLE  # the software CPU takes the latched INIT at its next step
    elif startup is not None:
        mp_state = MpState.WAIT_FOR_SIPI
    lapic = replace(lapic, irr=irr, isr=isr, init_pending=init_pending, startup_vector=startup)
    out = state.copy()
    out.msrs = {msr: value for msr, value in state.msrs.items() if msr in TCG_MSRS}
    out.lapic = None
    out.apic_base = None
    # NMI blocking stays with the vCPU (a pending NMI went into the LAPIC above).
    out.events = PendingEvents(nmi_masked=True) if events.nmi_masked else None
    out.xsave = (XsaveComponents.with_pkru(state.xsave.xcr0, state.xsave.pkru) if state.xsave is not None
                 else None)
    out.cr8 = 0
    out.mp_state = mp_state
    ignored = sorted(set(state.msrs) - set(TCG_MSRS) - set(_KVM_PARAVIRT_MSRS) - {MSR_KVM_WALL_CLOCK_NEW})
    if ignored and log.enabled("unimp"):
        log.log("unimp", f"migration: vCPU {index}: MSRs {', '.join(f'{m:#x}' for m in ignored)} have no place "
                         "under the software CPU; dropped")
    return out, lapic


__all__ = ["USERSPACE_APIC_DRIVERS", "board_devices", "convert", "cpu_to_kvm", "cpu_to_tcg",
           "foreign_device_ids", "lapic_id"]
