"""What every board shares: guest RAM, the buses, the machine lock, timers, run state, vCPU threads,
and the life cycle (start, pause, reset, shutdown) that the CLI and QMP drive.

Threads: each vCPU runs guest code on its own thread; device timers run on the timer thread; the main
thread waits for requests (guest power-off, reset, debug exit, host signals) and acts on them. Device code
runs under ``self.lock`` whichever thread calls it (the exit dispatcher and the timer queue take it).
A board subclass builds its devices in :meth:`build` and loads its firmware or kernel in :meth:`load_boot`.

Time: devices read :attr:`Machine.clock`, a virtual clock (QEMU_CLOCK_VIRTUAL) that runs only while the
VM is running; the accelerator's guest TSC is stopped, continued and zeroed at the same points (pause,
resume, start, reset), so a paused guest sees no time pass at all.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

from pyemu.accel.base import Accelerator, Vcpu
from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.exits import Halt, Shutdown, Stopped
from pyemu.hw.core.device import DeviceManager
from pyemu.system import log
from pyemu.system.bus import mmio_bus, pio_bus
from pyemu.system.chardev_registry import ChardevRegistry
from pyemu.system.cpu_context import set_current_cpu
from pyemu.system.memory import GuestMemory
from pyemu.system.runstate import RunState, RunStateMachine, ShutdownCause, VcpuStopTimeout

if TYPE_CHECKING:
    from pyemu.machines.virtio_devices import DriveUse
    from pyemu.system.iothread import IoThread
from pyemu.system.timers import TimerQueue, VirtualClock
from pyemu.target.x86.cpu_state import X86CpuState


# Shutdown causes that end pyemu even with -no-shutdown (the host asked, or the guest's debug exit did).
_EXIT_CAUSES = frozenset({ShutdownCause.HOST_QMP_QUIT, ShutdownCause.HOST_SIGNAL, ShutdownCause.HOST_UI,
                          ShutdownCause.DEBUG_EXIT})

PAUSE_TIMEOUT_S = 10.0
"""How long :meth:`Machine.pause` waits for every vCPU to park (a vCPU stuck in a device callback)."""


class Machine:
    """A board's shared core. Subclasses fill in devices and boot state."""

    def __init__(self, ram_layout: list[tuple[int, int]], accel: Accelerator, vcpu_count: int, *,
                 ram_backend: str = "ram", ram_sealed: bool = False) -> None:
        self.lock = threading.RLock()
        self.memory = GuestMemory(ram_layout, backend=ram_backend, seal=ram_sealed)
        self.pio = pio_bus()
        self.mmio = mmio_bus()
        self.devices = DeviceManager(self.pio, self.mmio)
        self.dispatcher = ExitDispatcher(self.pio, self.mmio, self.lock)
        self.clock = VirtualClock()
        """QEMU_CLOCK_VIRTUAL: device time, standing still while the VM is stopped."""
        self.timers = TimerQueue(self.lock, self.clock)
        self.runstate = RunStateMachine()
        self.accel = accel
        self.vcpu_count = vcpu_count
        self.vcpus: list[Vcpu] = []
        self.reset_handlers: list[Callable[[], None]] = []
        self.power_button: Callable[[], None] | None = None
        """Press the board's power button (``system_powerdown``); None when the board has none."""
        self._cond = threading.Condition()
        self._life = threading.RLock()
        """Serialises start/pause/resume/reset: a QMP ``cont`` waits for a reset in progress."""
        self._want_run = False
        self._quit = False
        self._parked: list[bool] = []
        self._threads: list[threading.Thread] = []
        self._reset_requested: ShutdownCause | None = None
        self.reset_cause: ShutdownCause | None = None
        """Why the last (or current) machine reset happened."""
        self._request_event = threading.Event()
        self.no_reboot = False
        self.no_shutdown = False
        """``-no-shutdown``: a guest power-off stops the VM (state shutdown) instead of ending pyemu; the
        host's quit, a signal or isa-debug-exit still end it; system_reset leaves it in prelaunch for cont."""
        self._exit_requested = False
        self.boot_states: list[X86CpuState] = []
        self.chardevs = ChardevRegistry()
        """The open character backends by label (QMP ``query-chardev``)."""
        self.keep_on_internal_error = False
        """Stay in ``internal-error`` when a vCPU cannot go on (a monitor can inspect and reset it, as under
        QEMU); without a monitor nobody could, so pyemu exits with status 1 instead of hanging silently."""
        self._event_sinks: list[Callable[[str, dict[str, Any]], None]] = []

    # -- events the board raises itself (the control API forwards them as QMP events) -------------------
    def add_event_sink(self, sink: Callable[[str, dict[str, Any]], None]) -> None:
        self._event_sinks.append(sink)

    def _emit_event(self, name: str, data: dict[str, Any]) -> None:
        for sink in list(self._event_sinks):
            sink(name, data)

    # -- requests from devices and the host (any thread) ------------------------------------------------
    def request_shutdown(self, cause: ShutdownCause, exit_code: int = 0) -> None:
        """End the VM: guest power-off, debug exit, host signal or QMP quit."""
        log.log("exec", f"shutdown requested: {cause.value} (exit status {exit_code})")
        if cause in _EXIT_CAUSES or not self.no_shutdown:
            self._exit_requested = True
        self.runstate.shutdown(cause, exit_code)
        self._stop_vcpus()
        self.clock.stop()  # a VM kept by -no-shutdown stands still; the guest TSC stops at its reset
        self._request_event.set()

    def iothreads(self) -> list[IoThread]:
        """The board's I/O threads (``-object iothread`` and the default one), for query-iothreads."""
        return []

    def drives(self) -> list[DriveUse]:
        """The board's drives and the devices using them (none unless the board has block devices)."""
        return []

    def guest_panicked(self) -> None:
        """The guest reported a panic (pvpanic), on a vCPU thread. As QEMU's default ``-action panic=shutdown``:
        GUEST_PANICKED, the VM stops in ``guest-panicked`` and then shuts down (cause guest-panic); with
        ``-no-shutdown`` (QEMU's shutdown=pause) it stays stopped in ``guest-panicked`` until reset or quit,
        for a monitor to inspect."""
        action = "pause" if self.no_shutdown else "poweroff"
        log.log("guest_errors", f"guest panicked (action {action})")
        self._emit_event("GUEST_PANICKED", {"action": action})
        self._stop_in(RunState.GUEST_PANICKED)
        if action == "poweroff":
            self.request_shutdown(ShutdownCause.GUEST_PANIC, 0)

    def guest_crash_loaded(self) -> None:
        """The guest's crash kernel took over after a panic (pvpanic crash-loaded): reported, the VM runs on."""
        self._emit_event("GUEST_CRASHLOADED", {"action": "run"})

    def _stop_in(self, state: RunState) -> None:
        """Stop a running VM in ``state`` from any thread, a vCPU's own included: the vCPUs park on their
        own (nothing waits for them here) and virtual time stops; QEMU's ``vm_stop`` sends STOP."""
        if self.runstate.state is not RunState.RUNNING:
            return
        self._stop_vcpus()
        self.clock.stop()
        self.runstate.transition(state)
        self._emit_event("STOP", {})

    def inject_nmi(self) -> None:
        """An NMI to every vCPU, as QEMU's ``inject-nmi`` on x86 (``nmi_monitor_handle``): each
        accelerator latches it where its CPU takes NMIs (KVM_NMI, or the software CPU's local APIC)."""
        for vcpu in self.vcpus:
            vcpu.inject_nmi()

    def request_reset(self, cause: ShutdownCause) -> None:
        """Reset the VM (guest reboot, triple fault); with ``-no-reboot`` this ends it instead."""
        if self.no_reboot:
            self.request_shutdown(cause, 0)
            return
        log.log("exec", f"reset requested: {cause.value}")
        self._reset_requested = cause
        self._stop_vcpus()
        self._request_event.set()

    def _stop_vcpus(self) -> None:
        with self._cond:
            self._want_run = False
            self._cond.notify_all()
        for vcpu in self.vcpus:
            vcpu.request_stop()

    # -- life cycle (main thread) -----------------------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Create the vCPU threads and the timer thread; run unless ``paused``. Paused is QEMU's
        prelaunch (``-S``): the threads exist (their ids are known) but nothing has run, the virtual clock
        and the guest TSC stand at 0 until the first :meth:`resume`."""
        with self._life:
            self._parked = [True] * len(self.vcpus)
            for index, vcpu in enumerate(self.vcpus):
                thread = threading.Thread(target=self._vcpu_loop, args=(index, vcpu), name=f"vcpu{index}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            self.accel.tsc.stop()
            self.accel.tsc.reset()
            self.timers.start()
            if not paused:
                self.resume()

    def resume(self) -> None:
        """Run (``cont``): from prelaunch or paused; time and the guest TSC go on where they stopped."""
        with self._life:
            self.runstate.transition(RunState.RUNNING)
            self._run_vcpus()

    def _run_vcpus(self) -> None:
        self.accel.tsc.start()
        self.clock.start()
        with self._cond:
            self._want_run = True
            self._cond.notify_all()

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """Stop all vCPUs at an instruction boundary, wait until they are parked, stop virtual time and
        the guest TSC. A vCPU that does not park within ``timeout`` seconds leaves the VM in
        ``internal-error`` and raises :class:`VcpuStopTimeout` (never a silent "paused")."""
        with self._life:
            self._park_vcpus(timeout)
            if self.runstate.state is RunState.RUNNING:
                self.runstate.transition(RunState.PAUSED)

    def _park_vcpus(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        self._stop_vcpus()
        with self._cond:
            parked = self._cond.wait_for(lambda: all(self._parked) or self._quit, timeout=timeout)
        self.clock.stop()
        if not parked:
            stuck = [index for index, done in enumerate(self._parked) if not done]
            if self.runstate.state is RunState.RUNNING:
                self.runstate.transition(RunState.INTERNAL_ERROR)
            raise VcpuStopTimeout(stuck, timeout)
        self.accel.tsc.stop()

    def vcpu_thread_ids(self) -> list[int | None]:
        """Host thread id of each vCPU (``query-cpus-fast``); empty before :meth:`start`."""
        return [thread.native_id for thread in self._threads]

    def reset(self, cause: ShutdownCause = ShutdownCause.GUEST_RESET) -> None:
        """Machine reset: park the vCPUs, reset devices, reload the boot image, guest TSC to 0. A running
        VM runs on; a stopped one (paused, prelaunch, internal-error, or shut down under ``-no-shutdown``)
        stays stopped, in prelaunch, until ``cont``, as QEMU 7.2's main loop does.
        :attr:`reset_cause` says why while the reset handlers run (the RESET event's reason)."""
        with self._life:
            state = self.runstate.state
            self._park_vcpus()
            self.reset_cause = cause
            if state is not RunState.RUNNING:
                # Stopped states settle in prelaunch before the RESET event goes out, so a client that
                # sees the event and asks query-status reads the state it will stay in.
                if state is RunState.SHUTDOWN:
                    self.runstate.clear_shutdown()
                self.runstate.transition(RunState.PRELAUNCH)
            with self.lock:
                self.devices.reset_all()
                for handler in self.reset_handlers:
                    handler()
                self.memory.clear()  # fresh RAM is already zero: only a reset pays for this
                self.load_boot()
                for vcpu, boot_state in zip(self.vcpus, self.boot_states):
                    vcpu.load_state(boot_state)
                self.accel.tsc.reset()
            if state is RunState.RUNNING and not self._exit_requested \
                    and self.runstate.state is not RunState.SHUTDOWN:
                self._run_vcpus()  # unless quit (or a power-off) arrived during the reset

    def wait(self) -> int:
        """Serve reset requests until the VM shuts down; return the exit status."""
        while True:
            self._request_event.wait(0.25)
            if self.runstate.state is RunState.SHUTDOWN and self._exit_requested:
                return self.runstate.exit_code or 0
            cause = self._reset_requested
            if cause is not None:
                self._request_event.clear()
                self._reset_requested = None
                try:
                    self.reset(cause)
                except VcpuStopTimeout as error:
                    print(f"pyemu: reset failed: {error}", file=sys.stderr)

    def close(self) -> None:
        with self._cond:
            self._quit = True
            self._want_run = False
            self._cond.notify_all()
        for vcpu in self.vcpus:
            vcpu.request_stop()
        for thread in self._threads:
            thread.join(timeout=5)
        self.timers.stop()
        for vcpu in self.vcpus:
            vcpu.close()
        self.accel.close()

    # -- vCPU threads -----------------------------------------------------------------------------------
    def _vcpu_loop(self, index: int, vcpu: Vcpu) -> None:
        set_current_cpu(index)
        while True:
            with self._cond:
                self._parked[index] = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._want_run or self._quit)
                if self._quit:
                    return
                self._parked[index] = False
            exit_ = vcpu.run()
            if isinstance(exit_, Stopped):
                continue
            if isinstance(exit_, Shutdown):
                self._vcpu_shutdown(index, exit_.reason)
                continue
            if isinstance(exit_, Halt):
                # HLT with interrupts disabled: as on hardware only an NMI, INIT or SIPI ends it, which the
                # next run() waits for (Linux halts offline and stopped CPUs so, and wakes them with INIT).
                log.log("guest_errors", f"vcpu{index}: halted with interrupts disabled")
                continue

    def _vcpu_shutdown(self, index: int, reason: str) -> None:
        """A vCPU cannot go on. A triple fault resets the machine like a PC (or ends it with
        ``-no-reboot``); anything else is an internal error: the VM stops in ``internal-error`` when a
        monitor can deal with it (:attr:`keep_on_internal_error`), else pyemu ends with status 1. Either
        way the reason is printed, because a silent reset loop or hang is impossible to debug."""
        if "triple fault" in reason:
            action = "exiting (-no-reboot)" if self.no_reboot else "resetting"
            print(f"pyemu: vcpu{index}: {reason}, {action}", file=sys.stderr)
            self.request_reset(ShutdownCause.TRIPLE_FAULT)
            return
        if self.keep_on_internal_error:
            print(f"pyemu: vcpu{index}: {reason}; VM stopped in internal-error (system_reset or quit)",
                  file=sys.stderr)
            self._stop_in(RunState.INTERNAL_ERROR)
            return
        print(f"pyemu: vcpu{index}: {reason}; stopping the VM", file=sys.stderr)
        self.request_shutdown(ShutdownCause.HOST_ERROR, 1)

    # -- VM state (pyemu.migration) ---------------------------------------------------------------------
    def migration_identity(self) -> dict[str, Any]:
        """The board type and the options that shape its devices (JSON-able), which a VM-state stream
        must match; the generic part (RAM, vCPUs, devices) is :func:`pyemu.migration.vmstate.identity`."""
        return {"board": type(self).__name__.lower(), "options": {}}

    def set_guest_tsc(self, value: int) -> None:
        """Make the guest TSC read ``value`` (a restored VM's), while every vCPU is parked."""
        setter = getattr(self.accel.tsc, "set", None)
        if setter is None:
            raise NotImplementedError(f"the {self.accel.name} accelerator cannot set the guest TSC")
        setter(value)

    def enter_state(self, state: RunState) -> None:
        """Move a stopped VM to ``state`` (inmigrate at an incoming start, postmigrate after a save)."""
        with self._life:
            self.runstate.transition(state)

    # -- board hooks ------------------------------------------------------------------------------------
    def load_boot(self) -> None:
        """Write the boot image into zeroed RAM and set ``self.boot_states`` (one entry state per vCPU)."""
        raise NotImplementedError
