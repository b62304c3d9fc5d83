"""The engine's physical address space: guest RAM zero-copy, everything else a device window.

RAM: every :class:`~pyemu.system.memory.GuestMemory` region is mapped with ``uc.mem_map_ptr`` onto the
shared memfd mapping, so the guest, device models (through memoryviews) and KVM would all see the same
host pages.

Devices: all non-RAM physical space below 2^40 (the 40 physical address bits the CPU reports in CPUID
0x80000008, which is also what the engine's page walk allows) is covered by ``uc.mmio_map`` windows whose
callbacks call the dispatcher with the absolute guest-physical address; unassigned addresses read as
all-ones through the bus. Mapping a hole costs nothing up front (QEMU creates an I/O memory region, no
allocation); measured: mapping [RAM end, 2^40) takes ~50 µs.

Deliberately no ``UC_HOOK_MEM_*_UNMAPPED`` hook (not even as a fallback): Unicorn 2.1.4 counts any memory
hook as "installed" in ``notdirty_write`` and then never marks a written page dirty, so every guest store
to RAM takes the slow path through ``flatview_translate``/``tb_invalidate_phys_page``. Measured: with such
a hook, decompressing Debian's bzImage took ~28 s instead of ~4 s (gdb samples all in
``helper_le_st*_mmu`` -> ``notdirty_write``). The windows cover the whole physical address space the CPU
can generate, so no access is unmapped.

Measured Unicorn limits, documented for device authors: an 8-byte guest access to a device window arrives
as two 4-byte accesses (low dword first), because Unicorn's MMIO regions use QEMU's default maximum access
size of 4; instruction fetches from a device window fail with UC_ERR_FETCH_PROT (the vCPU turns that into
``Shutdown``).
"""

from __future__ import annotations

import ctypes
from typing import Any

from unicorn import UC_PROT_ALL, Uc, UcError

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.tcg.block_gate import native_function
from pyemu.accel.tcg.errors import EngineError
from pyemu.accel.tcg.mmio_notify import MmioNotifiers
from pyemu.system.memory import GuestMemory

PHYS_ADDRESS_LIMIT = 1 << 40


class DeviceWindow:
    """MMIO callbacks for one window starting at ``base`` (Unicorn passes offsets into the window).

    No ``uc.emu_stop()`` here, even when the access made the machine ask for a stop: PyPI's Unicorn 2.1.4
    checks for a stop request after every guest load and store and leaves by putting RIP back at the
    accessing instruction, so the device access ran again on resume (measured: a write during which a stop
    was requested repeated at every resume, forever). The block gate stops at the next block start."""

    __slots__ = ("base", "_dispatcher")

    def __init__(self, base: int, dispatcher: ExitDispatcher) -> None:
        self.base = base
        self._dispatcher = dispatcher

    def read(self, _uc: Uc, offset: int, size: int, _user: object) -> int:
        return self._dispatcher.mmio_read(self.base + offset, size)

    def write(self, _uc: Uc, offset: int, size: int, value: int, _user: object) -> None:
        self._dispatcher.mmio_write(self.base + offset, size, value)


def ram_holes(memory: GuestMemory, limit: int = PHYS_ADDRESS_LIMIT) -> list[tuple[int, int]]:
    """(start, size) of every gap between RAM regions below ``limit``."""
    holes = []
    cursor = 0
    for region in memory.regions:
        if region.gpa > cursor:
            holes.append((cursor, min(region.gpa, limit) - cursor))
        cursor = max(cursor, region.end)
    if cursor < limit:
        holes.append((cursor, limit - cursor))
    return [(start, size) for start, size in holes if size > 0]


class LocalEoi:
    """This vCPU's local APIC EOI register served in C by the window holding it (``pyemu_mmio_write``).

    Why: Linux writes it at the end of every interrupt handler, and through the window's Python callback
    each write cost the vCPU the GIL and ~6 µs of the model's Python (measured 2026-12-07 with virtio-blk
    1 MiB reads, 1.17 interrupts per request; more where the I/O thread held the GIL at that moment). The
    APIC's C EOI (:mod:`pyemu.hw.intc.apic_core`) ends an edge-triggered vector and says whether another
    is deliverable; the window then flags the vCPU as :meth:`BlockGate.signal_interrupt` does. Anything
    else (a level-triggered vector, a PIC passed through) goes to the model's Python, as before."""

    def __init__(self, ffi: Any, native: tuple[int, int, int], wake_flags: tuple[int, int]) -> None:
        function, core, self.address = native
        self.state: Any = ffi.new("struct pyemu_mmio_eoi *")
        self.state.addr = self.address
        self.state.eoi = ffi.cast("int (*)(void *)", function)
        self.state.core = ffi.cast("void *", core)
        self.state.irq_pending = ffi.cast("int32_t *", wake_flags[0])
        self.state.attention = ffi.cast("int32_t *", wake_flags[1])

    @property
    def hits(self) -> int:
        """EOI writes served in C."""
        return int(self.state.hits)


class PhysicalMap:
    """Maps RAM and device windows into one engine and keeps the window callbacks alive. With ``notifiers``
    the windows' writes pass through the VM's ioeventfd table first (:mod:`pyemu.accel.tcg.mmio_notify`),
    and with ``eoi`` (which needs them) the window holding this vCPU's local APIC EOI register serves it
    in C (:class:`LocalEoi`)."""

    def __init__(self, uc: Uc, memory: GuestMemory, dispatcher: ExitDispatcher,
                 notifiers: MmioNotifiers | None = None, eoi: LocalEoi | None = None) -> None:
        self._uc = uc
        self._dispatcher = dispatcher
        self._notifiers = notifiers
        self.eoi = eoi if notifiers is not None else None
        self.windows: list[DeviceWindow] = []
        self._keep: list[Any] = []  # C structs and ctypes callbacks the engine points at
        try:
            for region in memory.regions:
                uc.mem_map_ptr(region.gpa, region.size, UC_PROT_ALL, memory.host_address(region))
            for start, size in ram_holes(memory):
                self._map_window(start, size)
        except UcError as exc:
            raise EngineError(f"cannot map guest physical memory: {exc}", operation="mem_map") from exc

    def _map_window(self, start: int, size: int) -> None:
        window = DeviceWindow(start, self._dispatcher)
        if self._notifiers is None:
            self._uc.mmio_map(start, size, window.read, None, window.write, None)
        else:
            self._map_notifying_window(window, start, size, self._notifiers)
        self.windows.append(window)

    def _map_notifying_window(self, window: DeviceWindow, start: int, size: int,
                              notifiers: MmioNotifiers) -> None:
        """``uc_mmio_map`` with the C callbacks in front of ``window.read`` and ``window.write``. The Python
        callbacks are wrapped as the binding's own ``mmio_map`` wraps them (an exception is kept and
        ``emu_start`` raises it)."""
        from unicorn.unicorn_py3.unicorn import MMIO_READ_CFUNC, MMIO_WRITE_CFUNC, uccallback, uclib

        binding: Any = self._uc
        py_read = uccallback(binding, MMIO_READ_CFUNC)(window.read)
        py_write = uccallback(binding, MMIO_WRITE_CFUNC)(window.write)
        ffi = notifiers.module.ffi
        state = ffi.new("struct pyemu_mmio_window *")
        state.base = start
        state.notify = notifiers.state
        state.py_write = ffi.cast("void (*)(void *, uint64_t, unsigned, uint64_t, void *)",
                                  ctypes.cast(py_write, ctypes.c_void_p).value)
        state.py_read = ffi.cast("uint64_t (*)(void *, uint64_t, unsigned, void *)",
                                 ctypes.cast(py_read, ctypes.c_void_p).value)
        if self.eoi is not None and start <= self.eoi.address < start + size:
            state.eoi = self.eoi.state
        self._keep.extend((py_read, py_write, state))
        user = int(ffi.cast("uintptr_t", state))
        status = uclib.uc_mmio_map(binding._uch, start, size,
                                   native_function(notifiers.module, "pyemu_mmio_read"), user,
                                   native_function(notifiers.module, "pyemu_mmio_write"), user)
        if status != 0:
            raise UcError(status)
