"""Run one VM from a :class:`~pyemu.system.config.VmConfig` as the ``pyemu`` command does: the process-wide
parts (warnings, pid file, memory locking, signals, ``-daemonize``'s ready signal) around a
:class:`~pyemu.system.instance.VmInstance`, which builds, runs and closes the VM itself (and is what the
embedded Python API uses too)."""

from __future__ import annotations

import _thread
import signal
from typing import Callable

from pyemu.system.config import VmConfig
from pyemu.system.instance import VmInstance
from pyemu.system.messages import error_report, warn_report
from pyemu.system.pidfile import PidFile
from pyemu.system.runstate import ShutdownCause


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


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def install_termination_handlers(terminate: Callable[[int], None]) -> Callable[[], None]:
    """Call ``terminate(signum)`` on SIGTERM and SIGHUP; returns what puts the previous handlers back.

    Why a thread of its own: Python runs a signal handler in the main thread between two of that thread's
    bytecodes, possibly while it holds a lock that ending the VM needs -- the machine's wait loop holds its
    request event's lock for a moment every 0.25 s, and the shutdown sets that event -- and a handler that
    blocks there waits for its own thread forever (seen: a VM that ignored SIGTERM, about one run in 40 on a
    loaded host). The handler only starts the thread (``_thread.start_new_thread`` takes no Python lock);
    the thread takes the locks as any thread does. Outside the main thread (embedded use) nothing is
    installed: the caller handles signals."""
    previous = {signum: signal.getsignal(signum) for signum in TERMINATING_SIGNALS}

    def handler(signum: int, _frame: object) -> None:
        _thread.start_new_thread(terminate, (signum,))

    try:
        for signum in TERMINATING_SIGNALS:
            signal.signal(signum, handler)
    except ValueError:
        return lambda: None

    def restore() -> None:
        for signum, old in previous.items():
            try:
                signal.signal(signum, old)
            except (ValueError, TypeError):
                pass
    return restore
