"""The ``pyemu`` command: parse QEMU-style options, build the machine, run it, exit with its status.

Every deliberate error (:class:`~pyemu.errors.PyemuError`) becomes one line on stderr and exit status 1,
like QEMU; only genuine bugs show a traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from pyemu.errors import ConfigError, PyemuError
from pyemu.system import log, messages
from pyemu.system.leave import leave
from pyemu.system.messages import error_report
from pyemu.system.options import EarlyExit, early_messages, parse_args


def main(argv: list[str] | None = None) -> int:
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

        return run_vm(config, ready=None if daemon is None else daemon.ready)
    except PyemuError as error:
        error_report(str(error))
        return 1
    except KeyboardInterrupt:
        error_report("terminating on signal 2")
        return 1
    finally:
        if daemon is not None:
            daemon.close()  # before ready(): the waiting command exits 1


def command() -> NoReturn:
    """The ``pyemu`` program: :func:`main`, then :func:`leave` with its status."""
    leave(main())


if __name__ == "__main__":
    command()
