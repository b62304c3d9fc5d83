"""``pyemu-nbd``: serve one image file over NBD, with qemu-nbd's options, messages and exit codes.

    pyemu-nbd [OPTIONS] FILE

Scripts written for qemu-nbd keep working: ``-f``, ``-r``, ``-x``, ``-D``, ``-k``, ``-p``, ``-b``, ``-t``,
``-e``, ``-B``, ``--fork``, ``--pid-file``, ``--cache``. Without ``-t`` the server exits once its first
client has gone (qemu-nbd's default); ``-e N`` lets N clients in at once (0: no limit). ``-c`` would attach
a kernel ``/dev/nbd`` device, which pyemu does not drive: it is refused by name. Errors print
``pyemu-nbd: MESSAGE`` and exit 1, never a traceback.
"""

from __future__ import annotations

import getopt
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockError
from pyemu.errors import ConfigError
from pyemu.system.signals import install_termination_handlers

PROG = "pyemu-nbd"
VERSION = "0.1.0"

USAGE = """\
Usage: pyemu-nbd [OPTIONS] FILE
Serve FILE (an image file) over the Network Block Device protocol (qemu-nbd compatible).

  -h, --help                display this help and exit
  -V, --version             output version information and exit

Connection properties:
  -p, --port=PORT           port to listen on (default 10809)
  -b, --bind=IFACE          interface to bind to (default 0.0.0.0)
  -k, --socket=PATH         path to the unix socket (instead of TCP)
  -e, --shared=NUM          device can be shared by NUM clients (default 1; 0: unlimited)
  -t, --persistent          don't exit on the last connection
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description

Exposing part of the image:
  -B, --bitmap=NAME         expose a persistent dirty bitmap (qemu:dirty-bitmap:NAME)

Block device options:
  -f, --format=FORMAT       set image format (raw, qcow2, ...; probed when omitted)
  -r, --read-only           export read-only
      --cache=MODE          cache mode (none, writeback, writethrough, directsync, unsafe)

General purpose options:
      --fork                fork off the server process and exit the parent once the server is running
      --pid-file=PATH       store the server's process ID in the given file
  -c, --connect=DEV         (not supported: pyemu has no kernel NBD device)
"""

SHORT = "hVp:b:k:e:tx:D:B:f:rc:v"
LONG = ["help", "version", "port=", "bind=", "socket=", "shared=", "persistent", "export-name=", "description=",
        "bitmap=", "format=", "read-only", "cache=", "fork", "pid-file=", "connect=", "verbose"]
CACHE_MODES = ("none", "off", "writeback", "writethrough", "directsync", "unsafe")


class NbdCliError(Exception):
    """A usage or start-up error: printed as ``pyemu-nbd: MESSAGE``, exit status 1."""


@dataclass
class Options:
    filename: str
    port: int = 10809
    bind: str = "0.0.0.0"
    socket_path: str | None = None
    shared: int = 1
    persistent: bool = False
    export_name: str = ""
    description: str = ""
    bitmaps: tuple[str, ...] = ()
    format: str | None = None
    read_only: bool = False
    cache: str = "writeback"
    fork: bool = False
    pid_file: str | None = None


def parse_args(argv: list[str]) -> Options | None:
    """The options, or None when help/version was printed."""
    try:
        pairs, rest = getopt.gnu_getopt(argv, SHORT, LONG)
    except getopt.GetoptError as exc:
        raise NbdCliError(f"{exc.msg}\nTry `{PROG} --help' for more information.") from exc
    values: dict[str, object] = {}
    bitmaps: list[str] = []
    port_given = bind_given = False
    for key, value in pairs:
        if key in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return None
        if key in ("-V", "--version"):
            print(f"{PROG} {VERSION} (pyemu)")
            return None
        if key in ("-p", "--port"):
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise NbdCliError(f"Invalid port number '{value}'")  # qemu-nbd's wording
            values["port"] = int(value)
            port_given = True
        elif key in ("-b", "--bind"):
            values["bind"] = value
            bind_given = True
        elif key in ("-k", "--socket"):
            if len(value.encode()) >= 108:
                raise NbdCliError(f"socket path too long: {value}")
            values["socket_path"] = value
        elif key in ("-e", "--shared"):
            if not value.isdigit():
                raise NbdCliError(f"Invalid shared device number '{value}'")
            values["shared"] = int(value)
        elif key in ("-t", "--persistent"):
            values["persistent"] = True
        elif key in ("-x", "--export-name"):
            if len(value.encode()) > 4096:
                raise NbdCliError("export name too long")
            values["export_name"] = value
        elif key in ("-D", "--description"):
            if len(value.encode()) > 4096:
                raise NbdCliError("description too long")
            values["description"] = value
        elif key in ("-B", "--bitmap"):
            bitmaps.append(value)
        elif key in ("-f", "--format"):
            values["format"] = value
        elif key in ("-r", "--read-only"):
            values["read_only"] = True
        elif key == "--cache":
            if value not in CACHE_MODES:
                raise NbdCliError(f"Invalid cache mode '{value}'")
            values["cache"] = value
        elif key == "--fork":
            values["fork"] = True
        elif key == "--pid-file":
            values["pid_file"] = value
        elif key in ("-c", "--connect"):
            raise NbdCliError(f"-c/--connect is not supported: pyemu does not drive kernel NBD devices "
                              f"('{value}'); serve with -k or -p and connect a client instead")
    if len(rest) != 1:
        raise NbdCliError(f"Invalid number of arguments\nTry `{PROG} --help' for more information.")
    if values.get("socket_path") and (port_given or bind_given):
        raise NbdCliError("--socket is incompatible with --port and --bind")
    return Options(filename=rest[0], bitmaps=tuple(bitmaps), **values)  # type: ignore[arg-type]


def open_node(opts: Options) -> BlockDriver:
    from pyemu.block.image import open_image
    from pyemu.block.locking import default_permissions

    perm, shared = default_permissions(read_only=opts.read_only)
    try:
        return open_image(opts.filename, format=opts.format, read_only=opts.read_only,
                          cache_direct=opts.cache in ("none", "off", "directsync"), perm=perm, shared=shared,
                          no_flush=opts.cache == "unsafe")
    except (BlockError, ConfigError) as exc:
        raise NbdCliError(f"Failed to blk_new_open '{opts.filename}': {exc}") from exc


def find_bitmaps(node: BlockDriver, names: tuple[str, ...]) -> tuple[object, ...]:
    """The persistent bitmaps ``names`` of the opened image, as qemu-nbd's ``-B`` finds them."""
    if not names:
        return ()
    from pyemu.block.dirty_bitmap import bitmaps_of

    found = []
    for name in names:
        bitmap = bitmaps_of(node).get(name)
        if bitmap is None:
            raise NbdCliError(f"Bitmap '{name}' is not found")
        if getattr(bitmap, "inconsistent", False):
            raise NbdCliError(f"Bitmap '{name}' is inconsistent and cannot be used")
        found.append(bitmap)
    return tuple(found)


def bind(opts: Options) -> socket.socket:
    from pyemu.block.nbd.server import bind_tcp, bind_unix

    try:
        if opts.socket_path:
            return bind_unix(opts.socket_path)
        return bind_tcp(opts.bind, opts.port)
    except OSError as exc:
        where = opts.socket_path or f"{opts.bind}:{opts.port}"
        raise NbdCliError(f"Failed to bind socket to {where}: {exc.strerror or exc}") from exc


def serve(opts: Options) -> int:
    from pyemu.block.nbd.export import NbdExport
    from pyemu.block.nbd.server import NbdServer

    node = open_node(opts)
    listener: socket.socket | None = None
    try:
        bitmaps = find_bitmaps(node, opts.bitmaps)
        export = NbdExport(opts.export_name, node, description=opts.description, writable=not opts.read_only,
                           bitmaps=bitmaps, multi_conn=opts.shared != 1 or opts.read_only)  # type: ignore[arg-type]
        listener = bind(opts)
        ready_fd = -1
        if opts.fork:
            read_end, ready_fd = os.pipe()
            pid = os.fork()
            if pid:
                # The parent returns once the child serves (pid file written, socket accepting).
                os.close(ready_fd)
                ok = os.read(read_end, 1) == b"1"
                os._exit(0 if ok else 1)
            os.close(read_end)
            os.setsid()
        if opts.pid_file:
            with open(opts.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        stop = threading.Event()

        def on_idle() -> None:
            if not opts.persistent:
                stop.set()

        server = NbdServer(max_clients=opts.shared, on_idle=on_idle)
        server.add_export(export)
        install_termination_handlers(lambda _signum: stop.set(), (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        server.add_listener(listener)
        if ready_fd >= 0:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
        while not stop.wait(0.5):
            pass
        server.close()
        return 0
    finally:
        if listener is not None and opts.socket_path:
            try:
                os.unlink(opts.socket_path)
            except OSError:
                pass
        if opts.pid_file:
            try:
                os.unlink(opts.pid_file)
            except OSError:
                pass
        try:
            node.close()
        except (BlockError, OSError) as exc:
            print(f"{PROG}: error while closing '{opts.filename}': {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args)
        if opts is None:
            return 0
        return serve(opts)
    except NbdCliError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except (BlockError, ConfigError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
