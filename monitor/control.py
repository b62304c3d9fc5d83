"""The control API of one running VM: what QMP (and later the Python API and ``pyemu-remote``) may do.

It wraps a :class:`~pyemu.machines.base.Machine` so that monitor code never reaches into the board: the
run-state questions (``status``), the life-cycle requests (stop, cont, reset, quit) and the identity of the
VM (name, UUID, accelerator, vCPUs). It also turns run-state changes into QMP events (STOP, RESUME,
SHUTDOWN, RESET) for whoever subscribes.

STOP and RESUME are emitted here, by :meth:`stop` and :meth:`cont`, rather than by a run-state listener:
:meth:`Machine.reset` pauses and resumes the vCPUs internally, and QEMU reports a reset as RESET only.
SHUTDOWN comes from a run-state listener (any cause, any thread) and RESET from a board reset handler.

``-S`` keeps the VM in ``prelaunch`` with no vCPU thread and no timer running; the first ``cont`` starts
the machine. That is QEMU's prelaunch (nothing has run yet), which ``Machine.start(paused=True)`` cannot
express: it moves straight to ``paused``.
"""

from __future__ import annotations

import os
import threading
import uuid as uuid_module
from dataclasses import dataclass
from typing import Any, Callable

from pyemu.errors import PyemuError
from pyemu.machines.base import Machine
from pyemu.system.runstate import RunState, ShutdownCause

EventSink = Callable[[str, dict[str, Any]], None]
NIL_UUID = "00000000-0000-0000-0000-000000000000"

# pyemu's ShutdownCause names that QEMU's enum lacks, mapped to the nearest QEMU value (the wire format
# only allows QEMU's names): a triple fault is a guest reset there, isa-debug-exit a guest shutdown.
_QEMU_CAUSE = {ShutdownCause.TRIPLE_FAULT: "guest-reset", ShutdownCause.DEBUG_EXIT: "guest-shutdown"}
_GUEST_CAUSES = {"guest-shutdown", "guest-reset", "guest-panic"}


class ControlError(PyemuError):
    """A control request that the VM's current state does not allow (e.g. ``cont`` after shutdown)."""


@dataclass(frozen=True)
class CpuInfo:
    index: int
    thread_id: int
    qom_path: str


def qemu_cause(cause: ShutdownCause | None) -> str:
    """``cause`` as a value of QEMU's ShutdownCause enum."""
    if cause is None:
        return "none"
    return _QEMU_CAUSE.get(cause, cause.value)


class ControlApi:
    """Life cycle and identity of one VM, safe to call from any thread."""

    def __init__(self, machine: Machine, *, name: str | None = None, uuid: str | None = None,
                 started: bool = False) -> None:
        self.machine = machine
        self.name = name
        self.uuid = str(uuid_module.UUID(uuid)) if uuid else NIL_UUID
        self._started = started
        self._start_lock = threading.Lock()
        self._sinks: list[EventSink] = []
        self._reset_reason: str | None = None
        machine.runstate.add_listener(self._on_transition)
        machine.reset_handlers.append(self._on_reset)

    # -- events -----------------------------------------------------------------------------------------
    def subscribe(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        for sink in list(self._sinks):
            sink(name, data)

    def _on_transition(self, old: RunState, new: RunState) -> None:
        if new is RunState.SHUTDOWN:
            reason = qemu_cause(self.machine.runstate.shutdown_cause)
            self._emit("SHUTDOWN", {"guest": reason in _GUEST_CAUSES, "reason": reason})

    def _on_reset(self) -> None:
        reason = self._reset_reason or "guest-reset"
        self._reset_reason = None
        self._emit("RESET", {"guest": reason in _GUEST_CAUSES, "reason": reason})

    # -- state ------------------------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self.machine.runstate.state

    def status(self) -> dict[str, Any]:
        state = self.state
        return {"status": state.value, "running": state is RunState.RUNNING, "singlestep": False}

    @property
    def accelerator(self) -> str:
        return self.machine.accel.name

    def kvm_present(self) -> bool:
        return os.access("/dev/kvm", os.R_OK | os.W_OK)

    def cpus(self) -> list[CpuInfo]:
        # Machine keeps its vCPU threads private; before the first `cont` (prelaunch) none exist and
        # the process id stands in, as the only thread that will run guest code is not there yet.
        threads = list(getattr(self.machine, "_threads", []))
        out: list[CpuInfo] = []
        for index in range(self.machine.vcpu_count):
            native = threads[index].native_id if index < len(threads) else None
            out.append(CpuInfo(index, native if native is not None else os.getpid(),
                               f"/machine/unattached/device[{index}]"))
        return out

    # -- requests ---------------------------------------------------------------------------------------
    def start(self, paused: bool) -> None:
        """Called once by the VM runner: run now, or stay in prelaunch until :meth:`cont` (``-S``)."""
        if not paused:
            self._start_machine()

    def _start_machine(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
        self.machine.start(paused=False)

    def stop(self) -> None:
        """Pause every vCPU. Outside ``running`` this does nothing, as in QEMU (no STOP event either)."""
        if self.state is not RunState.RUNNING:
            return
        self.machine.pause()
        if self.state is RunState.PAUSED:
            self._emit("STOP", {})

    def cont(self) -> None:
        state = self.state
        if state in (RunState.SHUTDOWN, RunState.INTERNAL_ERROR):
            raise ControlError("Resetting the Virtual Machine is required")
        if state is RunState.RUNNING:
            return
        if state is RunState.PRELAUNCH:
            self._start_machine()
        else:
            self.machine.resume()
        self._emit("RESUME", {})

    def reset(self) -> None:
        """The reset button: served by the board's main loop (``-no-reboot`` turns it into a shutdown,
        as in QEMU)."""
        with self._start_lock:
            if not self._started:
                # Prelaunch: nothing has run, so there is nothing to reset; asking the board would
                # make it "resume" vCPUs that have no thread yet (Machine.reset ends in resume()).
                self._emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
                return
        self._reset_reason = "host-qmp-system-reset"
        # pyemu's ShutdownCause has no host-qmp-system-reset; the board only logs the cause it is given.
        self.machine.request_reset(ShutdownCause.HOST_UI)

    def powerdown(self) -> None:
        """The ACPI power button: POWERDOWN, then the guest decides (a guest that ignores it keeps
        running, as under QEMU)."""
        if self.machine.power_button is None:
            raise ControlError("this machine has no power button")
        self._emit("POWERDOWN", {})
        self.machine.power_button()

    def quit(self) -> None:
        self.machine.request_shutdown(ShutdownCause.HOST_QMP_QUIT, 0)
