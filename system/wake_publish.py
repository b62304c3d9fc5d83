"""Wake-up flags that an I/O thread sets as it goes to wait, after it has released the GIL.

Why: a device handler on an I/O thread that wakes a vCPU spinning with the GIL released (the software
CPU's halt polling, :mod:`pyemu.accel.tcg.halt_poll`) would end that spin while the handler's thread still
holds the GIL. The vCPU then blocks in the GIL's own wait, and is woken across CPUs when the I/O thread lets
the GIL go on its way back to ``epoll_wait`` -- on this project's hosts (themselves VMs) that wake-up took
~20 µs per interrupt: from the I/O thread's return to its loop to the vCPU's first Python after the spin,
22-29 µs median over ~7,000 4 KiB virtio-blk reads per session, 8-11 µs with the flags published as
here (2026-12-06). So a handler leaves the flags to its thread (:func:`publish_on_sleep`), and the thread
stores them in C with the GIL released, right before it waits (:mod:`pyemu.system.iothread_wait`): the vCPU
finds the GIL free.

Kept apart from :mod:`pyemu.system.iothread` so that the software CPU can ask without importing the I/O
thread machinery into a boot that has no device needing it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

_thread_local = threading.local()


def take_flags_on_this_thread() -> list[int]:
    """For an I/O thread whose wait stores flags (:mod:`pyemu.system.iothread_wait`): the list its handlers'
    flags collect in (the thread publishes and clears it)."""
    pending: list[int] = []
    _thread_local.pending = pending
    return pending


def publish_on_sleep(flags: Sequence[int]) -> bool:
    """From a handler running on an I/O thread: have the thread set these 32-bit flags (addresses) to 1
    once it has released the GIL to wait for its next event. False, with nothing done, on any other thread:
    the caller then sets them itself."""
    pending: list[int] | None = getattr(_thread_local, "pending", None)
    if pending is None:
        return False
    pending.extend(flags)
    return True
