"""``-netdev tap,...`` properties, checked with QEMU's spellings and refused clearly where pyemu differs.

Accepted (as QEMU): ``ifname=NAME``, ``fd=N`` (an inherited, already-open TAP), ``script=no``,
``downscript=no``, ``vnet_hdr=on|off``, ``vhost=off``, ``vhostforce=off``, ``queues=1``.

Refused on purpose, each with the reason:

* ``script=PATH`` / ``downscript=PATH``: pyemu never runs helper scripts (running host commands as the
  VMM's user is a privilege QEMU's users often do not mean to grant); set the TAP up before start-up.
  Leaving ``script=`` out means no script here, where QEMU would run ``/etc/qemu-ifup``.
* ``vhost=on``: the data path is in pyemu, there is no vhost-net back-end.
* ``queues>1``, ``fds=``, ``helper=``, ``br=``: multiqueue TAPs and the bridge helper are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.errors import ConfigError
from pyemu.net.tap import IFNAMSIZ, TapDevice, open_tap, tap_from_fd
from pyemu.system.config import ObjectOptions, parse_on_off

TAP_PROPS = ("ifname", "fd", "script", "downscript", "vnet_hdr", "vhost", "vhostforce", "queues")
NOT_WITH_FD = ("ifname", "script", "downscript", "vnet_hdr", "queues")
NO_SCRIPT = ("", "no")


@dataclass(frozen=True)
class TapOptions:
    """One validated ``-netdev tap``. ``vnet_hdr`` None means "use it when the kernel offers it"."""

    id: str
    ifname: str = ""
    fd: int | None = None
    vnet_hdr: bool | None = None

    def __post_init__(self) -> None:
        where = f"-netdev tap,id={self.id}"
        if self.fd is not None:
            if self.fd < 0:
                raise ConfigError(f"{where}: fd={self.fd} is not a file descriptor", option="-netdev")
            if self.ifname or self.vnet_hdr is not None:
                raise ConfigError(f"{where}: ifname=, script=, downscript=, vnet_hdr= and queues= are invalid "
                                  "with fd=", option="-netdev")
        if len(self.ifname.encode()) >= IFNAMSIZ or "/" in self.ifname or any(c.isspace() for c in self.ifname):
            raise ConfigError(f"{where}: invalid ifname '{self.ifname}' (at most {IFNAMSIZ - 1} bytes, no '/' "
                              "or spaces)", option="-netdev")

    @classmethod
    def from_netdev(cls, entry: ObjectOptions) -> TapOptions:
        """Parse and check the properties of ``-netdev tap,id=ID,...``."""
        where = f"-netdev {entry.type},id={entry.id}"
        if entry.type != "tap":
            raise ConfigError(f"{where}: network backend type '{entry.type}' is not supported (supported: tap)",
                              option="-netdev")
        props: dict[str, str] = {}
        for key, value in entry.props:
            if key in props:
                raise ConfigError(f"{where}: parameter '{key}' given twice", option="-netdev")
            props[key] = value
        for key in props:
            if key in ("fds", "helper", "br", "vhostfd", "vhostfds"):
                raise ConfigError(f"{where}: parameter '{key}' is not supported by pyemu (no multiqueue TAPs, "
                                  "no bridge helper, no vhost)", option="-netdev")
            if key not in TAP_PROPS:
                raise ConfigError(f"{where}: Invalid parameter '{key}'", option="-netdev")
        for key in ("script", "downscript"):
            value = props.get(key, "")
            if value not in NO_SCRIPT:
                raise ConfigError(f"{where}: {key}={value}: pyemu does not run network scripts; configure the "
                                  f"TAP beforehand and use {key}=no", option="-netdev")
        for key in ("vhost", "vhostforce"):
            if key in props and _on_off(where, key, props[key]):
                raise ConfigError(f"{where}: {key}=on: vhost-net is not supported (pyemu moves the frames "
                                  f"itself); use {key}=off or leave it out", option="-netdev")
        if "queues" in props:
            try:
                queues = int(props["queues"], 0)
            except ValueError:
                raise ConfigError(f"{where}: Parameter 'queues' expects a number", option="-netdev") from None
            if queues != 1:
                raise ConfigError(f"{where}: queues={queues}: multiqueue TAPs are not supported (use queues=1)",
                                  option="-netdev")
        fd: int | None = None
        if "fd" in props:
            given = [k for k in NOT_WITH_FD if k in props]
            if given:
                raise ConfigError(f"{where}: ifname=, script=, downscript=, vnet_hdr= and queues= are invalid "
                                  f"with fd= (got {given[0]}=)", option="-netdev")
            try:
                fd = int(props["fd"], 10)
            except ValueError:
                raise ConfigError(f"{where}: fd={props['fd']}: expected a file descriptor number (monitor fd "
                                  "names are not supported)", option="-netdev") from None
        vnet_hdr = _on_off(where, "vnet_hdr", props["vnet_hdr"]) if "vnet_hdr" in props else None
        return cls(id=entry.id, ifname=props.get("ifname", ""), fd=fd, vnet_hdr=vnet_hdr)


def _on_off(where: str, key: str, value: str) -> bool:
    try:
        return parse_on_off(value, key)
    except ConfigError:
        raise ConfigError(f"{where}: Parameter '{key}' expects 'on' or 'off'", option="-netdev") from None


def open_netdev(options: TapOptions) -> TapDevice:
    """Open the TAP the options describe (raises :class:`~pyemu.net.TapError`)."""
    if options.fd is not None:
        return tap_from_fd(options.fd)
    return open_tap(options.ifname, vnet_hdr=options.vnet_hdr)
