"""Frozen, validated configuration of one VM, built by the CLI parser (or by tests and QMP).

The parser only turns words into these objects; every check a user can trip over lives in
``__post_init__`` so the same rules apply however a config was made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from pyemu.errors import ConfigError
from pyemu.system.cpu_options import CpuOptions
from pyemu.system.global_options import GlobalProp
from pyemu.system.host_options import BootOptions, OvercommitOptions
from pyemu.system.messages import MsgOptions
from pyemu.system.objects import BackendObject, parse_objects
from pyemu.system.rtc_options import RtcOptions
from pyemu.system.topology import SmpTopology

ON_OFF_AUTO = ("on", "off", "auto")
MAX_VCPUS = 64
MIN_RAM = 16 << 20


def parse_on_off(value: str, option: str) -> bool:
    """QEMU-style booleans: on/off, yes/no, true/false."""
    lowered = value.lower()
    if lowered in ("on", "yes", "true", "y"):
        return True
    if lowered in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"Parameter '{option}' expects 'on' or 'off'", option=option)


def parse_size(text: str, *, default_suffix: str = "M", option: str = "-m") -> int:
    """Sizes as QEMU reads them: a number with an optional B/K/M/G/T suffix (binary units); a bare number
    has ``default_suffix`` (MiB for ``-m``)."""
    units = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40}
    raw = text.strip()
    if not raw:
        raise ConfigError(f"{option}: empty size", option=option)
    suffix = raw[-1].upper()
    number = raw[:-1] if suffix in units else raw
    if suffix not in units:
        suffix = default_suffix
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"{option}: invalid size '{text}'", option=option) from None
    if value < 0 or value != value:
        raise ConfigError(f"{option}: invalid size '{text}'", option=option)
    return int(value * (1 << units[suffix]))


@dataclass(frozen=True)
class MachineOptions:
    """``-machine microvm,acpi=on,pit=off,...``: None means "the default for this accelerator"."""

    type: str = "microvm"
    acpi: bool | None = None
    pit: bool | None = None
    pic: bool | None = None
    rtc: bool | None = None
    isa_serial: bool | None = None
    x_option_roms: bool = True
    """No firmware, so no option ROMs: accepted either way (QEMU's microvm.x-option-roms)."""
    auto_kernel_cmdline: bool = True
    """Add ``virtio_mmio.device=`` entries to the kernel command line when there is no ACPI to list them."""
    usb: bool = False
    """microvm has no USB controller; ``usb=on`` is refused."""
    dump_guest_core: bool = True
    """``off``: guest RAM is left out of pyemu's core dumps (madvise MADV_DONTDUMP), as in QEMU."""
    memory_backend: str | None = None
    """``memory-backend=ID``: the ``-object memory-backend-*`` that holds guest RAM (system.memory_backend)."""

    def __post_init__(self) -> None:
        if self.usb:
            raise ConfigError("-machine microvm,usb=on: the microvm board has no USB controller",
                              option="-machine")
        if self.type not in ("microvm",):
            raise ConfigError(f"-machine: unsupported machine type '{self.type}' (supported: microvm)",
                              option="-machine")


@dataclass(frozen=True)
class DeviceOptions:
    """One ``-device DRIVER,key=value,...``."""

    driver: str
    props: tuple[tuple[str, str], ...] = ()
    globals: tuple[tuple[str, str], ...] = ()
    """``-global DRIVER.PROP=VALUE`` defaults for this device's driver (``props`` win over them)."""

    def prop(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.props:
            if key == name:
                return value
        return default


@dataclass(frozen=True)
class ObjectOptions:
    """One ``-object TYPE,id=ID,key=value,...`` (iothread, rng-random, ...), or a ``-chardev``/``-netdev``
    backend (``TYPE`` is then the backend kind: socket, file, tap, ...). Each consumer checks its own
    properties, so an unknown one is reported by the code that knows the type."""

    type: str
    id: str
    props: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.props:
            if key == name:
                return value
        return default


UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class MonitorOptions:
    """One monitor: ``-qmp SPEC``/``-qmp-pretty SPEC``/``-monitor SPEC`` (``spec``) or ``-mon chardev=ID``
    (``chardev``); ``mode`` is ``control`` (QMP) or ``readline`` (the human monitor, HMP). The spec itself
    is checked by :mod:`pyemu.monitor.server`, which knows what a monitor can listen on."""

    spec: str | None = None
    chardev: str | None = None
    mode: str = "control"
    pretty: bool = False

    def __post_init__(self) -> None:
        if (self.spec is None) == (self.chardev is None):
            raise ConfigError("-mon: give exactly one of a -qmp spec or chardev=ID", option="-mon")
        if self.mode not in ("control", "readline"):
            raise ConfigError(f"-mon: Parameter 'mode' does not accept value '{self.mode}'", option="-mon")


@dataclass(frozen=True)
class VmConfig:
    machine: MachineOptions = MachineOptions()
    accel: tuple[str, ...] = ("tcg",)
    ram_size: int = 512 << 20
    ram_backend: str = "ram"
    """The host memory behind guest RAM (:data:`pyemu.system.memory.RAM_BACKENDS`; ``-machine memory-backend=``)."""
    ram_sealed: bool = False
    """A memfd backend sealed against resizing (``memory-backend-memfd,seal=on``)."""
    vcpus: int = 1
    kernel: str | None = None
    initrd: str | None = None
    append: str = ""
    serial: tuple[str, ...] = ()
    nographic: bool = False
    no_reboot: bool = False
    no_shutdown: bool = False
    devices: tuple[DeviceOptions, ...] = ()
    drives: tuple[tuple[tuple[str, str], ...], ...] = ()
    """Each ``-drive`` as its key=value pairs (parsed by :mod:`pyemu.block.options` when the board opens it)."""
    blockdevs: tuple[str, ...] = ()
    """Each ``-blockdev`` as written (keyval or JSON; syntax and schema checked by the parser, opened by the
    board in order, :mod:`pyemu.block.blockdev`)."""
    objects: tuple[ObjectOptions, ...] = ()
    chardevs: tuple[ObjectOptions, ...] = ()
    netdevs: tuple[ObjectOptions, ...] = ()
    start_paused: bool = False
    snapshot: bool = False
    """``-snapshot``: every drive writes into a temporary overlay."""
    log_mask: frozenset[str] = frozenset()
    log_file: str | None = None
    monitors: tuple[MonitorOptions, ...] = ()
    """Every ``-qmp`` and ``-mon``, in command-line order."""
    name: str | None = None
    """``-name``: the guest name QMP reports (``query-name``)."""
    uuid: str | None = None
    """``-uuid``: the VM UUID QMP reports (``query-uuid``)."""
    pidfile: str | None = None
    """``-pidfile``: where the process id goes while the VM runs."""
    cpu: CpuOptions = CpuOptions()
    topology: SmpTopology | None = None
    """``-smp`` with QEMU's topology keys (``vcpus`` is its CPU count)."""
    rtc: RtcOptions = RtcOptions()
    msg: MsgOptions = MsgOptions()
    globals: tuple[GlobalProp, ...] = ()
    boot_options: BootOptions = BootOptions()
    overcommit: OvercommitOptions = OvercommitOptions()
    daemonize: bool = False
    """``-daemonize``: detach once the VM is set up (the command does it; see :mod:`pyemu.system.daemonize`)."""
    nodefaults: bool = False
    incoming: str | None = None
    """``-incoming URI|defer``: start from a saved VM state instead of booting (:mod:`pyemu.migration`)."""
    loadvm: str | None = None
    """``-loadvm TAG``: start from a whole-VM internal snapshot (:mod:`pyemu.migration.savevm`)."""

    def __post_init__(self) -> None:
        if self.ram_size < MIN_RAM:
            raise ConfigError(f"-m: at least {MIN_RAM >> 20} MiB of RAM are needed", option="-m")
        if self.ram_size % 4096:
            raise ConfigError("-m: RAM size must be a multiple of 4 KiB", option="-m")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError(f"-smp: the number of CPUs must be between 1 and {MAX_VCPUS}", option="-smp")
        for name in self.accel:
            if name not in ("tcg", "kvm"):
                raise ConfigError(f"-accel: invalid accelerator {name}", option="-accel")
        for kind, entries in (("-object", self.objects), ("-chardev", self.chardevs), ("-netdev", self.netdevs)):
            seen: set[str] = set()
            for entry in entries:
                if entry.id in seen:
                    raise ConfigError(f"{kind}: duplicate ID '{entry.id}'", option=kind)
                seen.add(entry.id)
        if self.initrd and not self.kernel:
            raise ConfigError("-initrd is only valid with -kernel", option="-initrd")
        if self.uuid is not None and not UUID_PATTERN.match(self.uuid):
            raise ConfigError(f"-uuid {self.uuid}: failed to parse UUID string: wrong format "
                              "(expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)", option="-uuid")
        if self.topology is not None and self.topology.cpus != self.vcpus:
            raise ConfigError(f"-smp: {self.vcpus} vCPUs do not match the topology's {self.topology.cpus}",
                              option="-smp")
        # Secrets and throttle groups: checked (files read) now, kept for the code that will use them.
        object.__setattr__(self, "backend_objects", parse_objects(self.objects))
        self._check_monitors()
        self._check_serial_chardevs()
        if self.daemonize:
            self._check_daemonize()

    backend_objects: dict[str, BackendObject] = field(init=False, repr=False, compare=False, default_factory=dict)
    """The ``-object secret`` and ``throttle-group`` entries, parsed, by id."""

    def with_globals(self, device: DeviceOptions) -> DeviceOptions:
        """``device`` with the ``-global`` defaults of its driver attached."""
        defaults = tuple((g.property, g.value) for g in self.globals if g.driver == device.driver)
        return replace(device, globals=defaults) if defaults else device

    def warnings(self) -> list[str]:
        """Accepted settings that do less than the user may expect (the command prints them)."""
        found: list[str] = []
        if self.rtc.driftfix == "slew":
            found.append("-rtc driftfix=slew: pyemu's RTC does not re-inject lost interrupts (accepted, no effect)")
        return found

    def check_accelerator(self, accel_name: str) -> None:
        """The options whose validity depends on the accelerator finally chosen (``-accel kvm:tcg``)."""
        self.cpu.check_accelerator(accel_name)
        self.overcommit.check_accelerator(accel_name)

    def serial_chardev_refs(self) -> list[str]:
        """The ids of ``-serial chardev:ID``."""
        return [text[len("chardev:"):] for text in self.serial if text.startswith("chardev:")]

    def _check_serial_chardevs(self) -> None:
        chardev_ids = {c.id for c in self.chardevs}
        users = {value: f"device {device.driver}" for device in self.devices
                 for key, value in device.props if key == "chardev"}
        users.update({m.chardev: "a monitor" for m in self.monitors if m.chardev})
        for ref in self.serial_chardev_refs():
            if ref not in chardev_ids:
                raise ConfigError(f"-serial chardev:{ref}: could not connect serial device to character "
                                  f"backend 'chardev:{ref}'", option="-serial")
            if ref in users:
                raise ConfigError(f"-serial chardev:{ref}: chardev '{ref}' is already in use by {users[ref]}",
                                  option="-serial")
            users[ref] = "a serial port"

    def serial_specs(self) -> tuple[str, ...]:
        """What COM1 (and COM2) connect to: the ``-serial`` words, else the default ``stdio`` -- none at
        all with ``-nodefaults``, as QEMU drops its default serial port."""
        if self.serial:
            return self.serial
        return () if self.nodefaults else ("stdio",)

    def _check_daemonize(self) -> None:
        """QEMU's rule: a daemon has no terminal, so nothing may use stdio."""
        for text in self.serial:
            if text == "stdio":
                raise ConfigError("-serial stdio: cannot use stdio with -daemonize", option="-serial")
        for chardev in self.chardevs:
            if chardev.type == "stdio":
                raise ConfigError(f"-chardev stdio,id={chardev.id}: cannot use stdio with -daemonize",
                                  option="-chardev")
        if any(m.spec == "stdio" for m in self.monitors):
            raise ConfigError("-qmp stdio: cannot use stdio with -daemonize", option="-qmp")
        if self.nographic and not self.serial and not self.nodefaults and self.machine.isa_serial is not False:
            raise ConfigError("-nographic cannot be used with -daemonize", option="-daemonize")

    def _check_monitors(self) -> None:
        """A ``-mon`` names an existing ``-chardev`` that no device uses and no other monitor uses; only
        one reader may own stdio."""
        chardev_ids = {c.id for c in self.chardevs}
        used_by_devices = {value: device.driver for device in self.devices
                           for key, value in device.props if key == "chardev"}
        seen: set[str] = set()
        for monitor in self.monitors:
            if monitor.chardev is None:
                continue
            if monitor.chardev not in chardev_ids:
                raise ConfigError(f"-mon chardev={monitor.chardev}: chardev '{monitor.chardev}' not found",
                                  option="-mon")
            if monitor.chardev in used_by_devices or monitor.chardev in seen:
                user = used_by_devices.get(monitor.chardev, "another monitor")
                raise ConfigError(f"-mon chardev={monitor.chardev}: chardev '{monitor.chardev}' is already in "
                                  f"use by {user}", option="-mon")
            seen.add(monitor.chardev)
        qmp_stdio = sum(1 for m in self.monitors if m.spec == "stdio")
        serial_stdio = self.machine.isa_serial is not False and ("stdio" in self.serial or not self.serial)
        if qmp_stdio and (qmp_stdio > 1 or serial_stdio):
            raise ConfigError("-qmp stdio: cannot use stdio by multiple character devices"
                              + (" (add -serial none or -serial null)" if serial_stdio else ""), option="-qmp")
