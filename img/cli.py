"""The ``pyemu-img`` command: global options, subcommand dispatch, error reporting and exit codes.

    pyemu-img [-h | --help] [-V | --version] COMMAND [command options]

Each subcommand lives in its own module with ``run(argv) -> int``. Errors a user can cause (bad options,
missing files, images that cannot do what was asked: :class:`~pyemu.img.errors.ImgError`, block-layer
errors) print ``pyemu-img: MESSAGE`` on stderr and exit with status 1 -- or the command's documented error
status (``compare``: 2) -- never with a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, NoReturn

from pyemu.block.errors import BlockError
from pyemu.errors import ConfigError
from pyemu.img.errors import ImgError, UsageError
from pyemu.system.leave import leave

PROG = "pyemu-img"
VERSION = "0.1.0"

# command -> (module, exit status for errors)
COMMANDS: dict[str, tuple[str, int]] = {
    "amend": ("pyemu.img.amend", 1),
    "bench": ("pyemu.img.bench", 1),
    "bitmap": ("pyemu.img.bitmap", 1),
    "check": ("pyemu.img.check", 1),
    "commit": ("pyemu.img.commit", 1),
    "compare": ("pyemu.img.compare", 2),
    "convert": ("pyemu.img.convert", 1),
    "create": ("pyemu.img.create", 1),
    "info": ("pyemu.img.info", 1),
    "map": ("pyemu.img.map", 1),
    "measure": ("pyemu.img.measure", 1),
    "rebase": ("pyemu.img.rebase", 1),
    "resize": ("pyemu.img.resize", 1),
    "snapshot": ("pyemu.img.snapshot", 1),
}

USAGE = """\
usage: pyemu-img [standard options] command [command options]
pyemu's disk image utility (qemu-img compatible)

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit

Command syntax:
  amend [-p] [-q] [-f fmt] [-t cache] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-n] [--no-drain] [-o offset] \
[--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file \
[-F source_fmt]] [-g granularity] [--object objectdef] [-f fmt] filename bitmap
  check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  commit [-q] [-f fmt] [-t cache] [-b base] [-d] [-p] filename
  compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file \
[-F backing_fmt]] [-o options] [-S sparse_size] [-m num_workers] [-W] filename [filename2 [...]] output_filename
  create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] filename]
  snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size

'size' is in bytes; the suffixes k, M, G, T, P and E (powers of 1024) are accepted, 'b' is ignored.
'fmt' is raw or qcow2 (probed when omitted). 'cache' is none, writeback, writethrough, directsync or unsafe.
'-o help' lists the options of a format. '-p' shows progress, '-q' prints nothing but errors.

Supported formats: qcow2 raw
"""


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _load(command: str) -> Callable[[list[str]], int]:
    module = importlib.import_module(COMMANDS[command][0])
    run: Callable[[list[str]], int] = module.run
    return run


def main(argv: list[str] | None = None) -> int:
    """Run pyemu-img with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        _error("Not enough arguments (try 'pyemu-img --help')")
        return 1
    first = args[0]
    if first in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if first in ("-V", "--version"):
        print(f"{PROG} version {VERSION} (pyemu)")
        return 0
    if first.startswith("-"):
        _error(f"unrecognized option '{first}' (try 'pyemu-img --help')")
        return 1
    if first not in COMMANDS:
        _error(f"Command not found: {first}")
        return 1
    status_on_error = COMMANDS[first][1]
    rest = args[1:]
    if "-h" in rest or "--help" in rest:
        sys.stdout.write(USAGE)
        return 0
    try:
        return _load(first)(rest)
    except UsageError as exc:
        _error(f"{exc} (try 'pyemu-img --help')")
        return 1
    except ImgError as exc:
        _error(str(exc))
        return exc.exit_code if exc.exit_code != 1 else status_on_error
    except (BlockError, ConfigError) as exc:
        _error(str(exc))
        return status_on_error
    except BrokenPipeError:
        # The reader went away (``pyemu-img map x | head``): stop quietly, as a tool killed by SIGPIPE does.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keeps the interpreter's final flush quiet
        except OSError:
            pass
        return 141
    except OSError as exc:
        _error(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
        return status_on_error
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def command() -> NoReturn:
    """The ``pyemu-img`` program: :func:`main`, then :func:`~pyemu.system.leave.leave` with its status.

    Every command closes its images (flushed as its cache mode asks) and joins its threads before it
    returns, so nothing is left for the interpreter's teardown but freeing objects."""
    leave(main())


if __name__ == "__main__":  # pragma: no cover
    command()
