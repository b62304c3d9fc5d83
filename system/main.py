"""The ``pyemu`` command: parse QEMU-style options, build the machine, run it, exit with its status.

Every deliberate error (:class:`~pyemu.errors.PyemuError`) becomes one line on stderr and exit status 1,
like QEMU; only genuine bugs show a traceback.
"""

from __future__ import annotations

import sys

from pyemu.errors import ConfigError, PyemuError
from pyemu.system import log
from pyemu.system.options import EarlyExit, parse_args


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        config = parse_args(args)
    except EarlyExit as done:
        print(done.text)
        return 0
    except ConfigError as error:
        print(f"pyemu: {error}", file=sys.stderr)
        return 1
    try:
        log.set_mask(config.log_mask)
        if config.log_file:
            log.set_file(config.log_file)
        from pyemu.system.vm import run_vm

        return run_vm(config)
    except PyemuError as error:
        print(f"pyemu: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyemu: terminating on signal 2", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
