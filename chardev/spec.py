"""QEMU-style character-device spec strings (``-serial stdio``, ``unix:/tmp/s,server,nowait``, ...).

The parser only turns the string into a frozen, validated dataclass; :func:`pyemu.chardev.open_chardev`
turns a spec into a running backend. Accepted forms (as QEMU's legacy ``-serial`` syntax):

``stdio``, ``null``, ``none``, ``file:PATH`` (the rest of the string is the path, commas included),
``unix:PATH[,server][,nowait]``, ``tcp:[HOST]:PORT[,server][,nowait][,nodelay]``, ``chardev:ID`` (a
``-chardev``, opened by the board from that option). Booleans may also be
written ``server=on|off``, ``wait=on|off``, ``nodelay=on|off``; ``,,`` is a literal comma in a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from pyemu.errors import ConfigError

UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the terminating NUL


@dataclass(frozen=True)
class StdioSpec:
    """The VMM's own stdin/stdout (raw terminal with the Ctrl-A escape when stdin is a tty)."""

    def __str__(self) -> str:
        return "stdio"


@dataclass(frozen=True)
class NullSpec:
    """The device exists; output is discarded and there is never input."""

    def __str__(self) -> str:
        return "null"


@dataclass(frozen=True)
class NoneSpec:
    """No device at all (``-serial none``): the board should not create the port."""

    def __str__(self) -> str:
        return "none"


@dataclass(frozen=True)
class FileSpec:
    """Output to ``path`` (created, truncated unless ``append``); no input."""

    path: str
    append: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("chardev 'file:' needs a path (file:PATH)")

    def __str__(self) -> str:
        return f"file:{self.path}"


@dataclass(frozen=True)
class SocketSpec:
    """A Unix or TCP stream socket, listening (``server``) or connecting.

    For a server, ``wait`` makes start-up block until the first client connects (QEMU's default);
    ``port=0`` asks the kernel for a free TCP port (the backend reports the one it got).
    """

    family: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    server: bool = False
    wait: bool = True
    nodelay: bool = False

    def __post_init__(self) -> None:
        if self.family == "unix":
            if not self.path:
                raise ConfigError("chardev 'unix:' needs a socket path (unix:PATH[,server][,nowait])")
            if len(self.path.encode()) > UNIX_PATH_MAX:
                raise ConfigError(
                    f"chardev unix socket path is {len(self.path.encode())} bytes long; "
                    f"at most {UNIX_PATH_MAX} fit in a socket address"
                )
            if self.nodelay:
                raise ConfigError("chardev option 'nodelay' applies to tcp: sockets only")
        elif self.family == "tcp":
            if not 0 <= self.port <= 65535:
                raise ConfigError(f"chardev tcp port {self.port} out of range 0-65535")
            if not self.server and self.port == 0:
                raise ConfigError("chardev tcp client needs a port number other than 0")
        else:
            raise ConfigError(f"chardev socket family must be 'unix' or 'tcp', not '{self.family}'")
        if not self.server and not self.wait:
            raise ConfigError("chardev option 'nowait' is only valid with 'server'")

    @property
    def bind_host(self) -> str:
        """The host to listen on or connect to (empty means all interfaces / the local host)."""
        if self.host:
            return self.host
        return "0.0.0.0" if self.server else "localhost"

    def __str__(self) -> str:
        if self.family == "unix":
            text = "unix:" + self.path.replace(",", ",,")
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
            text = f"tcp:{host}:{self.port}"
        if self.server:
            text += ",server"
            if not self.wait:
                text += ",nowait"
        if self.nodelay:
            text += ",nodelay"
        return text


@dataclass(frozen=True)
class ChardevRefSpec:
    """``chardev:ID``: the port uses the ``-chardev`` with that id (libvirt's way of wiring a serial port).
    The board opens it from the ``-chardev``'s own options."""

    id: str

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigError("'chardev:' needs a -chardev id (chardev:ID)")

    def __str__(self) -> str:
        return f"chardev:{self.id}"


ChardevSpec = Union[StdioSpec, NullSpec, NoneSpec, FileSpec, SocketSpec, ChardevRefSpec]

_UNSUPPORTED = {
    "pty": "a pseudo-terminal",
    "vc": "a graphical console",
    "mon": "a monitor multiplexer (use -serial stdio; Ctrl-A x quits)",
    "telnet": "telnet",
    "udp": "UDP",
    "pipe": "named pipes",
    "serial": "host serial ports",
    "tty": "host serial ports",
    "ringbuf": "ring buffers",
}


def parse_chardev_spec(text: str, option: str = "-serial") -> ChardevSpec:
    """Parse ``text``; malformed or unsupported specs raise :class:`ConfigError` naming ``option``."""
    try:
        return _parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{option} {text!r}: {exc}", option=option) from None


def _parse(text: str) -> ChardevSpec:
    if not text:
        raise ConfigError("empty character device spec")
    if text == "stdio":
        return StdioSpec()
    if text == "null":
        return NullSpec()
    if text == "none":
        return NoneSpec()
    kind, colon, rest = text.partition(":")
    if kind == "file" and colon:
        return FileSpec(rest)
    if kind == "chardev" and colon:
        return ChardevRefSpec(rest)
    if kind == "unix" and colon:
        fields = _split_options(rest)
        server, wait, nodelay = _socket_flags(fields[1:], allow_nodelay=False)
        return SocketSpec("unix", path=fields[0], server=server, wait=wait, nodelay=nodelay)
    if kind == "tcp" and colon:
        fields = _split_options(rest)
        host, port = _host_port(fields[0])
        server, wait, nodelay = _socket_flags(fields[1:], allow_nodelay=True)
        return SocketSpec("tcp", host=host, port=port, server=server, wait=wait, nodelay=nodelay)
    if kind in _UNSUPPORTED:
        raise ConfigError(f"'{kind}' backends ({_UNSUPPORTED[kind]}) are not supported")
    if kind in ("stdio", "null", "none"):
        raise ConfigError(f"'{kind}' takes no options")
    raise ConfigError(
        "unknown character device (supported: stdio, null, none, file:PATH, "
        "unix:PATH[,server][,nowait], tcp:[HOST]:PORT[,server][,nowait], chardev:ID)"
    )


def _split_options(text: str) -> list[str]:
    """Split on single commas; ``,,`` stands for a literal comma (QemuOpts convention)."""
    fields = [""]
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1 : i + 2] == ",":
                fields[-1] += ","
                i += 2
                continue
            fields.append("")
        else:
            fields[-1] += char
        i += 1
    return fields


def _on_off(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "yes", "true"):
        return True
    if lowered in ("off", "no", "false"):
        return False
    raise ConfigError(f"option '{name}' expects 'on' or 'off', not '{value}'")


def _socket_flags(options: list[str], *, allow_nodelay: bool) -> tuple[bool, bool, bool]:
    """(server, wait, nodelay) from the options after the address."""
    flags: dict[str, bool] = {}
    for item in options:
        name, equals, value = item.partition("=")
        if name == "nowait" and not equals:
            key, setting = "wait", False
        elif name in ("server", "wait", "nodelay"):
            key, setting = name, (_on_off(name, value) if equals else True)
        elif not name:
            raise ConfigError("empty option (stray comma)")
        else:
            raise ConfigError(f"unknown socket option '{name}' (known: server, nowait, wait=on|off"
                              + (", nodelay" if allow_nodelay else "") + ")")
        if key == "nodelay" and not allow_nodelay:
            raise ConfigError("option 'nodelay' applies to tcp: sockets only")
        if key in flags:
            raise ConfigError(f"option '{name}' given twice")
        flags[key] = setting
    if not flags.get("server", False) and "wait" in flags:
        raise ConfigError("option 'wait'/'nowait' is only valid with 'server'")
    return flags.get("server", False), flags.get("wait", True), flags.get("nodelay", False)


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigError("tcp address must be [IPV6]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ConfigError("tcp: needs HOST:PORT (HOST may be empty: tcp::4444,server)")
        if ":" in host:
            raise ConfigError("write IPv6 addresses in brackets: tcp:[::1]:PORT")
    if not port_text.isdigit():
        raise ConfigError(f"tcp port '{port_text}' is not a number")
    return host, int(port_text)
