"""Run one VM from a :class:`~pyemu.system.config.VmConfig`: pick the accelerator, find the kernel, build
the board, run until the guest or the user ends it, and return the process exit status."""

from __future__ import annotations

import signal
import threading
from typing import Callable

from pyemu.accel.base import Accelerator, AcceleratorUnavailable, create_accelerator
from pyemu.errors import ConfigError
from pyemu.machines.microvm import BootSource, Microvm
from pyemu.monitor.control import ControlApi
from pyemu.monitor.server import MonitorServer, endpoints_from_config
from pyemu.system import log
from pyemu.system.config import VmConfig
from pyemu.system.messages import error_report, warn_report
from pyemu.system.pidfile import PidFile
from pyemu.system.runstate import ShutdownCause

DEFAULT_CMDLINE = "console=ttyS0"


def choose_accelerator(names: tuple[str, ...]) -> Accelerator:
    """The first accelerator of ``names`` that this host can provide (``-accel kvm:tcg`` falls back)."""
    failures: list[str] = []
    for name in names:
        try:
            return create_accelerator(name)
        except AcceleratorUnavailable as error:
            failures.append(str(error))
            if len(names) > 1:
                error_report(f"{error}; trying the next accelerator")
    raise ConfigError(failures[-1] if failures else "-accel: no accelerator given", option="-accel")


def resolve_boot(config: VmConfig) -> BootSource:
    """``-kernel``/``-initrd``/``-append``, or the default Debian guest when no kernel is given."""
    if config.kernel:
        return BootSource(config.kernel, config.initrd, config.append)
    from pyemu.guest.assets import find_assets

    assets = find_assets()
    if assets is None:
        from pyemu.guest.fetch import fetch_assets, FetchUnavailable

        try:
            error_report("fetching the default guest (Debian linux-image-amd64, busybox-static) ...")
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


def run_vm(config: VmConfig, ready: Callable[[], None] | None = None) -> int:
    """Run the VM the config describes until it ends; returns pyemu's exit status. ``ready`` is called
    once the VM is set up -- pid file written, monitors listening, vCPUs started (or prelaunch for -S) --
    which is when ``-daemonize`` lets the command return."""
    for warning in config.warnings():
        warn_report(warning)
    pidfile = PidFile(config.pidfile) if config.pidfile else None
    try:
        config.overcommit.lock_memory()  # -overcommit mem-lock=on: MCL_FUTURE covers the RAM mapped next
        return _run(config, ready)
    finally:
        if pidfile is not None:
            pidfile.remove()


def _run(config: VmConfig, ready: Callable[[], None] | None) -> int:
    boot = resolve_boot(config)
    accel = choose_accelerator(config.accel)
    machine: Microvm | None = None
    quit_requested = threading.Event()

    def on_quit() -> None:
        quit_requested.set()
        if machine is not None:
            machine.request_shutdown(ShutdownCause.HOST_UI, 0)

    try:
        machine = Microvm.create(config, accel, boot, on_quit=on_quit)
    except BaseException:
        accel.close()
        raise
    previous = signal.getsignal(signal.SIGTERM)

    def on_signal(signum: int, _frame: object) -> None:
        error_report(f"terminating on signal {signum}")
        assert machine is not None
        machine.request_shutdown(ShutdownCause.HOST_SIGNAL, 0)

    try:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGHUP, on_signal)
    except ValueError:
        pass  # not the main thread (embedded use): the caller handles signals
    monitor: MonitorServer | None = None
    try:
        control = ControlApi(machine, name=config.name, uuid=config.uuid)
        if config.monitors:
            monitor = MonitorServer(control, endpoints_from_config(config))
            monitor.open()  # listening (and waiting for a client where wait=on) before the VM starts
        log.log("exec", f"starting {config.vcpus} vCPU(s) on {accel.name}")
        # -S: prelaunch, no vCPU thread yet; QMP 'cont' starts the machine.
        control.start(paused=config.start_paused)
        if monitor is not None:
            monitor.serve()
        if ready is not None:
            ready()
        try:
            return machine.wait()
        except KeyboardInterrupt:
            error_report("terminating on signal 2")
            return 0
    finally:
        if monitor is not None:
            monitor.close()  # after the quit reply and the SHUTDOWN event went out
        machine.close()
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:
            pass
