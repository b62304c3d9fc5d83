"""Plugging virtio devices into the microvm board: slots, backends, I/O threads, notifiers, interrupts.

Each ``-device virtio-*-device`` gets the next virtio-mmio slot (a 512-byte window at
``VIRTIO_MMIO_BASE + n * 0x200`` and GSI ``16 + n``, as QEMU's microvm), a DSDT ``LNRO0005`` entry
(Debian's kernel finds virtio-mmio devices only through ACPI) and an I/O thread: the one its
``iothread=`` names (``-object iothread,id=``), else the board's default I/O thread. Two things depend on
the accelerator, and this is the only place that knows:

* queue notifications: where the accelerator can bind an eventfd to a guest write (KVM's ioeventfd),
  the QueueNotify register is bound to each queue's notifier, so a kick never leaves the kernel;
* interrupts: where it can inject from an eventfd (KVM's irqfd on the GSI route the guest programmed
  into the IOAPIC), the device's edge is an eventfd write; otherwise (the software CPU) a pulse on the
  userspace IOAPIC pin.

Backends (``-drive``, ``-object rng-random``, ``-chardev``, ``-netdev``) are looked up by id and each
can be claimed by one device only, as in QEMU.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pyemu.block.registry import NodeRegistry
from pyemu.errors import ConfigError, PyemuError
from pyemu.hw.acpi.dsdt import VirtioMmioSlot, virtio_mmio_device
from pyemu.hw.core.device import BoardDevice, DeviceManager, IoRange
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.core.irq import EdgeInterrupt, IrqLine, NotifierInterrupt, PulseInterrupt
from pyemu.machines import memmap
from pyemu.machines.device_props import PropReader
from pyemu.system.chardev_registry import ChardevRegistry
from pyemu.system.config import DeviceOptions, ObjectOptions, VmConfig
from pyemu.system.memory_backend import MEMORY_BACKEND_TYPES

if TYPE_CHECKING:
    # The device, transport and I/O-thread modules are imported by the first device that needs them: a
    # board without virtio devices starts without them (their imports cost ~20 ms of every start).
    from pyemu.block.backend import BlockBackend
    from pyemu.hw.virtio.device import VirtioDevice
    from pyemu.hw.virtio.mmio import VirtioMmio
    from pyemu.system.event_notifier import EventNotifier
    from pyemu.system.iothread import IoThread
    from pyemu.system.shared_word import SharedWord

DEFAULT_IOTHREAD = "main-loop"


class NotifierAccelerator(Protocol):
    """What an accelerator may offer so that virtio registers bypass Python: ioeventfds (both), irqfds (KVM)
    and the interrupt status registers served from the device's shared word (the software CPU)."""

    def bind_ioeventfd(self, notifier: EventNotifier, addr: int, length: int, datamatch: int) -> None: ...

    def irq_notifier(self, gsi: int) -> EventNotifier: ...

    def bind_interrupt_status(self, addr: int, word: SharedWord) -> bool: ...


@dataclass
class Backends:
    """The backends named on the command line, by id, and who claimed them."""

    config: VmConfig
    claimed: set[tuple[str, str]] = field(default_factory=set)
    closers: list[Callable[[], None]] = field(default_factory=list)
    chardevs: ChardevRegistry = field(default_factory=ChardevRegistry)
    """Where opened ``-chardev`` backends are registered (the board's, for ``query-chardev``)."""
    nodes: NodeRegistry = field(default_factory=NodeRegistry)
    """The VM's named block nodes (``-blockdev``, ``blockdev-add``, the nodes of each ``-drive``)."""

    def open_blockdevs(self) -> None:
        """Open every ``-blockdev`` in command-line order (a definition may name earlier nodes)."""
        if not self.config.blockdevs and not self.config.backend_objects:
            return  # nothing to open: the block graph's modules stay unimported (~10 ms of start-up)
        from pyemu.block.blockdev import open_blockdev, parse_blockdev_arg
        from pyemu.block.throttle import THROTTLE_GROUPS

        # -object throttle-group: before any node or drive that names one
        self.throttle_groups = THROTTLE_GROUPS.add_objects(self.config.backend_objects.values())
        for text in self.config.blockdevs:
            definition, keyval = parse_blockdev_arg(text)
            try:
                open_blockdev(definition, self.nodes, keyval=keyval)
            except ConfigError as error:
                if str(error).startswith("-blockdev"):
                    raise
                raise ConfigError(f"-blockdev {text}: {error}", option="-blockdev") from error
            except PyemuError as error:
                raise ConfigError(f"-blockdev {text}: {error}", option="-blockdev") from error

    def drive(self, drive_id: str, user: str):  # type: ignore[no-untyped-def]
        """The BlockBackend for ``drive=``: a ``-drive`` by id, else a BlockBackend made for the device over
        the node of that node-name (QEMU's anonymous backend of ``-device ...,drive=<node-name>``)."""
        from pyemu.block.options import DriveOptions, open_drive

        for props in self.config.drives:
            options = DriveOptions.from_props(props)
            if options.id == drive_id:
                self._claim("drive", drive_id, user)
                if self.config.snapshot and not options.snapshot:
                    options = dataclasses.replace(options, snapshot=True)
                backend = open_drive(options, warn=lambda text: print(text, file=sys.stderr, flush=True))
                register_drive_nodes(self.nodes, backend)
                return backend, options
        entry = self.nodes.get(drive_id)
        if entry is not None:
            return self._node_backend(entry, drive_id, user), None
        raise ConfigError(f"-device {user}: Property '{user}.drive' can't find value '{drive_id}'", option="-device")

    def _node_backend(self, entry, node_name: str, user: str) -> BlockBackend:  # type: ignore[no-untyped-def]
        from pyemu.block.backend import BlockBackend, CacheMode
        from pyemu.block.blockdev import activate, deactivate

        if self.nodes.in_use_by_backend(node_name):
            raise ConfigError(f"-device {user}: Conflicts with use by another device as 'root', which does not "
                              f"allow 'write' on {node_name}", option="-device")
        try:
            activate(entry.node)
        except PyemuError as error:
            raise ConfigError(f"-device {user}: {error}", option="-device") from error
        try:
            cache = CacheMode(direct=getattr(entry, "cache_direct", False), writeback=True,
                              no_flush=getattr(entry, "no_flush", False))
            discard = entry.options.get("discard", "ignore") if isinstance(entry.options, dict) else "ignore"
            backend = BlockBackend(entry.node, read_only=entry.read_only, cache=cache,
                                   discard=discard if discard in ("ignore", "unmap") else "ignore",
                                   owns_root=False, user=f"device '{user}'")
        except PyemuError as error:
            deactivate(entry.node)
            raise ConfigError(f"-device {user}: {error}", option="-device") from error
        return backend

    def close_nodes(self) -> None:
        if next(iter(self.nodes), None) is not None:  # with no node, the block graph needs no import
            from pyemu.block.blockdev import close_all

            close_all(self.nodes)
        groups = getattr(self, "throttle_groups", ())
        if groups:
            from pyemu.block.throttle import THROTTLE_GROUPS

            for name in groups:
                THROTTLE_GROUPS.remove_object(name)

    def object(self, object_id: str, kind: str, user: str, prop: str) -> ObjectOptions:
        for entry in self.config.objects:
            if entry.id == object_id:
                if entry.type != kind:
                    raise ConfigError(f"-device {user}: object '{object_id}' is a {entry.type}, not {kind}",
                                      option="-device")
                self._claim("object", object_id, user)
                return entry
        raise ConfigError(f"-device {user}: Property '{user}.{prop}' can't find value '{object_id}'",
                          option="-device")

    def chardev(self, chardev_id: str, user: str) -> ObjectOptions:
        return self._backend(self.config.chardevs, "chardev", chardev_id, user)

    def netdev(self, netdev_id: str, user: str) -> ObjectOptions:
        return self._backend(self.config.netdevs, "netdev", netdev_id, user)

    def _backend(self, entries: tuple[ObjectOptions, ...], kind: str, ident: str, user: str) -> ObjectOptions:
        for entry in entries:
            if entry.id == ident:
                self._claim(kind, ident, user)
                return entry
        raise ConfigError(f"-device {user}: Property '{user}.{kind}' can't find value '{ident}'", option="-device")

    def _claim(self, kind: str, ident: str, user: str) -> None:
        if (kind, ident) in self.claimed:
            raise ConfigError(f"-device {user}: {kind} '{ident}' is already in use by another device",
                              option="-device")
        self.claimed.add((kind, ident))


DeviceBuilder = Callable[[PropReader, Backends], "VirtioDevice"]


def register_drive_nodes(nodes: NodeRegistry, backend: BlockBackend) -> None:
    """List a ``-drive``'s nodes (format, file, backing chain) under automatic names, owned by the drive, and
    make the drive findable by its id, so ``node`` arguments and ``query-named-block-nodes`` see them as in
    QEMU."""
    from pyemu.block import graph
    from pyemu.block.registry import NodeEntry

    def walk(node: object) -> str:
        children = {role: walk(child) for role, child in graph.children(node)}
        existing = nodes.name_of(node)
        if existing is not None:
            return existing
        entry = NodeEntry(nodes.auto_name(), node, getattr(node, "name", "?"),  # type: ignore[arg-type]
                          owner=f"drive:{backend.id}", auto_named=True, children=children,
                          read_only=bool(getattr(node, "read_only", True)))
        nodes.add(entry)
        return entry.name

    walk(backend.root)
    if backend.id:
        nodes.add_backend(backend)


@dataclass(frozen=True)
class DriveUse:
    """A drive and the device that uses it (what ``query-block`` lists)."""

    device_id: str
    drive_id: str
    backend: BlockBackend


def _build_blk(props: PropReader, backends: Backends) -> VirtioDevice:
    from pyemu.hw.virtio.blk import QUEUE_SIZE, BlkConfig, VirtioBlk

    drive_id = props.required("drive")
    num_queues = props.integer("num-queues", 1, low=1, high=16)
    queue_size = props.integer("queue-size", QUEUE_SIZE, low=4, high=1024)
    if queue_size & (queue_size - 1):
        raise props.error("Parameter 'queue-size' must be a power of 2")
    serial = props.text("serial", "") or ""
    discard = props.boolean("discard", True)
    write_zeroes = props.boolean("write-zeroes", True)
    props.finish()
    backend, options = backends.drive(drive_id, props.driver)
    serial = serial or getattr(options, "serial", None) or ""
    return VirtioBlk(backend, BlkConfig(drive_id=drive_id, serial=serial, num_queues=num_queues,
                                        queue_size=queue_size, discard=discard, write_zeroes=write_zeroes))


def _build_rng(props: PropReader, backends: Backends) -> VirtioDevice:
    from pyemu.hw.virtio.rng import DEFAULT_PERIOD_MS, UNLIMITED, EntropySource, RngConfig, VirtioRng

    rng_id = props.text("rng")
    max_bytes = props.integer("max-bytes", UNLIMITED, low=1)
    period = props.integer("period", DEFAULT_PERIOD_MS, low=1, high=1 << 32)
    props.finish()
    filename = "/dev/urandom"
    if rng_id:
        entry = backends.object(rng_id, "rng-random", props.driver, "rng")
        unknown = [k for k, _ in entry.props if k != "filename"]
        if unknown:
            raise ConfigError(f"-object rng-random: Property '{unknown[0]}' not found", option="-object")
        filename = entry.prop("filename", filename) or filename
    return VirtioRng(EntropySource(filename), RngConfig(filename, max_bytes, period))


def _build_net(props: PropReader, backends: Backends) -> VirtioDevice:
    from pyemu.hw.virtio.net_plug import build_virtio_net

    return build_virtio_net(props, backends)


def _build_vsock(props: PropReader, backends: Backends) -> VirtioDevice:
    from pyemu.hw.virtio.vsock_plug import build_vhost_vsock

    return build_vhost_vsock(props, backends)


def _build_serial(props: PropReader, backends: Backends) -> VirtioDevice:
    from pyemu.hw.virtio.console_plug import build_virtio_serial

    return build_virtio_serial(props, backends)


BUILDERS: dict[str, DeviceBuilder] = {
    "virtio-blk-device": _build_blk,
    "virtio-rng-device": _build_rng,
    "virtio-net-device": _build_net,
    "vhost-vsock-device": _build_vsock,
    "virtio-serial-device": _build_serial,
}


def register_builder(driver: str, builder: DeviceBuilder) -> None:
    """Add a virtio device type (device modules register themselves here)."""
    BUILDERS[driver] = builder


class VirtioPlugger:
    """Creates virtio devices for one board."""

    def __init__(self, *, config: VmConfig, devices: DeviceManager, dma: DmaMemory,
                 irq_pin: Callable[[int], IrqLine], lock: threading.RLock, accel: object,
                 edge_route: Callable[[int], tuple[object, int] | None] | None = None) -> None:
        self.devices = devices
        self.dma = dma
        self.backends = Backends(config)
        self._irq_pin = irq_pin
        self._edge_route = edge_route
        """Where an edge on a GSI lands now (the IOAPIC's ``edge_route``): devices may post there in C."""
        self._lock = lock
        self._accel = accel
        self.iothreads: dict[str, IoThread] = {}
        self.transports: list[VirtioMmio] = []
        self.slots: list[VirtioMmioSlot] = []
        self.drives: list[DriveUse] = []
        self.peripherals: dict[str, BoardDevice] = {}
        """The QOM paths of the devices made by -device (``/machine/peripheral/<id>``, or
        ``/machine/peripheral-anon/device[N]`` without an id), for qom-list/qom-get/qom-set."""
        self._anon = 0
        for entry in config.objects:
            if entry.type == "iothread":
                from pyemu.system.iothread import IoThread
                from pyemu.system.objects import parse_iothread

                options = parse_iothread(entry.id, entry.props)
                self.iothreads[entry.id] = IoThread(entry.id, poll_max_ns=options.poll_max_ns,
                                                    poll_grow=options.poll_grow, poll_shrink=options.poll_shrink)
            elif entry.type not in ("rng-random", "secret", "throttle-group", *MEMORY_BACKEND_TYPES):
                # secret, throttle-group: system.objects; memory backends: system.memory_backend
                raise ConfigError(f"-object: invalid object type: {entry.type}", option="-object")
        try:
            self.backends.open_blockdevs()
        except BaseException:
            self.backends.close_nodes()
            raise

    def handles(self, driver: str) -> bool:
        from pyemu.hw.virtio.console_plug import PORT_DRIVERS  # ports plug into a virtio-serial-device

        return driver in BUILDERS or driver in PORT_DRIVERS

    def _iothread(self, name: str | None, driver: str) -> IoThread:
        from pyemu.system.iothread import IoThread

        if name is None:
            name = DEFAULT_IOTHREAD
            if name not in self.iothreads:
                self.iothreads[name] = IoThread(name)
        thread = self.iothreads.get(name)
        if thread is None:
            raise ConfigError(f"-device {driver}: Property '{driver}.iothread' can't find value '{name}'",
                              option="-device")
        return thread

    def add(self, options: DeviceOptions) -> BoardDevice:
        from pyemu.hw.virtio.blk import VirtioBlk
        from pyemu.hw.virtio.console_plug import PORT_DRIVERS, attach_virtconsole
        from pyemu.hw.virtio.mmio import WINDOW_SIZE, VirtioMmio

        if options.driver in PORT_DRIVERS:
            return attach_virtconsole(PropReader(options), self.backends, self.transports, self.devices)
        slot_index = len(self.transports)
        if slot_index >= memmap.VIRTIO_MMIO_SLOTS:
            raise ConfigError(f"-device {options.driver}: the microvm board has {memmap.VIRTIO_MMIO_SLOTS} "
                              "virtio-mmio slots and all are taken", option="-device")
        props = PropReader(options)
        user_id = props.text("id")
        device_id = user_id or self.devices.new_id(options.driver)
        iothread = self._iothread(props.text("iothread"), options.driver)
        model = BUILDERS[options.driver](props, self.backends)
        base = memmap.VIRTIO_MMIO_BASE + slot_index * memmap.VIRTIO_MMIO_SLOT_SIZE
        gsi = memmap.VIRTIO_MMIO_FIRST_GSI + slot_index
        slot = VirtioMmioSlot(base=base, gsi=gsi, size=WINDOW_SIZE, level_triggered=False)
        try:
            transport = VirtioMmio(model, self.dma, self._interrupt(gsi), iothread, name=device_id)
            # Devices with host file descriptors of their own (a TAP, vsock sockets) watch them here.
            attach = getattr(model, "attach_iothread", None)
            if attach is not None:
                attach(iothread)
        except BaseException:
            model.close()
            raise
        self._bind_notifiers(transport, base)
        board_device = BoardDevice(device_id, transport, driver=options.driver,
                                   ranges=(IoRange("mmio", base, WINDOW_SIZE, transport, own_lock=True),),
                                   aml=virtio_mmio_device(slot_index, slot))
        self.devices.add(board_device)
        self.transports.append(transport)
        self.slots.append(slot)
        if isinstance(model, VirtioBlk):
            self.drives.append(DriveUse(device_id, model.backend.id, model.backend))
            if not model.backend.id:
                self.backends.nodes.add_backend(model.backend, f"/machine/peripheral/{device_id}")
        if user_id:
            self.peripherals[f"/machine/peripheral/{user_id}"] = board_device
        else:
            self.peripherals[f"/machine/peripheral-anon/device[{self._anon}]"] = board_device
            self._anon += 1
        return board_device

    def _interrupt(self, gsi: int) -> EdgeInterrupt:
        irq_notifier = getattr(self._accel, "irq_notifier", None)
        if irq_notifier is not None:
            return NotifierInterrupt(irq_notifier(gsi))
        edge_route = self._edge_route
        return PulseInterrupt(self._irq_pin(gsi), self._lock,
                              None if edge_route is None else functools.partial(edge_route, gsi))

    def _bind_notifiers(self, transport: VirtioMmio, base: int) -> None:
        bind = getattr(self._accel, "bind_ioeventfd", None)
        if bind is not None:
            for offset, value, notifier in transport.queue_notifiers():
                bind(notifier, base + offset, 4, value)
        bind_status = getattr(self._accel, "bind_interrupt_status", None)
        if bind_status is not None:
            offset, word = transport.interrupt_status_word()
            bind_status(base + offset, word)

    def start(self) -> None:
        for thread in self.iothreads.values():
            thread.start()

    def close(self) -> None:
        for thread in self.iothreads.values():
            thread.close()
        # With the I/O threads gone no request is in flight: the user's nodes can close (the devices'
        # backends do not own them and close later without touching them).
        self.backends.close_nodes()
