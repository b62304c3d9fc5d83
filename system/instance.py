"""One VM built from a :class:`~pyemu.system.config.VmConfig` and run to its end, without owning the process.

The ``pyemu`` command and the embedded Python API (:class:`pyemu.VM`) run a VM the same way: pick the
accelerator, find the kernel, build the board, open the monitors, start (or stay in prelaunch for ``-S``),
serve reset requests until the VM ends, then tear everything down. This class is that sequence with the
process-wide parts left out — signals, the pid file, daemonizing and printing stay with the command — so
a Python program can hold several VMs, each driven from its own thread.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from pyemu.accel.base import Accelerator, AcceleratorUnavailable, create_accelerator
from pyemu.errors import ConfigError
from pyemu.machines.microvm import BootSource, Microvm
from pyemu.monitor.control import ControlApi
from pyemu.system import log
from pyemu.system.config import VmConfig
from pyemu.system.messages import error_report
from pyemu.system.runstate import RunState, ShutdownCause

if TYPE_CHECKING:
    from pyemu.monitor.server import MonitorServer

DEFAULT_CMDLINE = "console=ttyS0"

Notice = Callable[[str], None]
"""Where progress and fallback notes go: the command prints them (with ``-msg`` prefixes), a library
caller may keep or drop them."""


def choose_accelerator(names: tuple[str, ...], notice: Notice = error_report) -> Accelerator:
    """The first accelerator of ``names`` that this host can provide (``-accel kvm:tcg`` falls back)."""
    failures: list[str] = []
    for name in names:
        try:
            return create_accelerator(name)
        except AcceleratorUnavailable as error:
            failures.append(str(error))
            if len(names) > 1:
                notice(f"{error}; trying the next accelerator")
    raise ConfigError(failures[-1] if failures else "-accel: no accelerator given", option="-accel")


def resolve_boot(config: VmConfig, notice: Notice = error_report) -> BootSource:
    """``-kernel``/``-initrd``/``-append``, or the default Debian guest when no kernel is given."""
    if config.kernel:
        return BootSource(config.kernel, config.initrd, config.append)
    from pyemu.guest.assets import find_assets

    assets = find_assets()
    if assets is None:
        from pyemu.guest.fetch import FetchUnavailable, fetch_assets

        try:
            notice("fetching the default guest (Debian linux-image-amd64, busybox-static) ...")
            assets = fetch_assets()
        except FetchUnavailable as error:
            raise ConfigError(
                f"no -kernel given and the default guest cannot be fetched ({error}); "
                "run 'pyemu-guest fetch' on a Debian host, or pass -kernel (and -initrd)",
                option="-kernel") from error
    cmdline = DEFAULT_CMDLINE + (f" {config.append}" if config.append else "")
    # The uncompressed vmlinux through PVH: no decompressor to run, so the default guest starts sooner
    # than from the bzImage (which `-kernel` still boots).
    return BootSource(str(assets.vmlinux), str(assets.initrd), cmdline)


def _follow_run_state(machine: Any) -> None:
    """Devices whose host side moves data into guest RAM on its own (virtio-net's TAP) stop while the VM
    does not run (QEMU's vm state change handlers); they hear of every run-state change from now on."""
    models = [inner for device in machine.devices
              if hasattr(inner := getattr(device.model, "device", device.model), "set_vm_running")]
    if not models:
        return

    def on_transition(_old: RunState, new: RunState) -> None:
        for model in models:
            model.set_vm_running(new is RunState.RUNNING)

    machine.runstate.add_listener(on_transition)
    for model in models:
        model.set_vm_running(machine.runstate.state is RunState.RUNNING)


class VmInstance:
    """A built VM: board, control API and monitors. ``start`` runs it, ``run`` serves it until it ends,
    ``close`` releases everything (threads, accelerator, sockets). Errors while building leave nothing
    open behind them."""

    def __init__(self, config: VmConfig, *, on_quit: Callable[[], None] | None = None,
                 notice: Notice = error_report) -> None:
        self.config = config
        boot = resolve_boot(config, notice)
        self.accel = choose_accelerator(config.accel, notice)
        from pyemu.block.locking import collecting_images
        from pyemu.migration.images import ImageActivation, register

        try:
            # An -incoming VM opens its images inactive (no locks) until its migration ends (QEMU's
            # BDRV_O_INACTIVE; pyemu.migration.images).
            with collecting_images(inactive=config.incoming is not None) as opened:
                self.machine = Microvm.create(config, self.accel, boot, on_quit=on_quit)
            register(self.machine, ImageActivation(opened, active=config.incoming is None))
            _follow_run_state(self.machine)
        except BaseException:
            self.accel.close()
            raise
        self.monitor: MonitorServer | None = None
        try:
            self.control = ControlApi(self.machine, name=config.name, uuid=config.uuid)
            if config.monitors:
                from pyemu.monitor.server import MonitorServer, endpoints_from_config  # QMP: ~8 ms of imports

                # A monitor can inspect a VM whose vCPU failed (info registers) and reset it: stay.
                self.machine.keep_on_internal_error = True
                self.monitor = MonitorServer(self.control, endpoints_from_config(config))
                self.monitor.open()  # listening (and waiting for a client where wait=on) before the VM starts
        except BaseException:
            self.machine.close()
            raise
        self._closed = False
        self._close_lock = threading.Lock()

    def start(self) -> None:
        """Run the vCPUs, or stay in prelaunch with ``-S`` until a ``cont``; then serve the monitors."""
        log.log("exec", f"starting {self.config.vcpus} vCPU(s) on {self.accel.name}")
        incoming = self.config.incoming
        if self.config.loadvm is not None and incoming is None:
            # QEMU's -loadvm: load the snapshot before anything runs (a failure ends the start), then run
            # unless -S.
            from pyemu.monitor.vm_snapshot_commands import load
            self.control.start(paused=True)
            load(self.control, self.config.loadvm)
            if not self.config.start_paused:
                self.control.cont()
        elif incoming is None:
            self.control.start(paused=self.config.start_paused)
        else:
            # QEMU's -incoming: the VM is created stopped in inmigrate; a URI is loaded now (a bad stream
            # raises MigrationError and nothing runs), "defer" waits for QMP migrate-incoming.
            self.control.start(paused=True)
            self.control.migration.expect_incoming(autostart=not self.config.start_paused)
            if incoming != "defer":
                self.control.migration.incoming(incoming)
        if self.monitor is not None:
            self.monitor.serve()

    def run(self) -> int:
        """Serve resets until the VM ends; its exit status (the guest's, or 0 for a host quit)."""
        return self.machine.wait()

    def terminate(self, cause: ShutdownCause = ShutdownCause.HOST_SIGNAL) -> None:
        """End the VM from the host side (any thread); :meth:`run` then returns."""
        self.machine.request_shutdown(cause, 0)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self.monitor is not None:
            self.monitor.close()  # after the quit reply and the SHUTDOWN event went out
        self.control.close_block_services()
        self.machine.close()
