"""The I/O threads' wait for their next event, in C (``iothread_wait.c``, built at first use like the other
small C modules: :mod:`pyemu.system.native`).

Why C: two things must happen with the GIL released. The wake-up flags a handler left for a spinning
vCPU (:mod:`pyemu.system.wake_publish`) are stored only once the GIL is free, so the vCPU does not end its
spin only to block in the GIL's own wait; and the thread may spin over its epoll set before it sleeps
(:class:`~pyemu.system.poll_window.PollWindow`, QEMU's iothread ``poll-max-ns``), which in Python would
hold the GIL the vCPU threads need. Without the C module (no compiler) the thread waits in
:mod:`selectors` and does neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pyemu.system.native import OptionalNative

CDEF = """
int pyemu_iothread_wait(int epfd, const intptr_t *flags, int count, uint64_t spin_ns, int timeout_ms,
                        int *ready, int max_ready, uint64_t *waited_ns);
"""
SOURCE = Path(__file__).with_name("iothread_wait.c")
MAX_READY = 64

Waiter = Callable[[int, Sequence[int], int], tuple[list[int], int]]
"""``wait(epoll_fd, flags, spin_ns)``: store 1 into each 32-bit flag (given by address), spin over the epoll
set for up to ``spin_ns``, then sleep until one of its descriptors is ready; returns the ready descriptors
(empty after a signal) and the nanoseconds the wait took."""

_module = OptionalNative("iothread_wait", [SOURCE], CDEF, what="the I/O threads' C wait",
                         without="I/O threads neither spin nor defer wake-ups")


def waiter() -> Waiter | None:
    """The C wait for one I/O thread (each thread needs its own: the buffers are per call site), or None
    when the module cannot be built."""
    module = _module.get()
    if module is None:
        return None
    wait = module.lib.pyemu_iothread_wait
    ffi = module.ffi
    ready = ffi.new("int[]", MAX_READY)
    waited = ffi.new("uint64_t *")

    def wait_for_events(epoll_fd: int, flags: Sequence[int], spin_ns: int) -> tuple[list[int], int]:
        count = wait(epoll_fd, list(flags), len(flags), spin_ns, -1, ready, MAX_READY, waited)
        return (list(ready[0:count]) if count > 0 else []), int(waited[0])
    return wait_for_events
