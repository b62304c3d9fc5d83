"""Run one VM from a :class:`~pyemu.system.config.VmConfig`: pick the accelerator, find the kernel, build
the board, run until the guest or the user ends it, and return the process exit status."""

from __future__ import annotations

import signal
import sys
import threading

from pyemu.accel.base import Accelerator, AcceleratorUnavailable, create_accelerator
from pyemu.errors import ConfigError
from pyemu.machines.microvm import BootSource, Microvm
from pyemu.monitor.control import ControlApi
from pyemu.monitor.server import MonitorServer, endpoints_from_config
from pyemu.system import log
from pyemu.system.config import VmConfig
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
                print(f"pyemu: {error}; trying the next accelerator", file=sys.stderr)
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
            print("pyemu: fetching the default guest (Debian linux-image-amd64, busybox-static) ...",
                  file=sys.stderr)
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


def run_vm(config: VmConfig) -> int:
    """Run the VM the config describes until it ends; returns pyemu's exit status."""
    pidfile = PidFile(config.pidfile) if config.pidfile else None
    try:
        return _run(config)
    finally:
        if pidfile is not None:
            pidfile.remove()


def _run(config: VmConfig) -> int:
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
        print(f"pyemu: terminating on signal {signum}", file=sys.stderr)
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
        try:
            return machine.wait()
        except KeyboardInterrupt:
            print("pyemu: terminating on signal 2", file=sys.stderr)
            return 0
    finally:
        if monitor is not None:
            monitor.close()  # after the quit reply and the SHUTDOWN event went out
        machine.close()
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:
            pass
