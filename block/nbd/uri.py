"""NBD addresses: QEMU's ``server.type=unix|inet`` options and the URL forms people type.

Accepted, as QEMU and libnbd spell them (the URI standard for NBD, doc/uri.md in NetworkBlockDevice/nbd):

* ``nbd://HOST[:PORT][/EXPORT]`` -- TCP, port 10809 by default;
* ``nbd+unix:///[EXPORT]?socket=PATH`` -- a Unix socket;
* QEMU's legacy ``nbd:HOST:PORT[:exportname=NAME]`` and ``nbd:unix:PATH[:exportname=NAME]``.

TLS forms (``nbds://``) are refused by name rather than silently connecting in clear.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from pyemu.block.errors import BlockConfigError
from pyemu.block.nbd import URL_PREFIXES, is_nbd_url  # noqa: F401 (re-exported)
from pyemu.block.nbd.protocol import DEFAULT_PORT, MAX_STRING



@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD server listens: ``kind`` "unix" (``path``) or "inet" (``host``, ``port``)."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if self.kind == "unix":
            if not self.path:
                raise BlockConfigError("NBD: a unix address needs a socket path", option=None)
        elif self.kind == "inet":
            if not self.host:
                raise BlockConfigError("NBD: an inet address needs a host", option=None)
            if type(self.port) is not int or not 0 < self.port < 65536:  # noqa: E721
                raise BlockConfigError(f"NBD: port {self.port!r} is not in 1..65535", option=None)
        else:
            raise BlockConfigError(f"NBD: server.type must be unix or inet, not '{self.kind}'", option=None)

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NbdTarget:
    address: NbdAddress
    export: str = ""

    def url(self) -> str:
        """The canonical URL (what messages and ``qemu-img info`` show)."""
        name = urllib.parse.quote(self.export)
        if self.address.kind == "unix":
            return f"nbd+unix:///{name}?socket={self.address.path}"
        host = f"[{self.address.host}]" if ":" in self.address.host else self.address.host
        return f"nbd://{host}:{self.address.port}/{name}"


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BlockConfigError(f"NBD: invalid port '{text}' in '{url}'", option=None)
    return int(text)


def _check_export(name: str) -> str:
    if len(name.encode("utf-8")) > MAX_STRING:
        raise BlockConfigError(f"NBD: export name longer than {MAX_STRING} bytes", option=None)
    return name


def parse_nbd_url(url: str) -> NbdTarget:
    """Parse any accepted form (see the module docstring); BlockConfigError for anything else."""
    if url.startswith(("nbds://", "nbds+unix://")):
        raise BlockConfigError(f"NBD: TLS ('{url.split(':', 1)[0]}') is not supported", option=None)
    if url.startswith(("nbd://", "nbd+tcp://", "nbd+unix://")):
        return _parse_uri(url)
    if url.startswith("nbd:"):
        return _parse_legacy(url)
    raise BlockConfigError(f"NBD: '{url}' is not an NBD URL", option=None)


def _parse_uri(url: str) -> NbdTarget:
    parts = urllib.parse.urlsplit(url)
    export = _check_export(urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path))
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme == "nbd+unix":
        if parts.netloc:
            raise BlockConfigError(f"NBD: a nbd+unix URL has no host: '{url}'", option=None)
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise BlockConfigError(f"NBD: '{url}' needs exactly one socket=PATH", option=None)
        if query:
            raise BlockConfigError(f"NBD: unknown URL parameter '{next(iter(query))}'", option=None)
        return NbdTarget(NbdAddress("unix", path=sockets[0]), export)
    if query:
        raise BlockConfigError(f"NBD: unknown URL parameter '{next(iter(query))}'", option=None)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError as exc:
        raise BlockConfigError(f"NBD: invalid port in '{url}'", option=None) from exc
    if not host:
        raise BlockConfigError(f"NBD: '{url}' names no host", option=None)
    return NbdTarget(NbdAddress("inet", host=host, port=DEFAULT_PORT if port is None else port), export)


def _parse_legacy(url: str) -> NbdTarget:
    rest = url[len("nbd:"):]
    export = ""
    if ":exportname=" in rest:
        rest, export = rest.split(":exportname=", 1)
    export = _check_export(export)
    if rest.startswith("unix:"):
        path = rest[len("unix:"):]
        return NbdTarget(NbdAddress("unix", path=path), export)
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(DEFAULT_PORT)
    host = host.strip("[]")
    return NbdTarget(NbdAddress("inet", host=host, port=_port(port, url)), export)


def target_from_options(options: dict[str, str]) -> NbdTarget:
    """QEMU's flat ``driver=nbd`` options: ``server.type``, ``server.path`` / ``server.host``,
    ``server.port``, ``export`` (``path``/``host``/``port`` legacy spellings accepted)."""
    opts = dict(options)
    kind = opts.pop("server.type", "")
    path = opts.pop("server.path", opts.pop("path", ""))
    host = opts.pop("server.host", opts.pop("host", ""))
    port_text = opts.pop("server.port", opts.pop("port", str(DEFAULT_PORT)))
    export = _check_export(opts.pop("export", ""))
    if opts:
        raise BlockConfigError(f"NBD: unknown option '{next(iter(opts))}'", option=None)
    if not kind:
        kind = "unix" if path else "inet"
    if kind == "unix":
        if host:
            raise BlockConfigError("NBD: server.host is not valid with server.type=unix", option=None)
        return NbdTarget(NbdAddress("unix", path=path), export)
    if path:
        raise BlockConfigError("NBD: server.path is not valid with server.type=inet", option=None)
    return NbdTarget(NbdAddress(kind, host=host, port=_port(port_text, "server.port")), export)
