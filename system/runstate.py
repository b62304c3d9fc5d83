"""The VM run-state machine shared by the main loop, the CLI and QMP.

States and the transitions between them follow QEMU's RunState (a subset): a VM is created in PRELAUNCH
(``-S`` keeps it there), RUNNING while vCPUs execute, PAUSED when stopped by the user, SHUTDOWN once the
guest or the host asked to end it, INTERNAL_ERROR when the accelerator cannot continue (or its vCPUs would
not stop), GUEST_PANICKED when the guest reported a panic (pvpanic). A reset of a stopped VM leaves it
stopped in PRELAUNCH, as QEMU 7.2 does (measured: ``stop``
then ``system_reset`` gives status ``prelaunch``; ``cont`` runs it). An invalid transition is a
programming error and raises :class:`RunStateError`.
"""

from __future__ import annotations

import enum
import threading
from typing import Callable

from pyemu.errors import PyemuError


class RunState(enum.Enum):
    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"
    GUEST_PANICKED = "guest-panicked"
    INMIGRATE = "inmigrate"
    """Started with ``-incoming``: waiting for (or loading) a VM-state stream; nothing has run."""
    POSTMIGRATE = "postmigrate"
    """The VM's state was saved by ``migrate`` and the VM stopped; ``cont`` runs it again (as QEMU)."""


class ShutdownCause(enum.Enum):
    """Why a VM stopped or reset (QEMU's ShutdownCause names)."""

    HOST_ERROR = "host-error"
    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_SIGNAL = "host-signal"
    HOST_QMP_SYSTEM_RESET = "host-qmp-system-reset"
    HOST_UI = "host-ui"
    GUEST_SHUTDOWN = "guest-shutdown"
    GUEST_RESET = "guest-reset"
    GUEST_PANIC = "guest-panic"
    TRIPLE_FAULT = "triple-fault"
    DEBUG_EXIT = "debug-exit"


_ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.PRELAUNCH: frozenset({RunState.RUNNING, RunState.PAUSED, RunState.SHUTDOWN, RunState.INMIGRATE,
                                   RunState.POSTMIGRATE}),
    RunState.RUNNING: frozenset({RunState.PAUSED, RunState.SHUTDOWN, RunState.INTERNAL_ERROR,
                                 RunState.GUEST_PANICKED, RunState.POSTMIGRATE}),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.SHUTDOWN, RunState.PRELAUNCH,  # reset
                                RunState.POSTMIGRATE}),
    RunState.INMIGRATE: frozenset({RunState.RUNNING, RunState.PAUSED, RunState.PRELAUNCH, RunState.SHUTDOWN}),
    RunState.POSTMIGRATE: frozenset({RunState.RUNNING, RunState.PAUSED, RunState.SHUTDOWN, RunState.PRELAUNCH}),
    RunState.SHUTDOWN: frozenset({RunState.RUNNING, RunState.PAUSED, RunState.PRELAUNCH}),  # reset, as QEMU
    RunState.INTERNAL_ERROR: frozenset({RunState.PAUSED, RunState.SHUTDOWN, RunState.PRELAUNCH}),
    RunState.GUEST_PANICKED: frozenset({RunState.SHUTDOWN, RunState.PRELAUNCH}),  # quit or reset; cont refused
}


NEEDS_RESET = frozenset({RunState.SHUTDOWN, RunState.INTERNAL_ERROR, RunState.GUEST_PANICKED})
"""States ``cont`` refuses until a reset (QEMU's ``runstate_needs_reset``)."""


class RunStateError(PyemuError):
    """A run-state transition that the state machine does not allow."""


class VcpuStopTimeout(PyemuError):
    """vCPUs did not stop within the time a pause allows (a vCPU stuck in a device or the accelerator);
    the VM is left in ``internal-error``."""

    def __init__(self, vcpus: list[int], timeout: float) -> None:
        names = ", ".join(f"vcpu{index}" for index in vcpus) or "a vCPU"
        super().__init__(f"{names} did not stop within {timeout:g} s")
        self.vcpus = vcpus
        self.timeout = timeout


Listener = Callable[[RunState, RunState], None]


class RunStateMachine:
    """Current run state, guarded by a lock, with listeners called after each transition."""

    def __init__(self) -> None:
        self._state = RunState.PRELAUNCH
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self.shutdown_cause: ShutdownCause | None = None
        self.exit_code: int | None = None

    @property
    def state(self) -> RunState:
        return self._state

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def transition(self, new: RunState) -> None:
        with self._lock:
            old = self._state
            if new is old:
                return
            if new not in _ALLOWED[old]:
                raise RunStateError(f"invalid run-state transition {old.value} -> {new.value}")
            self._state = new
        for listener in list(self._listeners):
            listener(old, new)

    def clear_shutdown(self) -> None:
        """Forget the last shutdown's cause (a VM kept by ``-no-shutdown`` was reset)."""
        with self._lock:
            self.shutdown_cause = None
            self.exit_code = None

    def shutdown(self, cause: ShutdownCause, exit_code: int = 0) -> None:
        """Record why the VM ends and move to SHUTDOWN (idempotent: the first cause wins)."""
        with self._lock:
            if self.shutdown_cause is None:
                self.shutdown_cause = cause
                self.exit_code = exit_code
        if self._state is not RunState.SHUTDOWN:
            self.transition(RunState.SHUTDOWN)
