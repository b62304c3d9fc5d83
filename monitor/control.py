"""The control API of one running VM: what QMP (and later the Python API and ``pyemu-remote``) may do.

It wraps a :class:`~pyemu.machines.base.Machine` so that monitor code never reaches into the board: the
run-state questions (``status``), the life-cycle requests (stop, cont, reset, quit) and the identity of the
VM (name, UUID, accelerator, vCPUs). It also turns run-state changes into QMP events (STOP, RESUME,
SHUTDOWN, RESET) for whoever subscribes.

STOP and RESUME are emitted here, by :meth:`stop` and :meth:`cont`, rather than by a run-state listener:
QEMU reports a reset as RESET only, whatever run state it leaves (a reset of a paused VM moves it to
prelaunch). SHUTDOWN comes from a run-state listener (any cause, any thread) and RESET from a board reset
handler, with the board's :attr:`~pyemu.machines.base.Machine.reset_cause` as its reason.

``-S`` is ``Machine.start(paused=True)``: QEMU's prelaunch, vCPU threads created but nothing run and
virtual time at 0; the first ``cont`` runs the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Callable

from pyemu.errors import PyemuError
from pyemu.machines.base import Machine
from pyemu.system.runstate import NEEDS_RESET, RunState, ShutdownCause
from pyemu.target.x86.cpu_state import X86CpuState

if TYPE_CHECKING:
    from pyemu.block.exports import ExportManager
    from pyemu.jobs.job import JobManager
    from pyemu.migration.job import MigrationManager

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

    def __init__(self, machine: Machine, *, name: str | None = None, uuid: str | None = None) -> None:
        self.machine = machine
        self.name = name
        if uuid:
            import uuid as uuid_module  # (-uuid only: ~3 ms of imports)

            self.uuid = str(uuid_module.UUID(uuid))
        else:
            self.uuid = NIL_UUID
        self._sinks: list[EventSink] = []
        machine.runstate.add_listener(self._on_transition)
        machine.reset_handlers.append(self._on_reset)
        machine.add_event_sink(self._emit)  # STOP on internal-error, GUEST_PANICKED, GUEST_CRASHLOADED

    # The services below are made by their first user (a QMP command, the Python API, -incoming): their
    # modules import the NBD server, the job machinery and the migration stream, ~15 ms of start-up a VM
    # without them does not need.
    @cached_property
    def migration(self) -> MigrationManager:
        """``migrate``/``migrate-incoming``/``query-migrate`` (:mod:`pyemu.monitor.migration`)."""
        from pyemu.migration.job import MigrationManager

        return MigrationManager(self.machine, self._emit)

    @property
    def migrating(self) -> bool:
        """A migration runs (False without making the manager)."""
        return "migration" in self.__dict__ and self.migration.active
    @cached_property
    def exports(self) -> ExportManager:
        """The NBD server and block exports (:mod:`pyemu.monitor.nbd_commands`); closed with the VM."""
        from pyemu.block.exports import ExportManager

        return ExportManager(self._emit)

    @cached_property
    def jobs(self) -> JobManager:
        """Backup, stream, commit and mirror jobs (:mod:`pyemu.monitor.job_commands`); cancelled at VM close."""
        from pyemu.jobs.job import JobManager

        return JobManager(self._emit)

    def close_block_services(self) -> None:
        """Cancel the jobs (no job worker may touch a node once the graph closes), then close the exports
        (NBD clients gone, exports released before the nodes close) -- those that were ever made."""
        if "jobs" in self.__dict__:
            self.jobs.cancel_all()
        if "exports" in self.__dict__:
            self.exports.close()

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
        reason = qemu_cause(self.machine.reset_cause or ShutdownCause.GUEST_RESET)
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
        # Before the machine starts no vCPU thread exists yet: the process id stands in.
        threads = self.machine.vcpu_thread_ids()
        out: list[CpuInfo] = []
        for index in range(self.machine.vcpu_count):
            native = threads[index] if index < len(threads) else None
            out.append(CpuInfo(index, native if native is not None else os.getpid(),
                               f"/machine/unattached/device[{index}]"))
        return out

    # -- requests ---------------------------------------------------------------------------------------
    def start(self, paused: bool) -> None:
        """Called once by the VM runner: run now, or stay in prelaunch until :meth:`cont` (``-S``)."""
        self.machine.start(paused=paused)

    def stop(self) -> None:
        """Pause every vCPU. Outside ``running`` this does nothing, as in QEMU (no STOP event either).
        vCPUs that do not stop raise :class:`~pyemu.system.runstate.VcpuStopTimeout` (state
        ``internal-error``), which QMP reports as an error."""
        if self.state is RunState.INMIGRATE:
            self.migration.autostart = False  # as QEMU: the loaded VM will wait for a cont
            return
        if self.state is not RunState.RUNNING:
            return
        self.machine.pause()
        if self.state is RunState.PAUSED:
            self._emit("STOP", {})

    def cont(self) -> None:
        state = self.state
        if state in NEEDS_RESET:
            raise ControlError("Resetting the Virtual Machine is required")
        if state is RunState.RUNNING:
            return
        if state is RunState.INMIGRATE:
            self.migration.autostart = True  # QEMU: run as soon as the incoming state is loaded
            return
        if self.migrating:
            raise ControlError("Migration is in progress")
        from pyemu.block.errors import BlockError
        from pyemu.migration.images import activate_images

        try:
            activate_images(self.machine)  # QEMU's qmp_cont: a source left in postmigrate takes its images back
        except BlockError as exc:
            raise ControlError(str(exc)) from exc
        self.machine.resume()
        self._emit("RESUME", {})

    def reset(self) -> None:
        """The reset button: served by the board's main loop (``-no-reboot`` turns it into a shutdown,
        as in QEMU); a stopped VM stays stopped."""
        self.machine.request_reset(ShutdownCause.HOST_QMP_SYSTEM_RESET)

    def powerdown(self) -> None:
        """The ACPI power button: POWERDOWN, then the guest decides (a guest that ignores it keeps
        running, as under QEMU)."""
        if self.machine.power_button is None:
            raise ControlError("this machine has no power button")
        self._emit("POWERDOWN", {})
        self.machine.power_button()

    def quit(self) -> None:
        self.machine.request_shutdown(ShutdownCause.HOST_QMP_QUIT, 0)

    # -- inspection and injection (monitor) -------------------------------------------------------------
    def inject_nmi(self) -> None:
        """An NMI to every vCPU (QMP ``inject-nmi``, HMP ``nmi``); a paused vCPU takes it when it runs."""
        self.machine.inject_nmi()

    def cpu_state(self, index: int) -> X86CpuState:
        """The registers of vCPU ``index``. A running VM is paused for the read and resumed at once (QEMU's
        ``cpu_synchronize_state`` also takes the vCPU out of the guest); no STOP/RESUME event is sent, as
        the VM's run state is the same before and after."""
        vcpu = self.machine.vcpus[index]
        if self.state is not RunState.RUNNING:
            return vcpu.save_state()
        self.machine.pause()
        try:
            return vcpu.save_state()
        finally:
            if self.state is RunState.PAUSED:
                self.machine.resume()
