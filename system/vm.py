"""Run one VM from a :class:`~pyemu.system.config.VmConfig` as the ``pyemu`` command does: the process-wide
parts (warnings, pid file, memory locking, signals, ``-daemonize``'s ready signal) around a
:class:`~pyemu.system.instance.VmInstance`, which builds, runs and closes the VM itself (and is what the
embedded Python API uses too)."""

from __future__ import annotations

from typing import Callable

from pyemu.system.config import VmConfig
from pyemu.system.instance import VmInstance
from pyemu.system.messages import error_report, warn_report
from pyemu.system.pidfile import PidFile
from pyemu.system.runstate import ShutdownCause
from pyemu.system.signals import install_termination_handlers


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
    built: list[VmInstance] = []

    def on_quit() -> None:  # Ctrl-A x on a stdio console
        if built:
            built[0].terminate(ShutdownCause.HOST_UI)

    instance = VmInstance(config, on_quit=on_quit)
    built.append(instance)
    if config.incoming is not None:  # (migrate-incoming needs -incoming defer)
        instance.control.migration.exit_on_failed_load = True  # as qemu-system after a failed incoming load

    def on_signal(signum: int) -> None:
        error_report(f"terminating on signal {signum}")
        instance.terminate(ShutdownCause.HOST_SIGNAL)

    restore = install_termination_handlers(on_signal)
    try:
        instance.start()
        if ready is not None:
            ready()
        try:
            return instance.run()
        except KeyboardInterrupt:
            error_report("terminating on signal 2")
            return 0
    finally:
        instance.close()
        restore()
