"""Which vCPU the current thread is running, for devices every CPU sees at one address.

The xAPIC register page sits at 0xfee00000 for every CPU, yet each CPU reaches its own local APIC there.
Under the software CPU the page is a userspace device on the shared MMIO bus, and an MMIO access is
dispatched on the thread of the vCPU that made it; so the board's vCPU threads record their index here
and the page's device asks. A thread that is no vCPU (the main thread, the timer thread, a test) is
treated as CPU 0, the boot processor, which is also what a single-CPU board needs.
"""

from __future__ import annotations

import threading

_state = threading.local()


def set_current_cpu(index: int) -> None:
    """Called once by each vCPU thread before it runs guest code."""
    _state.index = index


def current_cpu() -> int:
    """The index of the vCPU running on this thread (0 on threads that run no vCPU)."""
    return getattr(_state, "index", 0)
