"""The software CPU (``-accel tcg``): Unicorn 2.1.4 engines made to behave like x86-64 CPUs.

Unicorn executes guest code fast (a few hundred M instructions/s) but leaves the parts an operating
system depends on to the embedder; this package supplies them:

========================  ============================================================================
``accel``                 :class:`TcgAccelerator` (the Accelerator protocol), one engine per vCPU
``vcpu``                  :class:`TcgVcpu`: run loop, HLT, kicks and stops, interrupt injection
``memory_map``            guest RAM zero-copy (``mem_map_ptr``), every other address a device window
``io_hooks``              IN/OUT to the PIO bus, CPUID from the machine's table
``traps``                 exceptions, ``INT n``, #UD, SYSCALL/SYSENTER hooks -> delivery
``delivery``              IDT delivery (64-bit, 32-bit protected, real mode), #DF/triple fault
``paging``/``physmem``    the vCPU's own linear and physical accesses (with #PF error codes)
``syscall``               SYSCALL/SYSENTER semantics (Unicorn makes both no-ops)
``segments``              descriptors, QEMU segment caches and hflags (CPL, code size, long mode)
``calibration``           where those live in Unicorn's CPU-state blob (probed, not hard-coded)
``context``               typed access to that blob
``block_gate`` (+ ``.c``) the C block hook: precise stops, the interrupt window, PAUSE-spin yields
``tlb_fill`` (+ ``.c``)   the C TLB-fill hook: fast stores, and code coherence between the engines
``scheduler``             round-robin turns: one engine of a VM runs at a time (guest atomics stay atomic)
``code_cache``            dropping stale translations after RAM was written behind the engine
``dirty_log``             live migration's dirty-page log, fed by the TLB-fill hook
``state_io``/``msrs``     X86CpuState in and out; what RDMSR/WRMSR can and cannot do here
``engine_*``              pyemu's patched libunicorn: the patches, its build, choosing it, what it delivers itself
========================  ============================================================================

Known limits (measured on 2.1.4, see the modules): RDMSR/WRMSR are not interceptable (no x2APIC,
TSC-deadline, kvmclock); 8-byte MMIO accesses arrive as two 4-byte accesses; instruction fetch from device
memory shuts the vCPU down; translated code is not kept coherent with RAM written outside the
engine unless :meth:`TcgAccelerator.invalidate_code` is called (device DMA; between the vCPUs of an SMP
guest the TLB-fill hook does it); vCPUs take turns on one host thread at a time (QEMU's
``-accel tcg,thread=single``), because Unicorn's atomics are not host-atomic; NMIs are delivered without
NMI blocking; no task gates or virtual-8086 mode.
"""

from pyemu.accel.tcg.engine_library import select_engine_library
from pyemu.accel.tcg.errors import EngineBuildError

# Before any module of this package imports unicorn (which loads its library once): pyemu's build when
# present. A bad PYEMU_UNICORN is reported when the software CPU starts, not as an import traceback.
ENGINE_LIBRARY_ERROR: EngineBuildError | None = None
try:
    ENGINE_LIBRARY = select_engine_library()
except EngineBuildError as _exc:
    ENGINE_LIBRARY, ENGINE_LIBRARY_ERROR = "pypi", _exc
