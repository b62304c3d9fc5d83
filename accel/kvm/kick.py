"""Getting a vCPU thread out of ``KVM_RUN`` from another thread.

The mechanism (the one QEMU uses): set ``kvm_run.immediate_exit`` and send the vCPU thread a signal with
``pthread_kill``. The signal interrupts a vCPU that is inside ``KVM_RUN`` (running guest code or halted in
the kernel), which then returns ``EINTR``; ``immediate_exit`` covers the window where the thread is about
to enter ``KVM_RUN`` and would miss the signal, because KVM checks it on entry and returns ``EINTR`` at
once (after completing a pending port/MMIO read, so the guest state stays consistent).

The signal is SIGUSR1 with a Python-level no-op handler. Why a handler at all: a signal whose disposition
is "ignore" never interrupts a system call, and the default action of SIGUSR1 kills the process. Python
installs handlers only from the main thread and without SA_RESTART, and its C-level handler only sets a
flag, so it is safe to receive on the vCPU thread; the no-op Python part later runs on the main thread.
If the application already has a Python handler for SIGUSR1 it is kept: any handler interrupts KVM_RUN.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from pyemu.accel.base import AcceleratorUnavailable

KICK_SIGNAL = signal.SIGUSR1


def _ignore_kick(signum: int, frame: FrameType | None) -> None:
    """The vCPU kick carries no message: the flags next to ``immediate_exit`` say what is wanted."""


def install_kick_handler() -> None:
    """Make sure SIGUSR1 has a handler (see module doc); must run on the main thread the first time."""
    current = signal.getsignal(KICK_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise AcceleratorUnavailable(
            "KVM accelerator: the vCPU kick signal (SIGUSR1) has no handler and one can only be installed "
            "from the main thread; create the first KVM accelerator on the main thread"
        )
    signal.signal(KICK_SIGNAL, _ignore_kick)


class ThreadKicker:
    """Remembers which thread is inside a vCPU's run loop and signals it on request. The lock makes sure
    the thread id is still valid when the signal is sent (signalling a finished thread is undefined)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._idle = threading.Condition(self._lock)

    def enter(self) -> None:
        with self._lock:
            self._thread = threading.get_ident()

    def leave(self) -> None:
        with self._lock:
            self._thread = None
            self._idle.notify_all()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def kick(self) -> None:
        with self._lock:
            thread = self._thread
            if thread is not None and thread != threading.get_ident():
                signal.pthread_kill(thread, KICK_SIGNAL)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no thread is in the run loop; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._thread is None, timeout)
