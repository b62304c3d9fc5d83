"""The microvm board: a minimal x86 PC without PCI, shaped like QEMU's ``-M microvm``.

Devices: local APIC (userspace under the software CPU, in-kernel under KVM), IOAPIC, optional 8259 pair,
8254 PIT and MC146818 RTC, 16550A UARTs on COM1/COM2, the i8042 reset line, the POST/debug port 0x80, a
GED with ACPI sleep and reset registers, ``isa-debug-exit`` on request, and ACPI tables describing them
(Debian's kernel needs the DSDT to find virtio-mmio devices). The kernel is booted directly (bzImage, PVH
ELF or multiboot), without firmware.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from pyemu.accel.base import Accelerator
from pyemu.chardev import NoneSpec, open_chardev, parse_chardev_spec
from pyemu.chardev.spec import ChardevRefSpec, StdioSpec
from pyemu.chardev.base import CharBackend
from pyemu.errors import ConfigError
from pyemu.hw.acpi.builder import AcpiConfig, build_acpi
from pyemu.hw.acpi.dsdt import SerialPortInfo, serial_port_device
from pyemu.hw.acpi.ged import GedDevice, GedLayout
from pyemu.hw.char.serial import REGISTER_COUNT
from pyemu.hw.char.serial_isa import ISA_SERIAL_RESOURCES, IsaSerial
from pyemu.hw.core.device import BoardDevice, IoRange
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.core.irq import IrqLine, fanout
from pyemu.hw.intc.api import MsiSink
from pyemu.hw.intc.apic_bus import ApicBus
from pyemu.hw.intc.ioapic import IOAPIC_MMIO_SIZE, IoApic
from pyemu.hw.intc.lapic import LocalApic
from pyemu.hw.intc.pic import PicPair
from pyemu.hw.misc.debug_exit import DebugExitConfig, IsaDebugExit
from pyemu.hw.misc.debugport import DEBUG_PORT, DebugPort
from pyemu.hw.misc.i8042 import COMMAND_PORT, DATA_PORT, I8042, I8042CommandPort, I8042DataPort
from pyemu.hw.misc.pvpanic import PanicEvent, Pvpanic, PvpanicConfig
from pyemu.hw.timer.pit import Pit
from pyemu.hw.timer.cmos import pc_cmos_memory_layout
from pyemu.hw.timer.rtc import Rtc
from pyemu.machines import memmap
from pyemu.machines.base import Machine
from pyemu.machines.device_props import check_globals
from pyemu.machines.virtio_devices import DriveUse, VirtioPlugger
from pyemu.system.messages import warn_report
from pyemu.system.config import DeviceOptions, VmConfig
from pyemu.system.cpu_context import current_cpu
from pyemu.system.runstate import ShutdownCause
from pyemu.target.x86.boot.loader import load_kernel
from pyemu.target.x86.cpu_models import TCG_WITHHELD_FEATURES
from pyemu.target.x86.cpu_state import MpState, X86CpuState
from pyemu.target.x86.cpuid import DEFAULT_TSC_HZ, CpuidTable, default_cpuid

if TYPE_CHECKING:
    from pyemu.system.iothread import IoThread

GED_GSI = 9
# Real-mode code at the reset vector: pulse the i8042 reset line (mov al, 0xfe; out 0x64, al), then
# hlt in a loop. There is no firmware, but a guest that "jumps to the BIOS" to reboot -- Linux falls back
# to machine_real_restart(MRR_BIOS), and reaches F000:FFF0 -- gets what a BIOS would do: a reset.
RESET_STUB = bytes([0xB0, 0xFE, 0xE6, 0x64, 0xF4, 0xEB, 0xFD])
MAX_SERIAL_PORTS = 2  # COM3/COM4 would share IRQ lines with COM1/COM2
ISA_DRIVERS = frozenset({"isa-debug-exit", "pvpanic"})  # -device models the board itself plugs
# The software CPU's engines share one byte per RAM page recording which of them hold translated code.
MAX_SOFTWARE_VCPUS = 8


@dataclass(frozen=True)
class MicrovmFeatures:
    """The resolved ``-machine`` switches (``auto`` replaced by the default for the accelerator)."""

    acpi: bool
    pic: bool
    pit: bool
    rtc: bool
    isa_serial: bool

    @staticmethod
    def resolve(config: VmConfig, accel_name: str) -> "MicrovmFeatures":
        opts = config.machine
        acpi = True if opts.acpi is None else opts.acpi
        # With ACPI the FADT is hardware-reduced and Linux ignores any 8259 (it installs its null
        # legacy PIC and never masks it), so an unprogrammed PIC would only inject stray vectors through
        # LINT0; the default is therefore no PIC when ACPI is on. Under KVM the LAPIC is in the kernel
        # (split irqchip) with no path for a userspace 8259's ExtINT, so the PIC is never available there.
        features = MicrovmFeatures(
            acpi=acpi,
            pic=(not acpi and accel_name == "tcg") if opts.pic is None else opts.pic,
            pit=True if opts.pit is None else opts.pit,
            rtc=True if opts.rtc is None else opts.rtc,
            isa_serial=True if opts.isa_serial is None else opts.isa_serial,
        )
        if features.pic and accel_name == "kvm":
            raise ConfigError("-machine microvm,pic=on is not supported with -accel kvm (split irqchip)",
                              option="-machine")
        return features


@dataclass(frozen=True)
class BootSource:
    kernel: str
    initrd: str | None
    cmdline: str


class Microvm(Machine):
    """QEMU-style microvm. Build with :meth:`create`; then ``start()`` and ``wait()``."""

    def __init__(self, config: VmConfig, accel: Accelerator, boot: BootSource) -> None:
        self.layout = memmap.RamLayout.for_size(config.ram_size)
        super().__init__(self.layout.regions(), accel, config.vcpus, ram_backend=config.ram_backend,
                         ram_sealed=config.ram_sealed)
        self.config = config
        self.boot = boot
        self.features = MicrovmFeatures.resolve(config, accel.name)
        config.check_accelerator(accel.name)  # -cpu host, -overcommit cpu-pm=on
        if not config.machine.dump_guest_core:
            self.memory.exclude_from_core_dumps()
        self.no_reboot = config.no_reboot
        self.no_shutdown = config.no_shutdown
        self.backends: list[CharBackend] = []
        self.serial_ports: list[IsaSerial] = []
        self.lapics: list[LocalApic] = []
        self.pic: PicPair | None = None
        # The software CPU's guest reads the host TSC, so CPUID must state the host's rate; KVM rewrites
        # the TSC leaves from the vCPU's real rate itself.
        self.tsc_hz: int = getattr(accel, "tsc_hz", DEFAULT_TSC_HZ)
        self.cpuid: CpuidTable = default_cpuid(vcpus=config.vcpus, tsc_hz=self.tsc_hz)
        self.acpi_rsdp: int | None = None

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def create(cls, config: VmConfig, accel: Accelerator, boot: BootSource,
               *, on_quit: Callable[[], None] | None = None) -> "Microvm":
        machine = cls(config, accel, boot)
        try:
            machine._build(on_quit)
        except BaseException:
            machine.close_backends()
            raise
        return machine

    def _build(self, on_quit: Callable[[], None] | None) -> None:
        accel = self.accel
        if accel.needs_userspace_lapic and self.vcpu_count > MAX_SOFTWARE_VCPUS:
            raise ConfigError(f"-smp {self.vcpu_count}: the software CPU (-accel tcg) runs at most "
                              f"{MAX_SOFTWARE_VCPUS} vCPUs", option="-smp")
        if accel.needs_userspace_lapic:
            self.cpuid = self.cpuid.without(*TCG_WITHHELD_FEATURES)
        self.cpuid = self.config.cpu.apply(self.cpuid, accel.name, warn_report,  # -cpu MODEL,-feature
                                           available=accel.cpu_features())
        accel.attach(self.memory, self.dispatcher, self.cpuid)

        devices = self.devices
        if self.features.pic:
            self.pic = PicPair()
            devices.add(BoardDevice("pic", self.pic, driver="i8259", on_reset=self._reset_pic, ranges=(
                IoRange("pio", 0x20, 2, self.pic.master), IoRange("pio", 0xA0, 2, self.pic.slave),
                IoRange("pio", 0x4D0, 2, self.pic.elcr))))
            self._program_pic_like_firmware()

        if accel.needs_userspace_lapic:
            for index in range(self.vcpu_count):
                lapic = LocalApic(self.timers, apic_id=index, bsp=index == 0,
                                  pic=self.pic if index == 0 else None, tsc_hz=self.tsc_hz,
                                  tsc_now=accel.tsc.value)
                self.lapics.append(lapic)
                devices.add(BoardDevice(f"lapic{index}", lapic, driver="apic"))
            # Every CPU reaches its own APIC at 0xfee00000: the bus routes by the accessing vCPU's thread.
            self.apic_bus = ApicBus(self.lapics, current_cpu)
            devices.add(BoardDevice("apic-bus", self.apic_bus, driver="apic-bus", on_reset=lambda: None, ranges=(
                IoRange("mmio", memmap.LAPIC_BASE, memmap.LAPIC_SIZE, self.apic_bus.mmio_page()),)))
            msi_sink: MsiSink = self.apic_bus
        else:
            sink = accel.msi_sink()
            if sink is None:
                raise ConfigError(f"accelerator {accel.name} provides neither a LAPIC nor an MSI path")
            msi_sink = sink
        self.ioapic = IoApic(msi_sink)
        devices.add(BoardDevice("ioapic", self.ioapic, driver="ioapic", ranges=(
            IoRange("mmio", memmap.IOAPIC_BASE, IOAPIC_MMIO_SIZE, self.ioapic),)))
        route_sink = getattr(msi_sink, "set_ioapic_route", None)
        if route_sink is not None:
            # In-kernel LAPIC (KVM): mirror the redirection table into the kernel's routes and take
            # EOIs of level-triggered vectors back to the userspace IOAPIC.
            self.ioapic.route_changed = route_sink
            set_eoi_handler = getattr(accel, "set_eoi_handler", None)
            if set_eoi_handler is not None:
                set_eoi_handler(self.ioapic.eoi)
        if self.lapics:
            for lapic in self.lapics:
                lapic.eoi_broadcast = self.ioapic.eoi
            if self.pic is not None:
                self.pic.int_output = self.lapics[0].lint(0)

        if self.features.pit:
            self.pit = Pit(self.timers, self.isa_irq(0, gsi=2))
            devices.add(BoardDevice("pit", self.pit, driver="isa-pit", ranges=(
                IoRange("pio", 0x40, 4, self.pit), IoRange("pio", 0x61, 1, self.pit.speaker))))
        if self.features.rtc:
            cmos = pc_cmos_memory_layout(self.layout.low_size, self.layout.high_size, cpus=self.vcpu_count)
            self.rtc = Rtc(self.timers, self.isa_irq(8), cmos=cmos, host_time_ns=self.config.rtc.time_source())
            devices.add(BoardDevice("rtc", self.rtc, driver="mc146818rtc", ranges=(
                IoRange("pio", 0x70, 2, self.rtc),)))

        self.i8042 = I8042(lambda: self.request_reset(ShutdownCause.GUEST_RESET))
        devices.add(BoardDevice("i8042", self.i8042, driver="i8042", ranges=(
            IoRange("pio", DATA_PORT, 1, I8042DataPort(self.i8042)),
            IoRange("pio", COMMAND_PORT, 1, I8042CommandPort(self.i8042)))))
        self.debug_port = DebugPort(self.timers)
        devices.add(BoardDevice("debug-port", self.debug_port, driver="debug-port", on_reset=lambda: None,
                                ranges=(IoRange("pio", DEBUG_PORT, 1, self.debug_port),)))

        self.ged = GedDevice(self.ioapic.pin(GED_GSI),
                             on_poweroff=lambda: self.request_shutdown(ShutdownCause.GUEST_SHUTDOWN, 0),
                             on_reset=lambda: self.request_reset(ShutdownCause.GUEST_RESET),
                             layout=GedLayout(base=memmap.GED_BASE, gsi=GED_GSI, level_triggered=True))
        devices.add(BoardDevice("ged", self.ged, driver="acpi-ged", ranges=(
            IoRange("mmio", memmap.GED_BASE, memmap.GED_SIZE, self.ged),)))
        self.power_button = self._press_power_button

        self._check_chardevs()
        self._build_serial_ports(on_quit)
        self.virtio = VirtioPlugger(config=self.config, devices=devices,
                                    dma=DmaMemory.wired_to(self.memory, accel),
                                    irq_pin=self.ioapic.pin, lock=self.lock, accel=accel,
                                    edge_route=self.ioapic.edge_route)
        self.virtio.backends.chardevs = self.chardevs
        for warning in check_globals(self.config.globals, lambda d: d in ISA_DRIVERS or self.virtio.handles(d)):
            warn_report(warning)
        for device in self._devices_with_implicit_drives():
            self._add_device(device)
        self._open_unused_chardevs()

        for index in range(self.vcpu_count):
            interrupts = self.lapics[index] if self.lapics else None
            vcpu = accel.create_vcpu(index, interrupts)
            self.vcpus.append(vcpu)
            if self.lapics:
                self.lapics[index].kick = vcpu.kick
                self.lapics[index].event_kick = getattr(vcpu, "notify_event", None)
                self.lapics[index].wake_words = getattr(vcpu, "wake_words", None)
        self.load_boot()
        for vcpu, state in zip(self.vcpus, self.boot_states):
            vcpu.load_state(state)

    def _program_pic_like_firmware(self) -> None:
        """Initialise the 8259 pair as PC firmware does before it jumps to a kernel: vectors 0x08-0x0f
        and 0x70-0x77, cascade on IR2, every input masked. A guest that never touches the PIC (Linux with
        ACPI) then sees no stray interrupts; one that does reprograms it anyway."""
        assert self.pic is not None
        for port, icw2, icw3, mask in ((self.pic.master, 0x08, 0x04, 0xFB), (self.pic.slave, 0x70, 0x02, 0xFF)):
            for offset, value in ((0, 0x11), (1, icw2), (1, icw3), (1, 0x01), (1, mask)):
                port.write(offset, 1, value)

    def isa_irq(self, irq: int, gsi: int | None = None) -> IrqLine:
        """The line of ISA ``irq``: to the PIC pin (if any) and to IOAPIC ``gsi`` (default: same number)."""
        ioapic_pin = self.ioapic.pin(irq if gsi is None else gsi)
        if self.pic is None:
            return ioapic_pin
        return fanout(self.pic.pin(irq), ioapic_pin, name=f"isa-irq{irq}")

    def _check_chardevs(self) -> None:
        """Every ``-chardev`` is validated at start-up, used or not (as QEMU does), and stdio can have one
        reader only: a ``-chardev stdio`` next to a serial port on stdio would split the user's typing."""
        stdio: list[str] = []
        if self.config.chardevs:  # (the options module and every backend's spec: only for a -chardev)
            from pyemu.chardev.options import parse_chardev_options

            stdio = [c.id for c in self.config.chardevs if isinstance(parse_chardev_options(c).spec, StdioSpec)]
        serial_on_stdio = self.features.isa_serial and any(
            isinstance(parse_chardev_spec(text, option="-serial"), StdioSpec)
            for text in self.config.serial_specs())
        if len(stdio) + serial_on_stdio > 1:
            raise ConfigError("cannot use stdio by multiple character devices"
                              + (" (add -serial none or -serial null)" if serial_on_stdio else ""),
                              option="-chardev")

    def _open_unused_chardevs(self) -> None:
        """QEMU opens every ``-chardev`` at start-up, used or not (a socket listens, a file is created) and
        ``query-chardev`` lists it with ``frontend-open: false``; the ones a monitor takes are its own."""
        if not self.config.chardevs:
            return
        from pyemu.chardev.options import open_chardev_options

        taken = {use.label for use in self.chardevs.uses()}
        taken.update(m.chardev for m in self.config.monitors if m.chardev)
        for options in self.config.chardevs:
            if options.id in taken:
                continue
            backend = open_chardev_options(options)
            self.backends.append(backend)
            self.chardevs.add(options.id, backend, frontend_open=lambda: False)

    def _build_serial_ports(self, on_quit: Callable[[], None] | None) -> None:
        if not self.features.isa_serial:
            if self.config.serial:
                raise ConfigError("-serial needs isa-serial=on", option="-serial")
            return
        specs = list(self.config.serial_specs())
        if len(specs) > MAX_SERIAL_PORTS:
            raise ConfigError(f"-serial: at most {MAX_SERIAL_PORTS} serial ports", option="-serial")
        for index, text in enumerate(specs):
            spec = parse_chardev_spec(text, option="-serial")
            if isinstance(spec, NoneSpec):
                continue
            backend = open_chardev(spec, on_quit=on_quit, chardevs=self.config.chardevs)
            self.backends.append(backend)
            port = IsaSerial.create(self.isa_irq(ISA_SERIAL_RESOURCES[index][1]), self.timers,
                                    backend.write, index=index)
            info = SerialPortInfo(device_name=f"COM{index + 1}", uid=len(self.serial_ports), io_base=port.iobase,
                                  irq=port.irq)
            self.devices.add(BoardDevice(f"serial{index}", port.core, driver="isa-serial", ranges=(
                IoRange("pio", port.iobase, REGISTER_COUNT, port.core),),
                aml=serial_port_device(info, legacy_pic=self.features.pic), on_close=lambda: None))
            port.add_fast_paths(self.pio)
            backend.attach(port.core, self.lock)
            # QEMU labels a -serial's implicit chardev serialN, a -serial chardev:ID by that ID.
            self.chardevs.add(spec.id if isinstance(spec, ChardevRefSpec) else f"serial{index}", backend)
            self.serial_ports.append(port)

    def _devices_with_implicit_drives(self) -> list[DeviceOptions]:
        """The -device list, then a virtio-blk-device for every ``-drive ...,if=virtio`` (QEMU's
        shorthand; QEMU too appends those devices after the explicit ones), in the drives' order."""
        implicit: list[DeviceOptions] = []
        drives = list(self.config.drives)
        for index, props in enumerate(drives):
            values = dict(props)
            if values.get("if", "none") == "virtio":
                drive_id = values.get("id") or f"virtio{index}"
                if "id" not in values:
                    drives[index] = props + (("id", drive_id),)
                implicit.append(DeviceOptions("virtio-blk-device", (("drive", drive_id),)))
        if implicit:
            self.config = replace(self.config, drives=tuple(tuple((k, v) for k, v in d if k != "if") for d in drives))
            self.virtio.backends.config = self.config
        return [self.config.with_globals(device) for device in list(self.config.devices) + implicit]

    def _add_device(self, device: DeviceOptions) -> None:
        if device.driver == "isa-debug-exit":
            props = dict(device.props)
            device_id = props.pop("id", None) or self.devices.new_id("isa-debug-exit")
            config = DebugExitConfig.from_properties(props)
            debug_exit = IsaDebugExit(
                lambda status: self.request_shutdown(ShutdownCause.DEBUG_EXIT, status & 0xFF), config)
            self.devices.add(BoardDevice(device_id, debug_exit, driver="isa-debug-exit", ranges=(
                IoRange("pio", config.iobase, config.iosize, debug_exit),)))
            return
        if device.driver == "pvpanic":
            props = dict(device.props)
            device_id = props.pop("id", "") or self.devices.new_id("pvpanic")
            pvpanic = Pvpanic(self._pvpanic_event, PvpanicConfig.from_properties(props))
            self.devices.add(BoardDevice(device_id, pvpanic, driver="pvpanic", ranges=(
                IoRange("pio", pvpanic.config.ioport, 1, pvpanic),), aml=pvpanic.aml()))
            return
        if self.virtio.handles(device.driver):
            self.virtio.add(device)
            return
        raise ConfigError(f"-device: '{device.driver}' is not a valid device model name", option="-device")

    def _pvpanic_event(self, event: PanicEvent) -> None:
        if event is PanicEvent.PANICKED:
            self.guest_panicked()
        else:
            self.guest_crash_loaded()

    def _reset_pic(self) -> None:
        assert self.pic is not None
        self.pic.reset()
        self._program_pic_like_firmware()

    # -- boot -------------------------------------------------------------------------------------------
    def acpi_config(self) -> AcpiConfig:
        """The tables: fixed board hardware from the features, every device's own DSDT entry from the
        device manager (serial ports, virtio-mmio slots), in creation order."""
        return AcpiConfig(cpus=self.vcpu_count, ged=GedLayout(base=memmap.GED_BASE, gsi=GED_GSI,
                                                               level_triggered=True),
                          serial_ports=(), device_aml=tuple(self.devices.aml()),
                          pic=self.features.pic, pit=self.features.pit,
                          rtc=self.features.rtc, i8042=True,
                          address=memmap.ACPI_TABLES_BASE,
                          limit=memmap.ACPI_TABLES_BASE + memmap.ACPI_TABLES_SIZE)

    def kernel_cmdline(self) -> str:
        """The command line, plus QEMU's ``auto-kernel-cmdline``: without ACPI to describe them, each
        virtio-mmio device is announced as ``virtio_mmio.device=512@BASE:GSI``."""
        if self.features.acpi or not self.config.machine.auto_kernel_cmdline:
            return self.boot.cmdline
        return " ".join([self.boot.cmdline] + [f"virtio_mmio.device={slot.size}@{slot.base:#x}:{slot.gsi}"
                                               for slot in self.virtio.slots]).strip()

    def load_boot(self) -> None:
        if self.features.acpi:
            blob = build_acpi(self.acpi_config())
            self.memory.write(blob.address, blob.data)
            self.acpi_rsdp = blob.rsdp_address
        self.memory.write(memmap.RESET_VECTOR, RESET_STUB)
        result = load_kernel(self.memory, self.boot.kernel, self.boot.initrd, self.kernel_cmdline(),
                             self.layout.e820(), self.acpi_rsdp)
        self.boot_result = result
        # The boot processor gets the kernel's entry state; application processors wait for INIT/SIPI
        # from the kernel, as after a PC's reset (also after a machine reset, where they may have run).
        self.boot_states = [result.cpu] + [X86CpuState(mp_state=MpState.WAIT_FOR_SIPI)
                                           for _ in range(1, self.vcpu_count)]

    def migration_identity(self) -> dict[str, object]:
        features = self.features
        options: dict[str, object] = {"acpi": features.acpi, "pic": features.pic, "pit": features.pit,
                                      "rtc": features.rtc, "isa-serial": features.isa_serial}
        cpu = self.config.cpu
        if cpu.model is not None or cpu.props:  # the guest's CPUID: a stream of another -cpu is refused
            options["cpu"] = cpu.describe()
        return {"board": "microvm", "options": options}

    def iothreads(self) -> list[IoThread]:
        return list(self.virtio.iothreads.values())

    def drives(self) -> list[DriveUse]:
        return list(self.virtio.drives)

    def _press_power_button(self) -> None:
        with self.lock:  # the GED raises its interrupt line, which devices only do under the board lock
            self.ged.press_power_button()

    def close_backends(self) -> None:
        virtio = getattr(self, "virtio", None)
        if virtio is not None:
            virtio.close()
        self.devices.close_all()
        for backend in self.backends:
            backend.close()
        self.backends.clear()

    def start(self, paused: bool = False) -> None:
        self.virtio.start()
        super().start(paused)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.close_backends()
