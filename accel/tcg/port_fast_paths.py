"""Port accesses the software CPU serves without calling Python, as the devices allow
(:class:`pyemu.system.bus.RegisterFastPath`): the C table the I/O guards read, and the watch that keeps
posted writes from waiting on a vCPU that stopped touching ports.

How it fits together: a device publishes, for a one-byte register, the value reads return while they have no
side effect and whether one-byte writes may be posted; the port bus hands that to :meth:`PortFastPaths.publish`,
which fills ``struct pyemu_port_fast`` (io_guard.c). Each vCPU's guard then answers such a read itself and
queues such a write in its ring, delivering the queue (:meth:`pyemu.accel.tcg.io_guard.IoGuard.flush_posted`,
``ExitDispatcher.io_out_burst``) before the vCPU's next port access of another kind, when the guest polls (a
second fast read in a row), when the ring is full, and when the run ends. A guest that posts and then only
computes would keep its bytes queued until its run ends; :class:`PostedWriteWatch` ends such a run after
``PERIOD_S``, as a UART's byte shows up at once on hardware.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Protocol

FAST_SLOTS = 8
"""Ports with fast paths the C guard serves (io_guard.c ``IO_FAST_SLOTS``); more go to Python."""


class PortFastPaths:
    """The VM's port fast paths in C (``struct pyemu_port_fast``), shared by every vCPU's guard.
    :meth:`publish` is the sink the port bus feeds (``Bus.bind_fast_paths``)."""

    def __init__(self, module: Any) -> None:
        self._ffi: Any = module.ffi
        self.state: Any = self._ffi.new("struct pyemu_port_fast *")
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()  # devices publish from their own threads (vCPU, chardev I/O)

    def publish(self, port: int, read_value: int | None, posted_writes: bool) -> None:
        """Port ``port`` now reads as ``read_value`` (None: the read must reach the device), and one-byte
        writes to it may (``posted_writes``) wait in the vCPUs' queues."""
        with self._lock:
            state = self.state
            slot = self._slots.get(port)
            if slot is None:
                if (read_value is None and not posted_writes) or len(self._slots) >= FAST_SLOTS:
                    return  # nothing to do, or no room: the device keeps serving every access
                slot = len(self._slots)
                state.port[slot] = port   # the slot is complete before count lets the guard see it
                state.read_value[slot] = -1
                state.posted[slot] = 0
                state.count = slot + 1
                self._slots[port] = slot
            state.read_value[slot] = -1 if read_value is None else read_value
            state.posted[slot] = 1 if posted_writes else 0

    @property
    def statistics(self) -> dict[str, int]:
        """Reads answered and writes posted without a call into Python (all vCPUs)."""
        return {"read_hits": int(self.state.read_hits), "posted_writes": int(self.state.posted_writes)}


class PostingVcpu(Protocol):
    @property
    def posted_pending(self) -> int: ...

    def preempt(self) -> None: ...


def review_posted(vcpus: Iterable[PostingVcpu], seen: dict[int, int]) -> int:
    """One look of :class:`PostedWriteWatch`: preempt each vCPU whose queue is as long as at the last look
    (``seen``, by identity, updated here) and not empty; returns how many were."""
    preempted = 0
    for vcpu in vcpus:
        pending = vcpu.posted_pending
        if pending and seen.get(id(vcpu)) == pending:
            vcpu.preempt()
            preempted += 1
        seen[id(vcpu)] = pending
    return preempted


class PostedWriteWatch:
    """A thread that ends the run of a vCPU whose posted writes have waited a whole period without the
    queue moving (the run's end delivers them): the bound on how late a posted byte reaches its device."""

    PERIOD_S = 0.01

    def __init__(self, vcpus: Callable[[], Iterable[PostingVcpu]]) -> None:
        self._vcpus = vcpus
        self._stop = threading.Event()
        self.preemptions = 0
        self._thread = threading.Thread(target=self._loop, name="posted-write-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        seen: dict[int, int] = {}
        while not self._stop.wait(self.PERIOD_S):
            self.preemptions += review_posted(list(self._vcpus()), seen)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
