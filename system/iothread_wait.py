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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyemu.system.native import OptionalNative

CDEF = """
struct pyemu_native_fd {
    int32_t fd;
    int (*handle)(void *arg);
    void *arg;
};
int pyemu_iothread_wait(int epfd, const intptr_t *flags, int count, uint64_t spin_ns, int timeout_ms,
                        int *ready, int max_ready, uint64_t *waited_ns,
                        const struct pyemu_native_fd *native, int nnative, uint64_t *served);
"""
SOURCE = Path(__file__).with_name("iothread_wait.c")
MAX_READY = 64

NativeHandler = tuple[int, int]
"""``(address of int handle(void *arg), arg)``: C code that serves a descriptor's event inside the wait
(returns 1) or leaves it to the thread's Python handler (0), e.g. virtio-blk's leased queue (``blk_plane.c``)."""

_module = OptionalNative("iothread_wait", [SOURCE], CDEF, what="the I/O threads' C wait",
                         without="I/O threads neither spin nor defer wake-ups")


class CWait:
    """The C wait for one I/O thread (each thread needs its own: the buffers are per call site).

    ``wait(epoll_fd, flags, spin_ns)``: store 1 into each 32-bit flag (given by address), spin over the epoll
    set for up to ``spin_ns``, then sleep until one of its descriptors is ready; returns the ready descriptors
    (empty after a signal) and the nanoseconds the wait took. Descriptors with a native handler
    (:meth:`set_native`) are served in C when the handler takes them, and are then not returned."""

    def __init__(self, module: Any) -> None:
        self._wait = module.lib.pyemu_iothread_wait
        self._ffi = ffi = module.ffi
        self._ready = ffi.new("int[]", MAX_READY)
        self._waited = ffi.new("uint64_t *")
        self._served = ffi.new("uint64_t *")
        self._native = ffi.NULL
        self._nnative = 0

    def set_native(self, handlers: dict[int, NativeHandler]) -> None:
        """The descriptors whose events C handlers serve first (replaces the last table; call it on the
        waiting thread, between waits)."""
        table = self._ffi.new("struct pyemu_native_fd[]", max(len(handlers), 1))
        for entry, (fd, (function, arg)) in zip(table, handlers.items()):
            entry.fd = fd
            entry.handle = self._ffi.cast("int (*)(void *)", function)
            entry.arg = self._ffi.cast("void *", arg)
        self._native, self._nnative = table, len(handlers)

    @property
    def served_natively(self) -> int:
        """Events the native handlers served so far."""
        return int(self._served[0])

    def __call__(self, epoll_fd: int, flags: Sequence[int], spin_ns: int) -> tuple[list[int], int]:
        ready = self._ready
        count = self._wait(epoll_fd, list(flags), len(flags), spin_ns, -1, ready, MAX_READY, self._waited,
                           self._native, self._nnative, self._served)
        return (list(ready[0:count]) if count > 0 else []), int(self._waited[0])


def waiter() -> CWait | None:
    """The C wait for one I/O thread, or None when the module cannot be built."""
    module = _module.get()
    return CWait(module) if module is not None else None
