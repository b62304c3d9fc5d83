"""``-chardev TYPE,id=ID,key=value,...`` (QEMU's spelling) to a validated config and a running backend.

The command-line parser keeps a ``-chardev`` as an :class:`~pyemu.system.config.ObjectOptions` (type,
id, raw properties) because only the backend type knows its properties. This module is that knowledge:
it maps each supported type onto the existing frozen specs of :mod:`pyemu.chardev.spec` (plus
:class:`~pyemu.chardev.pty.PtySpec`), so a ``-chardev socket,...`` and a ``-serial unix:...`` end up as
the same :class:`~pyemu.chardev.spec.SocketSpec` and open the same backend.

Supported, with QEMU's property names and defaults:

* ``socket,id=ID,path=PATH[,server=on|off][,wait=on|off]`` -- a Unix socket;
* ``socket,id=ID,host=HOST,port=PORT[,server=on|off][,wait=on|off][,nodelay=on|off]`` -- TCP;
  ``wait`` defaults to on for a server, as in QEMU (start-up blocks until a client connects);
* ``file,id=ID,path=PATH[,append=on|off]``;
* ``stdio,id=ID[,signal=on|off]`` -- ``signal=on`` (QEMU's default) lets Ctrl-C reach pyemu;
* ``pty,id=ID`` -- a new pseudo-terminal, announced on stderr;
* ``null,id=ID``.

Anything else is a :class:`~pyemu.errors.ConfigError` naming ``-chardev`` and echoing the option as
QEMU does (``-chardev socket,id=c0: chardev: socket: no host given``): unknown properties, QEMU
features pyemu does not have (``mux=on``, ``logfile``, ``telnet``, ``reconnect``, TLS, websockets) and
backend types it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from pyemu.chardev.base import CharBackend
from pyemu.chardev.file import FileBackend
from pyemu.chardev.null import NullBackend
from pyemu.chardev.pty import PtyBackend, PtySpec
from pyemu.chardev.socket import SocketBackend
from pyemu.chardev.spec import FileSpec, NullSpec, SocketSpec, StdioSpec
from pyemu.chardev.stdio import StdioBackend
from pyemu.errors import ConfigError
from pyemu.system.config import ObjectOptions

OPTION = "-chardev"
SUPPORTED_TYPES = ("socket", "file", "stdio", "pty", "null")
#: QEMU backend types pyemu knows by name but does not implement (a clearer error than "not valid").
QEMU_ONLY_TYPES = ("udp", "msmouse", "wctablet", "braille", "serial", "tty", "parallel", "parport", "pipe",
                   "ringbuf", "memory", "vc", "spicevmc", "spiceport", "qemu-vdagent", "dbus", "testdev")
#: QEMU properties every backend accepts; pyemu accepts them only at their "feature off" values.
COMMON_OFF_VALUES = {"mux": ("off", "no", "false"), "logappend": ("off", "no", "false")}

BackendSpec = Union[SocketSpec, FileSpec, StdioSpec, NullSpec, PtySpec]


@dataclass(frozen=True)
class ChardevConfig:
    """One validated ``-chardev``: its id, what to open, and the stdio-only ``signal`` setting."""

    id: str
    spec: BackendSpec
    signal: bool = True

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigError(f"{OPTION}: Parameter 'id' is missing", option=OPTION)


def describe(options: ObjectOptions) -> str:
    """The option as the user wrote it (QEMU repeats the option in front of its error messages)."""
    props = "".join(f",{key}={value.replace(',', ',,')}" for key, value in options.props)
    return f"{options.type},id={options.id}{props}"


class _Props:
    """The properties of one ``-chardev``, taken one by one; leftovers are errors."""

    def __init__(self, options: ObjectOptions) -> None:
        self.options = options
        self.where = f"{OPTION} {describe(options)}"
        self._values: dict[str, str] = {}
        for key, value in options.props:
            if key in self._values:
                raise self.error(f"Parameter '{key}' given twice")
            self._values[key] = value

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}", option=OPTION)

    def text(self, name: str) -> str | None:
        return self._values.pop(name, None)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._values.pop(name, None)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("on", "yes", "true", "y"):
            return True
        if lowered in ("off", "no", "false", "n"):
            return False
        raise self.error(f"Parameter '{name}' expects 'on' or 'off'")

    def finish(self) -> None:
        for name, value in list(self._values.items()):
            if name in COMMON_OFF_VALUES and value.lower() in COMMON_OFF_VALUES[name]:
                continue
            if name in ("mux", "logfile", "logappend", "telnet", "tn3270", "websocket", "reconnect", "tls-creds",
                        "tls-authz", "fd", "abstract", "tight", "to", "ipv4", "ipv6"):
                raise self.error(f"Parameter '{name}' is a QEMU feature pyemu does not support")
            raise self.error(f"Invalid parameter '{name}'")


def parse_chardev_options(options: ObjectOptions) -> ChardevConfig:
    """Validate one ``-chardev`` without opening anything (so a typo fails before any socket exists)."""
    props = _Props(options)
    kind = options.type
    signal = True
    spec: BackendSpec
    if kind == "socket":
        spec = _socket(props)
    elif kind == "file":
        path = props.text("path")
        if not path:
            raise props.error("chardev: file: no filename given")
        append = props.boolean("append", False)
        spec = FileSpec(path, append=append)
    elif kind == "stdio":
        signal = props.boolean("signal", True)
        spec = StdioSpec()
    elif kind == "pty":
        spec = PtySpec(options.id)
    elif kind == "null":
        spec = NullSpec()
    elif kind in QEMU_ONLY_TYPES:
        raise props.error(f"chardev type '{kind}' is not supported by pyemu "
                          f"(supported: {', '.join(SUPPORTED_TYPES)})")
    else:
        raise props.error(f"'{kind}' is not a valid char driver name")
    props.finish()
    return ChardevConfig(options.id, spec, signal)


def _socket(props: _Props) -> SocketSpec:
    path = props.text("path")
    host = props.text("host")
    port_text = props.text("port")
    server = props.boolean("server", False)
    wait = props.boolean("wait", True)
    nodelay = props.boolean("nodelay", False)
    if path is not None and (host is not None or port_text is not None):
        raise props.error("chardev: socket: give either 'path' (unix) or 'host' and 'port' (tcp), not both")
    if not server and props.options.prop("wait") is not None:
        raise props.error("'wait' option is incompatible with socket in client connect mode")
    try:
        if path is not None:
            if not path:
                raise props.error("chardev: socket: 'path' is empty")
            if nodelay:
                raise props.error("'nodelay' applies to tcp sockets only")
            return SocketSpec("unix", path=path, server=server, wait=wait if server else True)
        if host is None:
            raise props.error("chardev: socket: no host given")
        if not port_text:
            raise props.error("chardev: socket: no port given")
        try:
            port = int(port_text, 10)
        except ValueError:
            raise props.error(f"chardev: socket: port '{port_text}' is not a number") from None
        return SocketSpec("tcp", host=host, port=port, server=server, wait=wait if server else True,
                          nodelay=nodelay)
    except ConfigError as exc:
        if exc.option == OPTION:
            raise
        raise props.error(str(exc)) from None


def open_chardev_options(options: ObjectOptions | ChardevConfig, *, connect_timeout: float | None = None,
                         notice: Callable[[str], None] | None = None) -> CharBackend:
    """Open the backend a ``-chardev`` describes. ``connect_timeout`` bounds a socket's start-up wait
    (None waits like QEMU); ``notice`` replaces the stderr line of a socket server that waits or of a
    pty (tests). Raises ConfigError for a malformed option, ChardevError when opening fails."""
    config = options if isinstance(options, ChardevConfig) else parse_chardev_options(options)
    spec = config.spec
    if isinstance(spec, SocketSpec):
        if notice is not None:
            return SocketBackend(spec, connect_timeout=connect_timeout, notice=notice)
        return SocketBackend(spec, connect_timeout=connect_timeout)
    if isinstance(spec, FileSpec):
        return FileBackend(spec)
    if isinstance(spec, StdioSpec):
        # No Ctrl-A escapes: a plain QEMU ``-chardev stdio`` has none (that is ``mux=on``), and Ctrl-A is
        # a key a shell on the port wants. ``signal=on`` keeps Ctrl-C as the way out, as in QEMU.
        return StdioBackend(allow_signals=config.signal, escapes=False)
    if isinstance(spec, PtySpec):
        if notice is not None:
            return PtyBackend(spec, notice=notice)
        return PtyBackend(spec)
    return NullBackend(config.id)
