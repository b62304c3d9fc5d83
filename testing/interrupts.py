"""A tiny interrupt controller for guest-program tests (implements
:class:`~pyemu.hw.intc.api.InterruptController`).

Host code (a test, a timer thread) calls :meth:`FakeInterruptController.raise_vector`; the vector becomes
pending and the attached vCPU is kicked, exactly as a LAPIC does when an interrupt is accepted. The vCPU
acknowledges it (highest vector first, like a LAPIC's IRR) when the guest can take it. Every
acknowledgement is recorded so tests can count deliveries from the host side too.
"""

from __future__ import annotations

import heapq
import threading
from typing import Protocol


class _Kickable(Protocol):
    def kick(self) -> None: ...


class FakeInterruptController:
    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._pending: list[int] = []  # a heap of negated vectors: highest vector first
        self.acknowledged: list[int] = []
        self._vcpu: _Kickable | None = None

    def attach(self, vcpu: _Kickable) -> None:
        self._vcpu = vcpu

    def raise_vector(self, vector: int) -> None:
        if not 0x10 <= vector <= 0xFF:
            raise ValueError(f"interrupt vector {vector:#x} out of range")
        with self._lock:
            heapq.heappush(self._pending, -vector)
        if self._vcpu is not None:
            self._vcpu.kick()

    # InterruptController ------------------------------------------------------------------------------
    def interrupt_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def acknowledge_interrupt(self) -> int | None:
        with self._lock:
            if not self._pending:
                return None
            vector = -heapq.heappop(self._pending)
            self.acknowledged.append(vector)
            self._lock.notify_all()
            return vector

    # helpers for tests --------------------------------------------------------------------------------
    def wait_acknowledged(self, count: int, timeout: float) -> bool:
        """Block until ``count`` interrupts have been acknowledged in total (False on timeout)."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self.acknowledged) >= count, timeout)

    @property
    def pending(self) -> list[int]:
        with self._lock:
            return sorted((-v for v in self._pending), reverse=True)
