"""QEMU-style command-line parsing: single-dash options, ``key=value`` lists, clear one-line errors.

Only words become configuration here (:class:`~pyemu.system.config.VmConfig`); validation lives in the
config classes. Errors are :class:`~pyemu.errors.ConfigError` naming the option, which the entry point
prints as ``pyemu: -foo: invalid option`` with exit status 1, as QEMU does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyemu.errors import ConfigError
from pyemu.system.config import (DeviceOptions, MachineOptions, MonitorOptions, ObjectOptions, VmConfig,
                                 parse_on_off, parse_size)
from pyemu.system import log


@dataclass(frozen=True)
class OptionSpec:
    name: str
    takes_arg: bool
    help: str
    arg_name: str = ""


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("machine", True, "select the board and its options: microvm[,acpi=on|off][,pit=on|off]"
               "[,pic=on|off][,rtc=on|off][,isa-serial=on|off]", "type[,prop=value...]"),
    OptionSpec("M", True, "same as -machine", "type[,prop=value...]"),
    OptionSpec("accel", True, "accelerator: tcg, kvm, or a fallback list kvm:tcg", "name[:name...]"),
    OptionSpec("enable-kvm", False, "same as -accel kvm"),
    OptionSpec("m", True, "guest RAM size, e.g. 512M, 2G (a bare number is MiB)", "size"),
    OptionSpec("smp", True, "number of vCPUs", "n[,cpus=n]"),
    OptionSpec("kernel", True, "Linux bzImage, PVH ELF vmlinux or multiboot kernel to boot directly", "file"),
    OptionSpec("initrd", True, "initial ramdisk for -kernel", "file"),
    OptionSpec("append", True, "kernel command line", "cmdline"),
    OptionSpec("serial", True, "redirect COM1: stdio, null, none, file:PATH, unix:PATH[,server][,nowait], "
               "tcp:HOST:PORT[,server][,nowait]", "dev"),
    OptionSpec("nographic", False, "no display; COM1 on stdio unless -serial says otherwise"),
    OptionSpec("no-reboot", False, "exit instead of rebooting"),
    OptionSpec("no-shutdown", False, "keep the VM (stopped, status shutdown) after a guest power-off, until "
               "quit or system_reset"),
    OptionSpec("device", True, "add a device (-device help lists them)", "driver[,prop=value...]"),
    OptionSpec("drive", True, "a disk image: file=PATH[,format=raw][,if=none|virtio][,id=ID][,readonly=on]"
               "[,cache=writeback|writethrough|none|directsync|unsafe][,discard=ignore|unmap]", "option[,option...]"),
    OptionSpec("object", True, "a backend object: iothread,id=ID | rng-random,id=ID,filename=PATH",
               "type,id=ID[,prop=value...]"),
    OptionSpec("chardev", True, "a character backend: socket|file|stdio|pty|null,id=ID[,...]",
               "backend,id=ID[,prop=value...]"),
    OptionSpec("netdev", True, "a network backend: tap,id=ID[,ifname=NAME][,script=no][,downscript=no][,fd=N]",
               "tap,id=ID[,prop=value...]"),
    OptionSpec("snapshot", False, "write to temporary files instead of disk images (every -drive gets "
               "snapshot=on)"),
    OptionSpec("S", False, "create the VM with its CPUs stopped (prelaunch; QMP 'cont' starts it)"),
    OptionSpec("qmp", True, "a QMP monitor: unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off "
               "| stdio (repeatable); server=off connects out to a listening client", "dev"),
    OptionSpec("qmp-pretty", True, "like -qmp, with pretty-printed JSON replies", "dev"),
    OptionSpec("monitor", True, "the human monitor (HMP): stdio | unix:PATH,server=on,wait=off | "
               "tcp:HOST:PORT,server=on,wait=off | none (repeatable)", "dev"),
    OptionSpec("mon", True, "a monitor on a -chardev: mode=control is QMP, mode=readline (the default) HMP",
               "chardev=ID[,mode=control|readline][,pretty=on|off]"),
    OptionSpec("name", True, "the guest name (QMP query-name)", "[guest=]name[,debug-threads=on|off]"),
    OptionSpec("pidfile", True, "write the process id to FILE (locked while pyemu runs, removed at exit)",
               "file"),
    OptionSpec("uuid", True, "the VM UUID (QMP query-uuid)", "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"),
    OptionSpec("display", True, "only 'none': pyemu has no graphical display", "none"),
    OptionSpec("nodefaults", False, "accepted for QEMU compatibility (pyemu adds no default devices beyond "
               "COM1; use -serial none)"),
    OptionSpec("no-user-config", False, "accepted for QEMU compatibility (pyemu reads no config files)"),
    OptionSpec("d", True, "log categories, comma separated (-d help lists them)", "item1[,...]"),
    OptionSpec("D", True, "write the -d log to a file", "logfile"),
    OptionSpec("version", False, "print the version and exit"),
    OptionSpec("help", False, "print this help and exit"),
    OptionSpec("h", False, "same as -help"),
)
_BY_NAME = {spec.name: spec for spec in OPTIONS}


class EarlyExit(Exception):
    """-help / -version / -d help: print ``text`` and exit 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def split_props(text: str, option: str, *, implied: str | None) -> tuple[str | None, list[tuple[str, str]]]:
    """Split ``first,key=value,...``. ``first`` is the implied key's value when it has no ``=``.
    A doubled comma stands for a literal comma, as in QEMU."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "," and text[i + 1 : i + 2] == ",":
            current += ","
            i += 2
            continue
        if ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    parts.append(current)
    head: str | None = None
    props: list[tuple[str, str]] = []
    for index, part in enumerate(parts):
        if "=" in part:
            key, value = part.split("=", 1)
            if not key:
                raise ConfigError(f"{option}: invalid parameter '{part}'", option=option)
            props.append((key, value))
        elif index == 0 and implied is not None:
            head = part
        elif part:
            props.append((part, "on"))  # bare flag, e.g. "server"
        else:
            raise ConfigError(f"{option}: empty parameter in '{text}'", option=option)
    return head, props


def help_text() -> str:
    lines = ["usage: pyemu [options]", "", "A QEMU-shaped virtual machine monitor in Python.", ""]
    for spec in OPTIONS:
        left = f"-{spec.name}" + (f" {spec.arg_name}" if spec.arg_name else "")
        lines.append(f"{left:<36} {spec.help}")
    lines.append("")
    lines.append("With no -kernel, pyemu boots the default Debian guest (see `pyemu-guest fetch`).")
    return "\n".join(lines)


def _machine(value: str) -> tuple[MachineOptions, tuple[str, ...] | None]:
    """Parse -machine; returns the options and the accelerator list from ``accel=`` if given."""
    head, props = split_props(value, "-machine", implied="type")
    kwargs: dict[str, bool | None] = {}
    accel: tuple[str, ...] | None = None
    known = {"acpi": "acpi", "pit": "pit", "pic": "pic", "rtc": "rtc", "isa-serial": "isa_serial"}
    for key, val in props:
        if key == "type":
            head = val
        elif key in known:
            if val == "auto":
                kwargs[known[key]] = None
            else:
                kwargs[known[key]] = parse_on_off(val, key)
        elif key == "accel":
            accel = _accel(val)
        else:
            raise ConfigError(f"-machine: Property 'microvm.{key}' not found", option="-machine")
    machine_type = head or "microvm"
    if machine_type == "help":
        raise EarlyExit("Supported machines are:\nmicrovm              microvm (i386), QEMU-compatible options")
    return MachineOptions(type=machine_type, **kwargs), accel  # type: ignore[arg-type]


def _accel(value: str) -> tuple[str, ...]:
    head, props = split_props(value, "-accel", implied="accel")
    for key, _ in props:
        if key not in ("thread",):
            raise ConfigError(f"-accel: Property '{key}' not found", option="-accel")
    if head in (None, ""):
        raise ConfigError("-accel: expects an accelerator name", option="-accel")
    if head == "help":
        raise EarlyExit("Accelerators supported in pyemu:\ntcg\nkvm")
    names = tuple(head.split(":"))
    for name in names:
        if name not in ("tcg", "kvm"):
            raise ConfigError(f"-accel: invalid accelerator {name}", option="-accel")
    return names


def _smp(value: str) -> int:
    head, props = split_props(value, "-smp", implied="cpus")
    count = head
    for key, val in props:
        if key in ("cpus", "maxcpus"):
            if key == "cpus":
                count = val
        elif key in ("sockets", "cores", "threads", "dies"):
            continue
        else:
            raise ConfigError(f"-smp: Invalid parameter '{key}'", option="-smp")
    try:
        return int(count or "1", 0)
    except ValueError:
        raise ConfigError("-smp: Parameter 'cpus' expects a number", option="-smp") from None


def _memory(value: str) -> int:
    head, props = split_props(value, "-m", implied="size")
    size = head
    for key, val in props:
        if key == "size":
            size = val
        elif key in ("slots", "maxmem"):
            continue
        else:
            raise ConfigError(f"-m: Invalid parameter '{key}'", option="-m")
    if not size:
        raise ConfigError("-m: missing 'size' option value", option="-m")
    return parse_size(size, option="-m")


def _device(value: str) -> DeviceOptions:
    head, props = split_props(value, "-device", implied="driver")
    if not head:
        raise ConfigError("-device: 'driver' parameter is missing", option="-device")
    if head == "help":
        raise EarlyExit(DEVICE_HELP)
    return DeviceOptions(head, tuple(props))


DEVICE_HELP = """Devices you can add with -device:
isa-debug-exit          iobase=0xf4, iosize=4
virtio-blk-device       drive=ID (a -drive if=none), serial=, num-queues=, queue-size=, iothread=, discard=, write-zeroes=
virtio-rng-device       rng=ID (a -object rng-random), max-bytes=, period=, iothread=
virtio-serial-device    iothread=, max_ports=, emergency-write= (carries virtconsole/virtserialport ports)
virtconsole             chardev=ID, name=, nr= (the guest's hvc console on the newest virtio-serial-device)
virtserialport          chardev=ID, name=, nr= (a /dev/vportNpM port)
virtio-net-device       netdev=ID (a -netdev tap), mac=, iothread=, rx_queue_size=, tx_queue_size=, mrg_rxbuf=, csum=, ...
vhost-vsock-device      guest-cid=, uds-path=PATH (pyemu: host side over a Unix socket, as Firecracker)"""


def _backend(option: str, value: str) -> ObjectOptions:
    """``-object``/``-chardev``/``-netdev``: ``TYPE,id=ID,key=value...``."""
    head, props = split_props(value, option, implied="type")
    if head == "help":
        raise EarlyExit(f"{option} types: " + {"-object": "iothread, rng-random", "-chardev":
                        "socket, file, stdio, pty, null", "-netdev": "tap"}.get(option, ""))
    rest = [(k, v) for k, v in props if k not in ("id", "qom-type", "type")]
    kind = head or dict(props).get("qom-type") or dict(props).get("type")
    ident = dict(props).get("id")
    if not kind:
        raise ConfigError(f"{option}: a backend type is required", option=option)
    if not ident:
        raise ConfigError(f"{option}: Parameter 'id' is missing", option=option)
    return ObjectOptions(kind, ident, tuple(rest))


def _qmp(value: str) -> MonitorOptions:
    from pyemu.monitor.server import parse_qmp_spec

    parse_qmp_spec(value)  # fail on the command line, not when the VM starts
    return MonitorOptions(spec=value)


def _mon(value: str) -> MonitorOptions:
    head, props = split_props(value, "-mon", implied="chardev")
    chardev = head
    mode = "readline"  # QEMU's default for -mon
    pretty = False
    for key, val in props:
        if key == "chardev":
            chardev = val
        elif key == "mode":
            mode = val
        elif key == "pretty":
            pretty = parse_on_off(val, "pretty")
        elif key == "id":
            continue
        else:
            raise ConfigError(f"-mon: Invalid parameter '{key}'", option="-mon")
    if not chardev:
        raise ConfigError("-mon: Parameter 'chardev' is missing", option="-mon")
    return MonitorOptions(chardev=chardev, mode=mode, pretty=pretty)


def _name(value: str) -> str:
    head, props = split_props(value, "-name", implied="guest")
    name = head
    for key, val in props:
        if key == "guest":
            name = val
def _monitor(value: str) -> MonitorOptions | None:
    """``-monitor DEV``: the human monitor on a socket or stdio; ``none`` means no monitor."""
    from pyemu.monitor.server import parse_qmp_spec

    if value == "none":
        return None
    parse_qmp_spec(value, "-monitor")
    return MonitorOptions(spec=value, mode="readline")


        elif key == "debug-threads":
            parse_on_off(val, "debug-threads")  # pyemu's threads are always named (vcpuN, pyemu-qmp...)
        elif key == "process":
            continue  # the host process title: accepted, not set
        else:
            raise ConfigError(f"-name: Invalid parameter '{key}'", option="-name")
    if name is None:
        raise ConfigError("-name: Parameter 'guest' is missing", option="-name")
    return name


def _display(value: str) -> None:
    head, props = split_props(value, "-display", implied="type")
    if head != "none" or props:
        raise ConfigError(f"-display {value}: pyemu has no graphical display (only -display none)",
                          option="-display")


def _drive(value: str) -> tuple[tuple[str, str], ...]:
    head, props = split_props(value, "-drive", implied=None)
    return tuple(props)


def parse_args(argv: list[str]) -> VmConfig:
    """Turn ``argv`` (without the program name) into a :class:`VmConfig`."""
    values: dict[str, object] = {}
    serial: list[str] = []
    devices: list[DeviceOptions] = []
    drives: list[tuple[tuple[str, str], ...]] = []
    backends: dict[str, list[ObjectOptions]] = {"object": [], "chardev": [], "netdev": []}
    monitors: list[MonitorOptions] = []
    i = 0
    handlers: dict[str, Callable[[str], None]] = {}

    def setter(key: str, convert: Callable[[str], object]) -> Callable[[str], None]:
        return lambda v: values.__setitem__(key, convert(v))

    handlers.update({
        "machine": setter("machine", _machine), "M": setter("machine", _machine),  # (options, accel)
        "accel": setter("accel", _accel), "m": setter("ram_size", _memory), "smp": setter("vcpus", _smp),
        "kernel": setter("kernel", str), "initrd": setter("initrd", str), "append": setter("append", str),
        "serial": serial.append, "device": lambda v: devices.append(_device(v)),
        "d": setter("log_mask", _log_mask), "D": setter("log_file", str),
        "drive": lambda v: drives.append(_drive(v)),
        "object": lambda v: backends["object"].append(_backend("-object", v)),
        "chardev": lambda v: backends["chardev"].append(_backend("-chardev", v)),
        "netdev": lambda v: backends["netdev"].append(_backend("-netdev", v)),
        "qmp": lambda v: monitors.append(_qmp(v)), "mon": lambda v: monitors.append(_mon(v)),
        "name": setter("name", _name), "uuid": setter("uuid", str), "pidfile": setter("pidfile", str), "display": _display,
    })
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") or word in ("-", "--"):
            raise ConfigError(f"{word}: invalid option (pyemu takes no positional arguments)", option=word)
        name = word[2:] if word.startswith("--") else word[1:]
        spec = _BY_NAME.get(name)
        if spec is None:
            raise ConfigError(f"{word}: invalid option", option=word)
        if spec.takes_arg:
            if i + 1 >= len(argv):
                raise ConfigError(f"-{name}: requires an argument", option=f"-{name}")
            handlers[name](argv[i + 1])
            i += 2
            continue
        i += 1
        if name in ("help", "h"):
            raise EarlyExit(help_text())
        if name == "version":
            from pyemu import __version__

            raise EarlyExit(f"pyemu version {__version__} (QEMU-compatible command line)")
        flag_keys = {"nographic": "nographic", "no-reboot": "no_reboot", "no-shutdown": "no_shutdown", "snapshot": "snapshot",
                     "S": "start_paused"}
        if name == "enable-kvm":
            values["accel"] = ("kvm",)
        elif name in ("nodefaults", "no-user-config"):
            continue  # documented no-ops (see OPTIONS)
        else:
            values[flag_keys[name]] = True
    if "machine" in values:
        machine, machine_accel = values.pop("machine")  # type: ignore[misc]
        values["machine"] = machine
        if machine_accel is not None:
            values.setdefault("accel", machine_accel)
    return VmConfig(serial=tuple(serial), devices=tuple(devices), drives=tuple(drives),  # type: ignore[arg-type]
                    objects=tuple(backends["object"]), chardevs=tuple(backends["chardev"]),
                    netdevs=tuple(backends["netdev"]), monitors=tuple(monitors), **values)


def _log_mask(value: str) -> frozenset[str]:
    if value == "help":
        raise EarlyExit("Log items (comma separated):\n" + "\n".join(
            f"{name:<14} {text}" for name, text in log.CATEGORIES.items()))
    return log.parse_mask(value)
        "qmp-pretty": lambda v: monitors.append(MonitorOptions(spec=_qmp(v).spec, pretty=True)),
        "monitor": lambda v: monitors.extend(m for m in [_monitor(v)] if m is not None),
