"""QEMU-style command-line parsing: single-dash options, ``key=value`` lists, clear one-line errors.

Only words become configuration here (:class:`~pyemu.system.config.VmConfig`); validation lives in the
config classes. Errors are :class:`~pyemu.errors.ConfigError` naming the option, which the entry point
prints as ``pyemu: -foo: invalid option`` with exit status 1, as QEMU does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, cast

from pyemu.errors import ConfigError
from pyemu.system.config import (DeviceOptions, MachineOptions, MonitorOptions, ObjectOptions, VmConfig,
                                 parse_on_off, parse_size)
from pyemu.system import log
from pyemu.system.cpu_options import CpuOptions, cpu_help
from pyemu.system.global_options import GlobalProp, parse_global
from pyemu.system.host_options import BootOptions, OvercommitOptions
from pyemu.system.memory_backend import machine_memory, parse_memory_backends
from pyemu.system.messages import MsgOptions
from pyemu.system.rtc_options import RtcOptions
from pyemu.system.topology import SMP_KEYS, SmpTopology, parse_count, resolve_topology


@dataclass(frozen=True)
class OptionSpec:
    name: str
    takes_arg: bool
    help: str
    arg_name: str = ""


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("machine", True, "select the board and its options: microvm[,acpi=on|off][,pit=on|off]"
               "[,pic=on|off][,rtc=on|off][,isa-serial=on|off][,auto-kernel-cmdline=on|off]"
               "[,dump-guest-core=on|off][,memory-backend=ID][,x-option-roms=on|off (no firmware: no effect)]"
               "[,usb=off]",
               "type[,prop=value...]"),
    OptionSpec("M", True, "same as -machine", "type[,prop=value...]"),
    OptionSpec("accel", True, "accelerator: tcg, kvm, or a fallback list kvm:tcg", "name[:name...]"),
    OptionSpec("enable-kvm", False, "same as -accel kvm"),
    OptionSpec("cpu", True, "CPU model: qemu64, kvm64, Nehalem, Westmere, max (any accelerator) or host (KVM); "
               "+feature/-feature switch CPUID features (QEMU's names); -cpu help lists models and flags",
               "model[,-feature|+feature|feature=on|off...]"),
    OptionSpec("m", True, "guest RAM size, e.g. 512M, 2G (a bare number is MiB)", "[size=]size"),
    OptionSpec("smp", True, "number of vCPUs and QEMU's topology (the product must match maxcpus)",
               "[cpus=]n[,maxcpus=n][,sockets=n][,cores=n][,threads=n]"),
    OptionSpec("kernel", True, "Linux bzImage, PVH ELF vmlinux or multiboot kernel to boot directly", "file"),
    OptionSpec("initrd", True, "initial ramdisk for -kernel", "file"),
    OptionSpec("append", True, "kernel command line", "cmdline"),
    OptionSpec("serial", True, "redirect COM1: stdio, null, none, file:PATH, unix:PATH[,server][,nowait], "
               "tcp:HOST:PORT[,server][,nowait], chardev:ID (a -chardev)", "dev"),
    OptionSpec("nographic", False, "no display; COM1 on stdio unless -serial says otherwise"),
    OptionSpec("no-reboot", False, "exit instead of rebooting"),
    OptionSpec("no-shutdown", False, "keep the VM (stopped, status shutdown) after a guest power-off, until "
               "quit or system_reset"),
    OptionSpec("device", True, "add a device (-device help lists them)", "driver[,prop=value...]"),
    OptionSpec("blockdev", True, "a block node: driver=file|raw|qcow2,node-name=NAME[,file=NODE|file.driver=...]"
               "[,backing=NODE][,read-only=on] (keyval or JSON, QEMU's BlockdevOptions)", "options"),
    OptionSpec("drive", True, "a disk image: file=PATH[,format=raw][,if=none|virtio][,id=ID][,readonly=on]"
               "[,cache=writeback|writethrough|none|directsync|unsafe][,discard=ignore|unmap]", "option[,option...]"),
    OptionSpec("object", True, "a backend object: iothread,id=ID | rng-random,id=ID,filename=PATH | "
               "secret,id=ID,data=TEXT|file=PATH[,format=raw|base64] | throttle-group,id=ID,x-iops-total=N,... | "
               "memory-backend-ram,id=ID,size=SIZE[,share=on|off] | memory-backend-memfd,id=ID,size=SIZE[,seal=on|off]",
               "type,id=ID[,prop=value...]"),
    OptionSpec("chardev", True, "a character backend: socket|file|stdio|pty|null,id=ID[,...]",
               "backend,id=ID[,prop=value...]"),
    OptionSpec("netdev", True, "a network backend: tap,id=ID[,ifname=NAME][,script=no][,downscript=no][,fd=N]",
               "tap,id=ID[,prop=value...]"),
    OptionSpec("snapshot", False, "write to temporary files instead of disk images (every -drive gets "
               "snapshot=on)"),
    OptionSpec("S", False, "create the VM with its CPUs stopped (prelaunch; QMP 'cont' starts it)"),
    OptionSpec("incoming", True, "start from a saved VM state: file:PATH or exec:COMMAND (its output), or "
               "defer (wait for QMP migrate-incoming); the same -machine/-m/-smp/-device/-drive as the source",
               "uri|defer"),
    OptionSpec("loadvm", True, "start from the internal snapshot TAG of the qcow2 drives (saved by savevm or "
               "snapshot-save): disks reverted, VM state loaded; runs unless -S", "tag"),
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
    OptionSpec("nodefaults", False, "no default devices: COM1 is not created unless -serial asks for it (pyemu's "
               "only default device)"),
    OptionSpec("no-user-config", False, "accepted for QEMU compatibility (pyemu reads no config files)"),
    OptionSpec("global", True, "default property value for every device of a driver (a -device value wins)",
               "driver.prop=value"),
    OptionSpec("rtc", True, "RTC start time and clock: base=utc (default), localtime or a date "
               "(2006-06-17T16:01:21 or 2006-06-17); clock=host|vm; driftfix=none|slew (slew: no effect)",
               "[base=utc|localtime|date][,clock=host|vm][,driftfix=none|slew]"),
    OptionSpec("boot", True, "accepted for QEMU compatibility: pyemu always boots its kernel directly, as QEMU "
               "does with -kernel (order/once/strict/reboot-timeout are validated; menu=on is refused)",
               "[order=drives][,once=drives][,strict=on|off][,reboot-timeout=ms]"),
    OptionSpec("overcommit", True, "mem-lock=on locks all memory (mlockall) before the guest starts; cpu-pm=on "
               "is accepted with -accel tcg only", "[mem-lock=on|off][,cpu-pm=on|off]"),
    OptionSpec("msg", True, "prefix pyemu's error and warning lines with a UTC timestamp (and the -name)",
               "[timestamp=on|off][,guest-name=on|off]"),
    OptionSpec("daemonize", False, "detach once the VM is set up (pid file and monitors exist); the command "
               "exits 0 then, or 1 with the error; stdio cannot be used"),
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
    kwargs: dict[str, bool | str | None] = {}
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
        elif key == "memory-backend":
            kwargs["memory_backend"] = val
        elif key in _MACHINE_BOOLS:
            kwargs[_MACHINE_BOOLS[key]] = parse_on_off(val, key)
        else:
            raise ConfigError(f"-machine: Property 'microvm.{key}' not found", option="-machine")
    machine_type = head or "microvm"
    if machine_type == "help":
        raise EarlyExit("Supported machines are:\nmicrovm              microvm (i386), QEMU-compatible options")
    return MachineOptions(type=machine_type, **kwargs), accel  # type: ignore[arg-type]


_MACHINE_BOOLS = {"x-option-roms": "x_option_roms", "auto-kernel-cmdline": "auto_kernel_cmdline", "usb": "usb",
                  "dump-guest-core": "dump_guest_core"}


def _memory_backends(values: dict[str, object], objects: list[ObjectOptions]) -> None:
    """Check every ``-object memory-backend-*``; the one ``-machine memory-backend=`` names gives guest RAM
    its size (unless ``-m`` did, which must then agree) and its kind of host memory."""
    backends = parse_memory_backends(objects)
    machine = values.get("machine")
    if isinstance(machine, MachineOptions) and machine.memory_backend is not None:
        ram_size = values.get("ram_size")
        backend = machine_memory(machine.memory_backend, backends, ram_size if isinstance(ram_size, int) else None)
        values.update(ram_size=backend.size, ram_backend=backend.kind, ram_sealed=backend.seal)


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


def _smp(value: str) -> SmpTopology:
    head, props = split_props(value, "-smp", implied="cpus")
    counts: dict[str, int] = {}
    if head:
        counts["cpus"] = parse_count("cpus", head)
    for key, val in props:
        if key not in SMP_KEYS:
            raise ConfigError(f"-smp: Invalid parameter '{key}'", option="-smp")
        counts[key] = parse_count(key, val)
    return resolve_topology(counts)


def _memory(value: str) -> int:
    head, props = split_props(value, "-m", implied="size")
    size = head
    for key, val in props:
        if key == "size":
            size = val
        elif key in ("slots", "maxmem"):
            raise ConfigError(f"-m {key}=: memory hotplug is not supported by pyemu", option="-m")
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
isa-debug-exit          iobase= (default 0x501), iosize= (1, 2 or 4; default 2)
pvpanic                 ioport= (default 0x505), events= (1 panicked, 2 crash-loaded; default 3)
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


def _monitor(value: str) -> MonitorOptions | None:
    """``-monitor DEV``: the human monitor on a socket or stdio; ``none`` means no monitor."""
    from pyemu.monitor.server import parse_qmp_spec

    if value == "none":
        return None
    parse_qmp_spec(value, "-monitor")
    return MonitorOptions(spec=value, mode="readline")


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
        elif key == "debug-threads":
            parse_on_off(val, "debug-threads")  # pyemu's threads are always named (vcpuN, pyemu-qmp...)
        elif key == "process":
            continue  # the host process title: accepted, not set
        else:
            raise ConfigError(f"-name: Invalid parameter '{key}'", option="-name")
    if name is None:
        raise ConfigError("-name: Parameter 'guest' is missing", option="-name")
    return name


def _cpu(value: str) -> CpuOptions:
    head, props = split_props(value, "-cpu", implied="model")
    if head == "help":
        raise EarlyExit(cpu_help())
    if not head:
        raise ConfigError("-cpu: a CPU model name is required (-cpu help lists them)", option="-cpu")
    return CpuOptions(head, tuple(props))


def _rtc(value: str) -> RtcOptions:
    _, props = split_props(value, "-rtc", implied=None)
    known = {"base": "base", "clock": "clock", "driftfix": "driftfix"}
    kwargs: dict[str, str] = {}
    for key, val in props:
        if key not in known:
            raise ConfigError(f"-rtc: Invalid parameter '{key}'", option="-rtc")
        kwargs[known[key]] = val
    return RtcOptions(**kwargs)


def _msg(value: str) -> MsgOptions:
    _, props = split_props(value, "-msg", implied=None)
    flags = {"timestamp": False, "guest-name": False}
    for key, val in props:
        if key not in flags:
            raise ConfigError(f"-msg: Invalid parameter '{key}'", option="-msg")
        flags[key] = parse_on_off(val, key)
    return MsgOptions(timestamp=flags["timestamp"], guest_name=flags["guest-name"])


def _global(value: str) -> GlobalProp:
    try:
        _, props = split_props(value, "-global", implied=None)
    except ConfigError:
        props = []
    return parse_global(value, props)


def _boot(value: str) -> BootOptions:
    head, props = split_props(value, "-boot", implied="order")
    kwargs: dict[str, object] = {"order": head or ""}
    for key, val in props:
        if key in ("order", "once"):
            kwargs[key] = val
        elif key in ("menu", "strict"):
            kwargs[key] = parse_on_off(val, key)
        elif key == "splash":
            kwargs["splash"] = val
        elif key in ("reboot-timeout", "splash-time"):
            try:
                number = int(val, 10)
            except ValueError:
                raise ConfigError(f"-boot: Parameter '{key}' expects a number", option="-boot") from None
            if key == "reboot-timeout":
                kwargs["reboot_timeout"] = number
        else:
            raise ConfigError(f"-boot: Parameter 'boot.{key}' is unexpected", option="-boot")
    return BootOptions(**kwargs)  # type: ignore[arg-type]


def _overcommit(value: str) -> OvercommitOptions:
    _, props = split_props(value, "-overcommit", implied=None)
    flags = {"mem-lock": False, "cpu-pm": False}
    for key, val in props:
        if key not in flags:
            raise ConfigError(f"-overcommit {value}: Invalid parameter '{key}'", option="-overcommit")
        flags[key] = parse_on_off(val, key)
    return OvercommitOptions(mem_lock=flags["mem-lock"], cpu_pm=flags["cpu-pm"])


def early_messages(argv: list[str]) -> tuple[MsgOptions, str | None]:
    """``-msg`` and ``-name`` from a command line that failed to parse, so that the error line gets the
    prefix the user asked for (QEMU applies ``-msg`` while it parses). Malformed values are skipped."""
    msg, name = MsgOptions(), None
    for word, value in zip(argv, argv[1:]):
        try:
            if word in ("-msg", "--msg"):
                msg = _msg(value)
            elif word in ("-name", "--name"):
                name = _name(value)
        except ConfigError:
            continue
    return msg, name


def _display(value: str) -> None:
    head, props = split_props(value, "-display", implied="type")
    if head != "none" or props:
        raise ConfigError(f"-display {value}: pyemu has no graphical display (only -display none)",
                          option="-display")


def _blockdev(value: str) -> str:
    """``-blockdev``: syntax and option schema are checked now (QEMU fails at parse time too); the nodes
    are opened by the board, since a definition may name nodes of earlier ``-blockdev`` options."""
    from pyemu.block.blockdev import BlockdevError, parse_blockdev_arg, validate

    definition, keyval = parse_blockdev_arg(value)
    try:
        validate(definition, keyval=keyval)
    except BlockdevError as error:
        raise ConfigError(f"-blockdev {value}: {error}", option="-blockdev") from None
    if "node-name" not in definition:
        raise ConfigError(f"-blockdev {value}: 'node-name' must be specified for the root node",
                          option="-blockdev")
    return value


def _drive(value: str) -> tuple[tuple[str, str], ...]:
    head, props = split_props(value, "-drive", implied=None)
    return tuple(props)


def parse_args(argv: list[str]) -> VmConfig:
    """Turn ``argv`` (without the program name) into a :class:`VmConfig`."""
    values: dict[str, object] = {}
    serial: list[str] = []
    devices: list[DeviceOptions] = []
    drives: list[tuple[tuple[str, str], ...]] = []
    blockdevs: list[str] = []
    backends: dict[str, list[ObjectOptions]] = {"object": [], "chardev": [], "netdev": []}
    monitors: list[MonitorOptions] = []
    globals_: list[GlobalProp] = []
    i = 0
    handlers: dict[str, Callable[[str], None]] = {}

    def setter(key: str, convert: Callable[[str], object]) -> Callable[[str], None]:
        return lambda v: values.__setitem__(key, convert(v))

    handlers.update({
        "machine": setter("machine", _machine), "M": setter("machine", _machine),  # (options, accel)
        "accel": setter("accel", _accel), "m": setter("ram_size", _memory), "smp": setter("topology", _smp),
        "cpu": setter("cpu", _cpu), "rtc": setter("rtc", _rtc), "msg": setter("msg", _msg),
        "global": lambda v: globals_.append(_global(v)), "boot": setter("boot_options", _boot),
        "overcommit": setter("overcommit", _overcommit),
        "kernel": setter("kernel", str), "initrd": setter("initrd", str), "append": setter("append", str),
        "serial": serial.append, "device": lambda v: devices.append(_device(v)),
        "d": setter("log_mask", _log_mask), "D": setter("log_file", str),
        "drive": lambda v: drives.append(_drive(v)),
        "blockdev": lambda v: blockdevs.append(_blockdev(v)),
        "object": lambda v: backends["object"].append(_backend("-object", v)),
        "chardev": lambda v: backends["chardev"].append(_backend("-chardev", v)),
        "netdev": lambda v: backends["netdev"].append(_backend("-netdev", v)),
        "qmp": lambda v: monitors.append(_qmp(v)), "mon": lambda v: monitors.append(_mon(v)),
        "qmp-pretty": lambda v: monitors.append(MonitorOptions(spec=_qmp(v).spec, pretty=True)),
        "monitor": lambda v: monitors.extend(m for m in [_monitor(v)] if m is not None),
        "name": setter("name", _name), "uuid": setter("uuid", str), "pidfile": setter("pidfile", str), "display": _display,
        "incoming": setter("incoming", _incoming), "loadvm": setter("loadvm", str),
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
                     "S": "start_paused", "daemonize": "daemonize", "nodefaults": "nodefaults"}
        if name == "enable-kvm":
            values["accel"] = ("kvm",)
        elif name == "no-user-config":
            continue  # documented no-op (see OPTIONS)
        else:
            values[flag_keys[name]] = True
    if "machine" in values:
        machine, machine_accel = cast("tuple[MachineOptions, tuple[str, ...] | None]", values.pop("machine"))
        values["machine"] = machine
        if machine_accel is not None:
            values.setdefault("accel", machine_accel)
    _memory_backends(values, backends["object"])
    topology = values.get("topology")
    if isinstance(topology, SmpTopology):
        values["vcpus"] = topology.cpus
    if values.get("daemonize") and not serial and not values.get("nographic"):
        # A daemon has no terminal: COM1's default (stdio) becomes null, as QEMU's default (a display
        # console) goes nowhere without a display. -nographic or -serial stdio are refused by VmConfig.
        machine_options = values.get("machine")
        if not isinstance(machine_options, MachineOptions) or machine_options.isa_serial is not False:
            serial.append("null")
    return VmConfig(serial=tuple(serial), devices=tuple(devices), drives=tuple(drives),  # type: ignore[arg-type]
                    blockdevs=tuple(blockdevs),
                    objects=tuple(backends["object"]), chardevs=tuple(backends["chardev"]),
                    netdevs=tuple(backends["netdev"]), monitors=tuple(monitors), globals=tuple(globals_),
                    **values)  # type: ignore[arg-type]


def _incoming(value: str) -> str:
    """``-incoming``: ``defer`` or a migration URI (checked here, so a typo fails before the VM is built)."""
    if value != "defer":
        from pyemu.migration.errors import TransportError
        from pyemu.migration.transport import check_uri

        try:
            check_uri(value)
        except TransportError as error:
            raise ConfigError(f"-incoming: {error}", option="-incoming") from None
    return value


def _log_mask(value: str) -> frozenset[str]:
    if value == "help":
        raise EarlyExit("Log items (comma separated):\n" + "\n".join(
            f"{name:<14} {text}" for name, text in log.CATEGORIES.items()))
    return log.parse_mask(value)
