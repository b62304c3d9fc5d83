"""DSDT content for a microvm-shaped board: serial ports, virtio-mmio slots, the GED, the power button, _S5.

Why the DSDT matters here: Debian's 6.1 kernel has virtio-mmio built without command-line device support,
so it finds virtio-mmio devices only as ACPI devices with _HID ``LNRO0005`` (as on QEMU's microvm with
acpi=on). Each helper returns one AML term; :func:`build_dsdt_aml` assembles them into the body of the
DSDT: every device under ``\\_SB``, and ``_S5`` at the root.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyemu.hw.acpi import ged
from pyemu.hw.acpi.aml import (
    LOCAL0,
    AccessType,
    Aml,
    FieldUnit,
    RegionSpace,
    UpdateRule,
    and_,
    device,
    eisaid,
    field,
    if_,
    lequal,
    method,
    name,
    name_ref,
    notify,
    operation_region,
    package,
    scope,
    store,
    string,
)
from pyemu.hw.acpi.errors import AcpiError
from pyemu.hw.acpi.resources import interrupt, io, irq_no_flags, memory32_fixed, resource_template

POWER_BUTTON_PATH = "\\_SB.PWRB"
NOTIFY_STATUS_CHANGE = 0x80
"""Notify code a power button device receives when it is pressed."""

VIRTIO_MMIO_HID = "LNRO0005"
VIRTIO_MMIO_SLOT_SIZE = 0x200


@dataclass(frozen=True)
class SerialPortInfo:
    """A 16550 on the ISA port space: ``COM1`` is ``SerialPortInfo()``."""

    device_name: str = "COM1"
    uid: int = 0
    io_base: int = 0x3F8
    irq: int = 4


@dataclass(frozen=True)
class VirtioMmioSlot:
    """One virtio-mmio transport: register window ``base``/``size`` and its interrupt ``gsi``."""

    base: int
    gsi: int
    size: int = VIRTIO_MMIO_SLOT_SIZE
    level_triggered: bool = True
    """Virtio-mmio's interrupt status is a level (cleared by the driver's ACK write), as QEMU describes it."""


def isa_irq_resource(irq: int, *, legacy_pic: bool) -> bytes:
    """An ISA device's interrupt: with an 8259 PIC an ISA ``IRQNoFlags``; without one an extended
    ``Interrupt`` on the same GSI (edge, active high), which needs no PIC semantics."""
    return irq_no_flags(irq) if legacy_pic else interrupt(irq, edge=True)


def serial_port_device(port: SerialPortInfo, *, legacy_pic: bool) -> Aml:
    """``Device (COM1)``: a 16550A (``PNP0501``) with its 8 I/O ports and IRQ."""
    irq = isa_irq_resource(port.irq, legacy_pic=legacy_pic)
    return device(
        port.device_name,
        name("_HID", eisaid("PNP0501")),
        name("_UID", port.uid),
        name("_CRS", resource_template(io(port.io_base, port.io_base, 1, 8), irq)),
    )


RTC_IO_BASE = 0x70
RTC_IO_PORTS = 2
RTC_IRQ = 8


def rtc_device(*, legacy_pic: bool) -> Aml:
    """``Device (RTC)``: the MC146818 (``PNP0B00``) at ports 0x70-0x71 with ISA IRQ 8.

    Why it must be described: with a hardware-reduced FADT Linux does not assume a CMOS clock, so without
    this device its ``rtc_cmos`` driver fails to probe and the guest boots with the clock at 1970.
    """
    return device(
        "RTC",
        name("_HID", eisaid("PNP0B00")),
        name("_CRS", resource_template(io(RTC_IO_BASE, RTC_IO_BASE, 1, RTC_IO_PORTS),
                                       isa_irq_resource(RTC_IRQ, legacy_pic=legacy_pic))),
    )


def virtio_mmio_device(uid: int, slot: VirtioMmioSlot) -> Aml:
    """``Device (VRnn)``: a virtio-mmio transport (``LNRO0005``) with its window and interrupt.

    ``_CCA`` One declares cache-coherent DMA: x86 Linux assumes it anyway, but arm64 Linux refuses DMA
    without it, and QEMU's microvm declares it too.
    """
    if not 0 <= uid <= 99:
        raise AcpiError(f"virtio-mmio slot number {uid} does not fit a VRnn device name (0..99)")
    return device(
        f"VR{uid:02d}",
        name("_HID", string(VIRTIO_MMIO_HID)),
        name("_UID", uid),
        name("_CCA", 1),
        name(
            "_CRS",
            resource_template(
                memory32_fixed(slot.base, slot.size),
                interrupt(slot.gsi, edge=not slot.level_triggered),
            ),
        ),
    )


def ged_device(layout: ged.GedLayout) -> Aml:
    """``Device (GED)``: the Generic Event Device (``ACPI0013``) for :class:`~pyemu.hw.acpi.ged.GedDevice`.

    Linux's GED driver requests the interrupt in ``_CRS`` and, when it fires, runs ``_EVT``, which reads
    (and thereby clears) the event selector and forwards a power-button event as ``Notify (PWRB, 0x80)``.
    """
    power = ged.EVENT_POWER_BUTTON
    return device(
        "GED",
        name("_HID", string("ACPI0013")),
        name("_UID", 0),
        name("_CRS", resource_template(interrupt(layout.gsi, edge=not layout.level_triggered))),
        operation_region("EREG", RegionSpace.SYSTEM_MEMORY, layout.event_selector_address, ged.EVENT_SELECTOR_WIDTH),
        field(
            "EREG",
            FieldUnit("ESEL", 8 * ged.EVENT_SELECTOR_WIDTH),
            access=AccessType.DWORD,
            update=UpdateRule.WRITE_AS_ZEROS,
        ),
        method(
            "_EVT",
            1,
            store(name_ref("ESEL"), LOCAL0),
            if_(lequal(and_(LOCAL0, power), power), notify(POWER_BUTTON_PATH, NOTIFY_STATUS_CHANGE)),
            serialized=True,
        ),
    )


def power_button_device() -> Aml:
    """``Device (PWRB)``: a control-method power button (``PNP0C0C``), the target of the GED's notify."""
    return device("PWRB", name("_HID", eisaid("PNP0C0C")), name("_UID", 0))


def s5_sleep_state() -> Aml:
    """``Name (_S5, Package { SLP_TYP, 0, 0, 0 })``: the soft-off state the OS writes to SLEEP_CONTROL.

    The first element is the SLP_TYP value for the (extended) sleep control register; the second (for the
    PM1b block) is ignored on a hardware-reduced platform; the last two are reserved.
    """
    return name("\\_S5", package(ged.SLEEP_TYPE_S5, 0, 0, 0))


def build_dsdt_aml(
    *,
    ged_layout: ged.GedLayout,
    serial_ports: tuple[SerialPortInfo, ...] = (),
    virtio_slots: tuple[VirtioMmioSlot, ...] = (),
    device_aml: tuple[bytes, ...] = (),
    legacy_pic: bool = False,
    rtc: bool = False,
) -> bytes:
    """The DSDT body: ``Scope (\\_SB) { COMn..., RTC, GED, PWRB, VR00... }`` then ``_S5``.

    Virtio slots get ``_UID`` and device names from their position in ``virtio_slots``. ``device_aml``
    holds terms devices built themselves (serial ports and virtio slots on a board with a device manager).
    """
    # Device terms from the board come right after the serial ports they usually describe, so the PNP
    # devices keep their numbering (COM1 00:00, RTC 00:01) whoever supplies them.
    devices = [serial_port_device(p, legacy_pic=legacy_pic) for p in serial_ports]
    devices += [Aml(term) for term in device_aml]  # terms the devices encoded themselves
    if rtc:
        devices.append(rtc_device(legacy_pic=legacy_pic))
    devices += [ged_device(ged_layout), power_button_device()]
    devices += [virtio_mmio_device(uid, slot) for uid, slot in enumerate(virtio_slots)]
    return scope("\\_SB", *devices) + s5_sleep_state()
