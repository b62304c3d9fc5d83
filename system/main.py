"""The ``pyemu`` command: parse QEMU-style options, build the machine, run it, exit with its status.

Every deliberate error (:class:`~pyemu.errors.PyemuError`) becomes one line on stderr and exit status 1,
like QEMU; only genuine bugs show a traceback.
"""

from __future__ import annotations

import gc
import sys
from typing import Callable, NoReturn


def main(argv: list[str] | None = None, *, started: Callable[[], None] | None = None) -> int:
    """Run ``pyemu`` with ``argv``; its exit status. ``started`` is called once the VM runs (or waits in
    prelaunch under ``-S``)."""
    # Imported here, not at the top, so that command() has turned the garbage collector off before they load.
    from pyemu.errors import ConfigError, PyemuError
    from pyemu.system import log, messages
    from pyemu.system.messages import error_report
    from pyemu.system.options import EarlyExit, early_messages, parse_args

    args = sys.argv[1:] if argv is None else argv
    try:
        config = parse_args(args)
    except EarlyExit as done:
        print(done.text)
        return 0
    except ConfigError as error:
        messages.configure(*early_messages(args))
        error_report(str(error))
        return 1
    messages.configure(config.msg, config.name)
    daemon = None
    if config.daemonize:
        from pyemu.system.daemonize import daemonize

        daemon = daemonize()  # from here on this is the daemon; the command's process waits for ready()
    try:
        log.set_mask(config.log_mask)
        if config.log_file:
            log.set_file(config.log_file)
        from pyemu.system.vm import run_vm

        return run_vm(config, ready=_each(started, None if daemon is None else daemon.ready))
    except PyemuError as error:
        error_report(str(error))
        return 1
    except KeyboardInterrupt:
        error_report("terminating on signal 2")
        return 1
    finally:
        if daemon is not None:
            daemon.close()  # before ready(): the waiting command exits 1


def _each(*calls: Callable[[], None] | None) -> Callable[[], None] | None:
    """One callback that makes each of ``calls`` given, in order (None when none is)."""
    given = [call for call in calls if call is not None]
    if not given:
        return None

    def call_each() -> None:
        for call in given:
            call()

    return call_each


def command() -> NoReturn:
    """The ``pyemu`` program: :func:`main`, then :func:`leave` with its status.

    The cyclic garbage collector is off while the VM is built. Why: building it imports ~300 modules and
    leaves ~24,000 objects that live as long as the process, and the collector scanned them again and again
    -- 39 collections, ~5 ms before the first guest instruction of a PVH boot, and none after it
    (2026-12-08). Once the VM runs, :func:`_collect_from_now_on` freezes what start-up made and turns the
    collector back on for what the running VM allocates."""
    gc.disable()
    from pyemu.system.leave import leave

    leave(main(started=_collect_from_now_on))


def _collect_from_now_on() -> None:
    """Move every object that exists now to the collector's permanent generation (never scanned again: the
    machine, its devices, modules and classes stay for the process's life) and enable collection."""
    gc.freeze()
    gc.enable()


if __name__ == "__main__":
    command()
