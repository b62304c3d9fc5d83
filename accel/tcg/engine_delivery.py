"""Page faults and SYSCALL done by the engine itself, inside the run, on pyemu's libunicorn.

Why: Unicorn never delivers an exception. It hands every one to the ``UC_HOOK_INTR`` hooks, and pyemu's
(:mod:`pyemu.accel.tcg.traps`) pulls the CPU state, walks the IDT in Python and pushes the frame. For a
page fault it was worse: the TLB-fill hook (``tlb_fill.c``) leaves a faulting access to the engine's own
MMU by failing the fill, which ended ``emu_start``; the vCPU re-ran the instruction under Unicorn's MMU,
which raised the #PF into the Python hook. A Linux boot takes ~1.3 k page faults (its user space: fork,
exec, first touches), each ~50 µs that way. SYSCALL is no better: Unicorn's ``helper_syscall`` only
calls the hooks, so each of a boot's ~750 system calls pulled, computed and pushed the CPU state in
Python (:mod:`pyemu.accel.tcg.syscall`, ~35 µs).

pyemu's libunicorn (``engine_patches.py``: ``native-event-*``, ``fill-fallback-in-run``) lets QEMU do what
it does in QEMU: the CPU's MMU fills the entry or raises the #PF within the same run, and QEMU's
``x86_cpu_do_interrupt`` delivers the chosen vectors through the guest's IDT (long, protected and real
mode, IST, a fault while pushing the frame escalating to #DF as QEMU's ``check_exception`` decides);
SYSCALL in IA-32e mode loads RCX, R11, RFLAGS, CS, SS and RIP as the instruction does (written from the
SDM for the engine, as :func:`pyemu.accel.tcg.syscall.syscall_entry` is for the hook).

When the hooks still see a #PF or a SYSCALL: while ``-d int`` logs deliveries (the log is Python's), after
the vCPU recorded a shutdown; a #PF also when CR4 changed since the block gate last looked (the CR4 guard may have to
replace the fault with the #GP of a refused ``MOV to CR4``, see :mod:`pyemu.accel.tcg.cr4_guard`). Other
vectors always go to the hooks, and so does SYSCALL outside IA-32e mode or with EFER.SCE clear. PyPI's
library has none of this: everything stays as described in
:mod:`pyemu.accel.tcg.traps`.
"""

from __future__ import annotations

import ctypes
from typing import Any

from pyemu.accel.tcg.delivery import PF
from pyemu.accel.tcg.errors import EngineError

ENGINE_VECTORS = 1 << PF
"""Vectors the engine delivers itself (bit n: vector n)."""

FILL_IN_RUN = 1
"""``uc_pyemu_native_events`` flag: a TLB entry the fill hook hands over is filled (or faults) in the run."""
ENGINE_SYSCALL = 2
"""``uc_pyemu_native_events`` flag: SYSCALL in IA-32e mode is the engine's."""
FILL_WITHOUT_STATE_RESTORE = 4
"""``uc_pyemu_native_events`` flag: a TLB fill calls the hook without restoring RIP and the lazy flags
first (the restore looked the running block up at each of ~720k fills of a Linux boot). Only for a hook
that reads its registers in place (:meth:`pyemu.accel.tcg.tlb_fill.TlbFill.read_registers_in_place`):
``uc_reg_read`` of RFLAGS computes the arithmetic flags from the lazy state, which between restores is
stale, and came back with bits such as VM set (a 32-bit guest's stores were then walked as user
accesses; tests/migration/test_migration_precopy.py's dirty log caught it)."""


class EngineDelivery:
    """Switches one engine's own delivery on and off (cheap: two stores in the engine)."""

    def __init__(self, library: ctypes.CDLL, uc_handle: Any, *, fill_without_restore: bool = False) -> None:
        """``fill_without_restore``: the engine's TLB-fill hook reads no lazily kept state
        (:data:`FILL_WITHOUT_STATE_RESTORE`)."""
        self._set = getattr(library, "uc_pyemu_native_events", None)
        self._fill_flags = FILL_IN_RUN | (FILL_WITHOUT_STATE_RESTORE if fill_without_restore else 0)
        self._count = getattr(library, "uc_pyemu_native_delivered", None)
        self._handle = uc_handle
        self._on: bool | None = None
        if self._set is not None and self._count is not None:
            self._set.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32]
            self._set.restype = ctypes.c_int
            self._count.argtypes = [ctypes.c_void_p]
            self._count.restype = ctypes.c_uint64

    def use(self, on: bool) -> None:
        """Let the engine deliver :data:`ENGINE_VECTORS` and run SYSCALL (True), or leave every exception
        and SYSCALL to the hooks (False). Either way a TLB entry the fill hook hands over is filled (or
        faults) within the run."""
        if on == self._on or self._set is None:
            return
        status = self._set(self._handle, ENGINE_VECTORS if on else 0,
                           self._fill_flags | (ENGINE_SYSCALL if on else 0))
        if status != 0:
            raise EngineError(f"uc_pyemu_native_events failed with error {status}", operation="ctl")
        self._on = on

    @property
    def delivered(self) -> int:
        """Exceptions and SYSCALLs the engine did itself since it was made."""
        return int(self._count(self._handle)) if self._count is not None else 0
