"""One KVM vCPU: its fd, the shared ``kvm_run`` page, state transfer and the run loop.

The run loop is the hot path of every port and MMIO access the guest makes, so it reads the exit straight
from the mmapped ``kvm_run`` page and calls the dispatcher without building exit objects; only the exits
the board must act on (``Halt``, ``Shutdown``, ``Stopped``) leave :meth:`KvmVcpu.run`.

Halting: the LAPIC is in the kernel, so KVM handles HLT itself (the vCPU sleeps inside ``KVM_RUN`` until an
interrupt, INIT or a signal) and never reports it. A HLT with interrupts disabled would then sleep
forever, where the protocol wants ``Halt``. The accelerator's halt probe therefore kicks a vCPU that has
stayed inside one ``KVM_RUN`` call for a whole probe interval; on every such interruption the run loop
looks at the MP state, RFLAGS.IF and the LAPIC and returns ``Halt`` for a HLT nothing can end (IF=0, or a
disabled LAPIC and no ExtINT controller; RIP after the HLT, as on the software CPU). Any other HLT keeps
waiting inside ``KVM_RUN``, where interrupts wake it.

Stopping: see :mod:`pyemu.accel.kvm.kick` (``immediate_exit`` plus a signal to the vCPU thread).
"""

from __future__ import annotations

import errno
import mmap
import struct
from typing import Any, Callable

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.exits import Exit, Halt, Shutdown, Stopped
from pyemu.accel.kvm import abi
from pyemu.accel.kvm.abi import ffi, libc
from pyemu.accel.kvm.errors import KvmError, KvmStateError
from pyemu.accel.kvm.fd import KvmFd
from pyemu.accel.kvm.kick import ThreadKicker
from pyemu.accel.kvm.state import (
    MSR_IA32_TSC,
    MP_STATE_FROM_KVM,
    MP_STATE_TO_KVM,
    SAVED_MSRS,
    XCR_XCR0,
    XSAVE_AREA_SIZE,
    events_from_kvm,
    events_to_kvm,
    fpu_from_kvm,
    fpu_to_kvm,
    lapic_to_kvm,
    msrs_to_load,
    new_msrs,
    regs_from_state,
    regs_to_state,
    sregs_from_state,
    sregs_to_state,
    xsave_join,
    xsave_split,
)
from pyemu.accel.kvm.system import CpuidEntry
from pyemu.hw.intc.api import InterruptController
from pyemu.system import log
from pyemu.target.x86.cpu_state import FXSAVE_SIZE, RFLAGS_IF, X86CpuState, XsaveComponents

_NO_ARG = ffi.cast("unsigned long", 0)

# The hot exits are decoded with struct from the mmapped page at offsets cffi computes from the declared
# kvm_run (cheaper than cffi attribute access: ~0.2 us instead of ~0.7 us per exit, measured). The
# formats are checked against the cffi field offsets in tests/kvm/test_kvm_abi.py.
_EXIT_REASON_AT = ffi.offsetof("struct kvm_run", "exit_reason")
_EXIT_DATA_AT = ffi.offsetof("struct kvm_run", "io")
_MMIO_DATA_AT = ffi.offsetof("struct kvm_run", "mmio", "data")
_EXIT_REASON = struct.Struct("<I")
_IO_EXIT = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_MMIO_EXIT = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
_KVM_EXIT_IO = abi.KVM_EXIT_IO
_KVM_EXIT_MMIO = abi.KVM_EXIT_MMIO
_KVM_EXIT_IO_OUT = abi.KVM_EXIT_IO_OUT
_RETRY_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN})
_APIC_BASE_ENABLE = 1 << 11  # IA32_APIC_BASE global enable
_APIC_SVR = 0xF0  # spurious-interrupt vector register; bit 8 = APIC software enable
_APIC_SVR_ENABLE = 1 << 8
_CLOSE_WAIT_S = 2.0

EoiHandler = Callable[[int], None]


class KvmVcpu:
    """Implements :class:`pyemu.accel.base.Vcpu` on a KVM vCPU fd.

    ``interrupts`` (optional) is a userspace interrupt controller whose interrupts reach the CPU as
    ExtINT (an 8259 PIC behind the in-kernel LAPIC's LINT0): they are injected with KVM_INTERRUPT when the
    guest can take them, and :meth:`kick` makes the loop look again. ``xsave``/``xcrs`` say whether the host
    has KVM_CAP_XSAVE/KVM_CAP_XCRS (state transfer then goes through the XSAVE area and XCR0)."""

    def __init__(
        self,
        fd: KvmFd,
        index: int,
        mmap_size: int,
        dispatcher: ExitDispatcher,
        *,
        cpuid: list[CpuidEntry],
        msr_indices: frozenset[int],
        interrupts: InterruptController | None = None,
        eoi_handler: Callable[[], EoiHandler | None] = lambda: None,
        xsave: bool = False,
        xcrs: bool = False,
    ) -> None:
        self.index = index
        self._has_xsave = xsave
        self._has_xcrs = xcrs
        self._fd = fd
        self._dispatcher = dispatcher
        self._interrupts = interrupts
        self._eoi_handler = eoi_handler
        self._msr_indices = msr_indices
        self._kicker = ThreadKicker()
        self._stop_requested = False
        self._nmi_requested = False
        self.run_entries = 0
        """Number of KVM_RUN calls so far; the halt probe compares it across one interval."""
        self.last_fatal_dump = ""
        """Register dump taken at the last fatal exit (also logged under ``-d guest_errors``)."""
        try:
            self._page = mmap.mmap(fd.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise KvmError("mmap(kvm_run)", exc.errno or 0, f"on vCPU {index}") from exc
        self._page_ref = ffi.from_buffer(self._page)
        self._run: Any = ffi.cast("struct kvm_run *", self._page_ref)
        self._regs = ffi.new("struct kvm_regs *")
        self._sregs = ffi.new("struct kvm_sregs *")
        self._mp = ffi.new("struct kvm_mp_state *")
        self._irq = ffi.new("struct kvm_interrupt *")
        self.set_cpuid(cpuid)
        self.cpuid = list(cpuid)

    # -- configuration --------------------------------------------------------------------------------
    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        raw = ffi.new(
            "char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2")
        )
        table = ffi.cast("struct kvm_cpuid2 *", raw)
        table.nent = len(entries)
        for i, entry in enumerate(entries):
            out = table.entries[i]
            out.function, out.index, out.flags = entry.function, entry.index, entry.flags
            out.eax, out.ebx, out.ecx, out.edx = entry.eax, entry.ebx, entry.ecx, entry.edx
        self._fd.ioctl(abi.KVM_SET_CPUID2, table)

    def tsc_khz(self) -> int:
        """The guest TSC rate KVM gives this vCPU (KVM_GET_TSC_KHZ)."""
        return self._fd.ioctl(abi.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        self._fd.ioctl(abi.KVM_SET_TSC_KHZ, khz)

    def guest_tsc(self) -> int:
        """The guest TSC now (IA32_TSC through KVM_GET_MSRS)."""
        msrs, _owner = new_msrs([MSR_IA32_TSC])
        self._fd.ioctl(abi.KVM_GET_MSRS, msrs)
        return int(msrs.entries[0].data)

    def set_guest_tsc(self, value: int) -> None:
        """Write IA32_TSC (KVM_SET_MSRS). KVM may treat a value within a second of what it expects as an
        attempt to synchronise vCPUs and keep its offset; :class:`~pyemu.accel.kvm.guest_tsc.KvmGuestTsc`
        prefers :meth:`set_tsc_offset` and checks the result either way."""
        msrs, _owner = new_msrs([MSR_IA32_TSC], [value & 0xFFFF_FFFF_FFFF_FFFF])
        self._set("KVM_SET_MSRS", abi.KVM_SET_MSRS, msrs, f"IA32_TSC = {value:#x}")

    def tsc_offset(self) -> int | None:
        """KVM's guest TSC offset (vCPU attribute KVM_VCPU_TSC_OFFSET), None where KVM lacks it."""
        value = ffi.new("uint64_t *")
        attr = self._tsc_offset_attr(value)
        try:
            self._fd.ioctl(abi.KVM_HAS_DEVICE_ATTR, attr)
            self._fd.ioctl(abi.KVM_GET_DEVICE_ATTR, attr)
        except KvmError:
            return None
        return int(value[0])

    def set_tsc_offset(self, offset: int) -> None:
        value = ffi.new("uint64_t *", offset & 0xFFFF_FFFF_FFFF_FFFF)
        self._set("KVM_SET_DEVICE_ATTR", abi.KVM_SET_DEVICE_ATTR, self._tsc_offset_attr(value),
                  f"TSC offset {offset:#x}")

    @staticmethod
    def _tsc_offset_attr(value: Any) -> Any:
        attr = ffi.new("struct kvm_device_attr *")
        attr.group = abi.KVM_VCPU_TSC_CTRL
        attr.attr = abi.KVM_VCPU_TSC_OFFSET
        attr.addr = int(ffi.cast("uintptr_t", value))
        return attr

    # -- architectural state ----------------------------------------------------------------------------
    def load_state(self, state: X86CpuState) -> None:
        """Load an :class:`X86CpuState`, in the order KVM needs: segments, control registers and APIC base
        (sregs) with the general registers; FPU/SSE and XCR0 (see :meth:`_put_fpu`); the LAPIC page (after
        the APIC base and CR8, which would otherwise overwrite its TPR); MSRs (TSC first, TSC-deadline
        last: it is relative to both the TSC and the LAPIC just loaded); pending events; the MP state last
        (it can depend on the events' SIPI vector). Parts the state did not capture (``None``) keep the
        vCPU's current values, except the MP state: without one the vCPU becomes runnable, so a halted vCPU
        or an AP still waiting for SIPI starts at ``state.rip`` (what a boot entry state wants)."""
        self._put_regs_sregs(state)
        self._put_fpu(state)
        if state.lapic is not None:
            self.set_lapic(state.lapic)
        self._put_msrs(state)
        if state.events is not None:
            events = ffi.new("struct kvm_vcpu_events *")
            events_to_kvm(state.events, events)
            self._set("KVM_SET_VCPU_EVENTS", abi.KVM_SET_VCPU_EVENTS, events, f"events {state.events}")
        mp_state = abi.KVM_MP_STATE_RUNNABLE if state.mp_state is None else MP_STATE_TO_KVM[state.mp_state]
        self._mp.mp_state = mp_state
        self._set("KVM_SET_MP_STATE", abi.KVM_SET_MP_STATE, self._mp, f"MP state {state.mp_state}")

    def save_state(self) -> X86CpuState:
        """Read the whole vCPU state back, every optional part filled. Call it while :meth:`run` is not
        running (after it returned): KVM completes a pending port/MMIO read only on re-entry, which
        ``Stopped`` already did. The MP state is read first because reading it makes KVM process a latched
        INIT/SIPI, which changes the registers read next."""
        state = X86CpuState()
        state.mp_state = MP_STATE_FROM_KVM.get(self.mp_state())
        self._fd.ioctl(abi.KVM_GET_REGS, self._regs)
        regs_to_state(self._regs, state)
        self._fd.ioctl(abi.KVM_GET_SREGS, self._sregs)
        sregs_to_state(self._sregs, state)
        indices = [i for i in SAVED_MSRS if i in self._msr_indices]
        msrs, _owner = new_msrs(indices)
        count = self._fd.ioctl(abi.KVM_GET_MSRS, msrs)
        for i in range(count):
            state.msrs[int(msrs.entries[i].index)] = int(msrs.entries[i].data)
        self._get_fpu(state)
        state.lapic = self.lapic()
        events = ffi.new("struct kvm_vcpu_events *")
        self._fd.ioctl(abi.KVM_GET_VCPU_EVENTS, events)
        state.events = events_from_kvm(events)
        return state

    def _get_fpu(self, state: X86CpuState) -> None:
        if self._has_xsave:
            area = ffi.new("struct kvm_xsave *")
            try:
                self._fd.ioctl(abi.KVM_GET_XSAVE, area)
            except KvmError as exc:
                # E.g. a guest with components past 4 KiB (AMX) needs KVM_GET_XSAVE2: keep x87/SSE.
                log.log("unimp", f"kvm: vCPU {self.index}: {exc}; saving x87/SSE registers only")
            else:
                state.fpu, state.xsave = xsave_split(bytes(ffi.buffer(area)), self._xcr0())
                return
        fpu = ffi.new("struct kvm_fpu *")
        self._fd.ioctl(abi.KVM_GET_FPU, fpu)
        state.fpu = fpu_from_kvm(fpu)

    def _put_fpu(self, state: X86CpuState) -> None:
        """FPU/SSE through KVM_SET_XSAVE whenever the host has it, even for a state without XSAVE
        components: KVM_SET_FPU only rewrites the legacy region of KVM's XSAVE buffer and leaves XSTATE_BV
        alone, so registers that were in their init state (measured: after the guest's FXRSTOR of init
        values) silently keep them. KVM_SET_FPU is the path for hosts without XSAVE only."""
        if state.fpu is None and state.xsave is None:
            return
        if not self._has_xsave:
            if state.xsave is not None:
                log.log("unimp", f"kvm: vCPU {self.index}: host KVM has no XSAVE; extended components dropped")
            if state.fpu is not None:
                fpu = ffi.new("struct kvm_fpu *")
                fpu_to_kvm(state.fpu, fpu)
                self._set("KVM_SET_FPU", abi.KVM_SET_FPU, fpu, f"fcw={state.fpu.fcw:#x} mxcsr={state.fpu.mxcsr:#x}")
            return
        area = ffi.new("struct kvm_xsave *")
        current = b""
        if state.fpu is None or state.xsave is None:
            self._fd.ioctl(abi.KVM_GET_XSAVE, area)
            current = bytes(ffi.buffer(area))
        components = state.xsave if state.xsave is not None else XsaveComponents(0, current[FXSAVE_SIZE:])
        ffi.memmove(area, xsave_join(state.fpu, components, current), XSAVE_AREA_SIZE)
        self._set("KVM_SET_XSAVE", abi.KVM_SET_XSAVE, area, f"XSTATE_BV={components.xstate_bv:#x}")
        if state.xsave is not None and self._has_xcrs:
            xcrs = ffi.new("struct kvm_xcrs *")
            xcrs.nr_xcrs = 1
            xcrs.xcrs[0].xcr = XCR_XCR0
            xcrs.xcrs[0].value = state.xsave.xcr0
            self._set("KVM_SET_XCRS", abi.KVM_SET_XCRS, xcrs, f"XCR0={state.xsave.xcr0:#x}")

    def _xcr0(self) -> int:
        if not self._has_xcrs:
            return 1  # x87 only: the architectural value without XSAVE
        xcrs = ffi.new("struct kvm_xcrs *")
        self._fd.ioctl(abi.KVM_GET_XCRS, xcrs)
        for i in range(min(int(xcrs.nr_xcrs), 16)):
            if xcrs.xcrs[i].xcr == XCR_XCR0:
                return int(xcrs.xcrs[i].value)
        return 1

    def _set(self, name: str, request: int, arg: Any, what: str) -> None:
        """A state-loading ioctl whose refusal is the state's fault: KvmStateError naming the part."""
        try:
            self._fd.ioctl(request, arg)
        except KvmError as exc:
            raise KvmStateError(exc.ioctl, exc.errno, f"vCPU {self.index} rejected {what}") from exc

    def _put_regs_sregs(self, state: X86CpuState) -> None:
        self._fd.ioctl(abi.KVM_GET_SREGS, self._sregs)  # keeps apic_base unless the state carries MSR 0x1B
        sregs_from_state(state, self._sregs)
        try:
            self._fd.ioctl(abi.KVM_SET_SREGS, self._sregs)
        except KvmError as exc:
            raise KvmStateError(
                exc.ioctl, exc.errno, f"vCPU {self.index} rejected segments/control registers "
                f"(cr0={state.cr0:#x} cr4={state.cr4:#x} efer={state.efer:#x})"
            ) from exc
        regs_from_state(state, self._regs)
        self._fd.ioctl(abi.KVM_SET_REGS, self._regs)

    def _put_msrs(self, state: X86CpuState) -> None:
        indices, values, unknown = msrs_to_load(state, self._msr_indices)
        for index in unknown:
            log.log("unimp", f"kvm: vCPU {self.index}: MSR {index:#x} is not supported by KVM, not restored")
        if not indices:
            return
        msrs, _owner = new_msrs(indices, values)
        done = self._fd.ioctl(abi.KVM_SET_MSRS, msrs)
        if done != len(indices):
            bad = indices[done]
            raise KvmStateError(
                "KVM_SET_MSRS", errno.EINVAL, f"vCPU {self.index}: MSR {bad:#x} = {values[done]:#x} refused"
            )

    def lapic(self) -> bytes:
        """The in-kernel LAPIC's 1 KiB register page (xAPIC layout)."""
        lapic = ffi.new("struct kvm_lapic_state *")
        self._fd.ioctl(abi.KVM_GET_LAPIC, lapic)
        return bytes(ffi.buffer(lapic))

    def set_lapic(self, page: bytes) -> None:
        lapic = ffi.new("struct kvm_lapic_state *")
        lapic_to_kvm(page, lapic)
        self._set("KVM_SET_LAPIC", abi.KVM_SET_LAPIC, lapic, "the LAPIC page")

    def mp_state(self) -> int:
        """KVM's raw MP state (``abi.KVM_MP_STATE_*``); :meth:`save_state` gives it as an MpState."""
        self._fd.ioctl(abi.KVM_GET_MP_STATE, self._mp)
        return int(self._mp.mp_state)

    def inject_nmi(self) -> None:
        """Thread-safe: an NMI for this vCPU (QMP ``inject-nmi``). ``KVM_NMI`` is a vCPU ioctl, which waits
        for the vCPU's mutex while it sits in ``KVM_RUN``; so, as QEMU's ``run_on_cpu``, the run loop
        issues it on the vCPU's own thread before the next entry, and a kick ends the current one."""
        self._nmi_requested = True
        run = self._run
        if run is None:
            return  # closed
        run.immediate_exit = 1
        self._kicker.kick()

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> Exit:
        self._kicker.enter()
        try:
            return self._run_loop()
        finally:
            self._kicker.leave()

    def _run_loop(self) -> Exit:
        run = self._run
        page = self._page
        fd = self._fd.fd
        ioctl = libc.ioctl
        dispatcher = self._dispatcher
        interrupts = self._interrupts
        kvm_run = abi.KVM_RUN
        read_reason = _EXIT_REASON.unpack_from
        read_io = _IO_EXIT.unpack_from
        read_mmio = _MMIO_EXIT.unpack_from
        while True:
            if self._nmi_requested:
                self._nmi_requested = False
                self._fd.ioctl(abi.KVM_NMI)
            if interrupts is not None:
                self._offer_external_interrupt(run, interrupts)
            self.run_entries += 1
            if ioctl(fd, kvm_run, _NO_ARG) < 0:
                err = ffi.errno
                if err not in _RETRY_ERRNOS:
                    raise KvmError("KVM_RUN", err, f"on vCPU {self.index}")
                # Clear before looking at the flags: a request arriving after this sets it again.
                run.immediate_exit = 0
                if self._stop_requested:
                    self._stop_requested = False
                    return Stopped()
                # Any interruption (halt probe, kick, stray signal) is a chance to notice a HLT with IF=0;
                # they are rare, so the two ioctls this costs do not matter.
                if self._halted_for_good():
                    return Halt()
                continue
            (reason,) = read_reason(page, _EXIT_REASON_AT)
            if reason == _KVM_EXIT_IO:
                direction, size, port, count, offset = read_io(page, _EXIT_DATA_AT)
                if direction == _KVM_EXIT_IO_OUT:
                    if count == 1:
                        dispatcher.io_out(port, size, int.from_bytes(page[offset : offset + size], "little"))
                    else:
                        data = page[offset : offset + size * count]
                        for i in range(0, size * count, size):
                            dispatcher.io_out(port, size, int.from_bytes(data[i : i + size], "little"))
                else:
                    mask = (1 << (8 * size)) - 1
                    if count == 1:
                        page[offset : offset + size] = (dispatcher.io_in(port, size) & mask).to_bytes(size, "little")
                    else:
                        page[offset : offset + size * count] = b"".join(
                            (dispatcher.io_in(port, size) & mask).to_bytes(size, "little") for _ in range(count)
                        )
            elif reason == _KVM_EXIT_MMIO:
                addr, data, length, is_write = read_mmio(page, _EXIT_DATA_AT)
                if is_write:
                    dispatcher.mmio_write(addr, length, int.from_bytes(data[:length], "little"))
                else:
                    value = dispatcher.mmio_read(addr, length) & ((1 << (8 * length)) - 1)
                    page[_MMIO_DATA_AT : _MMIO_DATA_AT + length] = value.to_bytes(length, "little")
            elif reason == abi.KVM_EXIT_IRQ_WINDOW_OPEN or reason == abi.KVM_EXIT_INTR:
                continue
            elif reason == abi.KVM_EXIT_IOAPIC_EOI:
                handler = self._eoi_handler()
                if handler is not None:
                    with dispatcher.lock:
                        handler(run.eoi.vector)
            else:
                return self._fatal_exit(reason)

    def _offer_external_interrupt(self, run: Any, interrupts: InterruptController) -> None:
        """ExtINT from a userspace PIC: inject when the guest can take it, else ask KVM to exit as soon as
        it can (KVM_EXIT_IRQ_WINDOW_OPEN)."""
        with self._dispatcher.lock:
            if not interrupts.interrupt_pending():
                run.request_interrupt_window = 0
                return
            if run.ready_for_interrupt_injection and run.if_flag:
                vector = interrupts.acknowledge_interrupt()
                if vector is not None:
                    self._irq.irq = vector
                    self._fd.ioctl(abi.KVM_INTERRUPT, self._irq)
                    if log.enabled("int"):
                        log.log("int", f"kvm: vCPU {self.index}: ExtINT vector {vector:#x}")
                run.request_interrupt_window = 1 if interrupts.interrupt_pending() else 0
            else:
                run.request_interrupt_window = 1

    def _halted_for_good(self) -> bool:
        """True when the vCPU sits in HLT that no maskable interrupt can end: IF=0, or IF=1 with its
        local APIC disabled (MSIs, IPIs and the LAPIC timer are then dropped) and no ExtINT controller.
        Only NMI, INIT or SMI could wake it, which the protocol counts as "nothing" (as the software CPU)."""
        if self.mp_state() != abi.KVM_MP_STATE_HALTED:
            return False
        self._fd.ioctl(abi.KVM_GET_REGS, self._regs)
        if not self._regs.rflags & RFLAGS_IF:
            return True
        if self._interrupts is not None:
            return False
        if not self._run.apic_base & _APIC_BASE_ENABLE:
            return True
        svr = int.from_bytes(self.lapic()[_APIC_SVR : _APIC_SVR + 4], "little")
        return not svr & _APIC_SVR_ENABLE

    def _fatal_exit(self, reason: int) -> Exit:
        """Turn the exits a guest cannot continue from into ``Shutdown`` (or ``Halt``), logging the
        registers under ``-d guest_errors`` so the report is readable without a traceback."""
        run = self._run
        name = abi.EXIT_NAMES.get(reason, f"exit reason {reason}")
        if reason == abi.KVM_EXIT_HLT:
            return Halt()
        if reason == abi.KVM_EXIT_SHUTDOWN:
            why = "triple fault"
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = int(run.system_event.type)
            why = abi.SYSTEM_EVENT_NAMES.get(kind, f"system event {kind}")
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            why = (
                "KVM could not enter the guest (hardware entry failure reason "
                f"{int(run.fail_entry.hardware_entry_failure_reason):#x})"
            )
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            why = self._describe_internal_error()
        else:
            why = f"unexpected KVM exit {name}"
        dump = self.register_dump()
        log.log("guest_errors", f"kvm: vCPU {self.index}: {why}\n{dump}")
        self.last_fatal_dump = dump
        return Shutdown(why)

    def _describe_internal_error(self) -> str:
        internal = self._run.internal
        sub = int(internal.suberror)
        ndata = min(int(internal.ndata), 16)
        data = [int(internal.data[i]) for i in range(ndata)]
        why = f"KVM internal error: {abi.INTERNAL_ERROR_NAMES.get(sub, f'suberror {sub}')}"
        self._fd.ioctl(abi.KVM_GET_REGS, self._regs)
        why += f" at rip {int(self._regs.rip):#x}"
        if sub == abi.KVM_INTERNAL_ERROR_EMULATION and ndata >= 2 and data[0] & 1:
            # struct emulation_failure: flags, then insn_size and up to 15 instruction bytes.
            raw = b"".join(word.to_bytes(8, "little") for word in data[1:4])
            size = min(raw[0], 15)
            why += f" (instruction bytes {raw[1 : 1 + size].hex(' ')})"
        elif data:
            why += f" (data {' '.join(f'{word:#x}' for word in data)})"
        return why

    def register_dump(self) -> str:
        """A QEMU-style register dump (``info registers`` layout, shortened)."""
        try:
            state = self.save_state()
        except KvmError as exc:
            return f"(registers unavailable: {exc})"
        r = state.regs
        lines = [
            f"RAX={r['rax']:016x} RBX={r['rbx']:016x} RCX={r['rcx']:016x} RDX={r['rdx']:016x}",
            f"RSI={r['rsi']:016x} RDI={r['rdi']:016x} RBP={r['rbp']:016x} RSP={r['rsp']:016x}",
            f"R8 ={r['r8']:016x} R9 ={r['r9']:016x} R10={r['r10']:016x} R11={r['r11']:016x}",
            f"R12={r['r12']:016x} R13={r['r13']:016x} R14={r['r14']:016x} R15={r['r15']:016x}",
            f"RIP={state.rip:016x} RFL={state.rflags:08x}",
        ]
        for name in ("cs", "ss", "ds", "es", "fs", "gs", "tr"):
            seg = getattr(state, name)
            lines.append(
                f"{name.upper():3}={seg.selector:04x} {seg.base:016x} {seg.limit:08x} type={seg.type:x} "
                f"dpl={seg.dpl} p={int(seg.present)} db={int(seg.db)} l={int(seg.l)}"
            )
        gdt, idt = state.gdt, state.idt
        lines.append(f"GDT={gdt.base:016x} {gdt.limit:08x}  IDT={idt.base:016x} {idt.limit:08x}")
        lines.append(f"CR0={state.cr0:08x} CR2={state.cr2:016x} CR3={state.cr3:016x} CR4={state.cr4:08x}")
        lines.append(f"EFER={state.efer:016x}")
        return "\n".join(lines)

    # -- other threads ----------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Thread-safe. The flag is set before ``immediate_exit``, and the loop clears ``immediate_exit``
        before reading the flag, so a request is never lost between two KVM_RUN calls."""
        self._stop_requested = True
        run = self._run
        if run is None:
            return  # closed
        run.immediate_exit = 1
        self._kicker.kick()

    def kick(self) -> None:
        """Thread-safe. Interrupts through the in-kernel LAPIC (MSIs, IPIs, its timer) wake the vCPU inside
        KVM by themselves; a kick is only needed for the ExtINT controller given at creation, so the loop
        re-reads it before entering the guest again."""
        run = self._run
        if self._interrupts is None or run is None:
            return
        run.immediate_exit = 1
        self._kicker.kick()

    def probe_halt(self, entries_seen: int) -> None:
        """Halt probe (see module doc): if the vCPU is still in the KVM_RUN call number ``entries_seen``,
        interrupt it so the loop checks for a HLT with IF=0. A signal that misses is retried next interval."""
        if self._kicker.running and self.run_entries == entries_seen:
            self._kicker.kick()

    @property
    def running(self) -> bool:
        return self._kicker.running

    def close(self) -> None:
        """Stop a running loop (waiting up to 2 s for it to leave), then release the page and the fd."""
        if self._fd.closed:
            return
        if self._kicker.running:
            self.request_stop()
            if not self._kicker.wait_idle(_CLOSE_WAIT_S):
                log.log("guest_errors", f"kvm: vCPU {self.index} did not stop; leaving its fd open")
                return
        self._run = None
        ffi.release(self._page_ref)
        self._page.close()
        self._fd.close()
