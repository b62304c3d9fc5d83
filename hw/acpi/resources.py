"""ACPI resource descriptors and ``ResourceTemplate``: what ``_CRS`` objects return.

A device's ``_CRS`` is a Buffer holding a sequence of descriptors (ACPI 6.x, 6.4 "Resource Data Types for
ACPI") terminated by an End Tag. Small descriptors have a one-byte header (bit 7 clear, item name in
bits 3-6, length in bits 0-2); large ones a 0x80|name byte and a 16-bit length. Each function here returns
the raw descriptor bytes; :func:`resource_template` wraps them into the AML Buffer, with the End Tag's
checksum byte 0 ("treat as correct"), as iasl emits it.
"""

from __future__ import annotations

import struct

from pyemu.hw.acpi.aml import Aml, buffer
from pyemu.hw.acpi.errors import AmlError

# Small item headers (name << 3 | length) and large item tags.
IRQ_NO_FLAGS_TAG = 0x22  # IRQ, 2 bytes: mask only (edge, active high, exclusive)
IO_TAG = 0x47  # I/O port, 7 bytes
END_TAG = 0x79  # End Tag, 1 byte (checksum)
MEMORY32_FIXED_TAG = 0x86
DWORD_ADDRESS_TAG = 0x87
EXTENDED_INTERRUPT_TAG = 0x89
QWORD_ADDRESS_TAG = 0x8A

# Address space descriptor: resource types and memory caching (_MEM).
RESOURCE_TYPE_MEMORY = 0
MEM_NON_CACHEABLE = 0
MEM_CACHEABLE = 1
MEM_WRITE_COMBINING = 2
MEM_PREFETCHABLE = 3


def _check(value: int, bits: int, what: str) -> int:
    if not 0 <= value < (1 << bits):
        raise AmlError(f"{what} {value:#x} does not fit in {bits} bits", value=value)
    return value


def io(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """``IO (Decode16|Decode10, minimum, maximum, alignment, length)``: a legacy port range."""
    _check(minimum, 16, "IO minimum")
    _check(maximum, 16, "IO maximum")
    _check(alignment, 8, "IO alignment")
    _check(length, 8, "IO length")
    return struct.pack("<BBHHBB", IO_TAG, 1 if decode16 else 0, minimum, maximum, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """``IRQNoFlags () {irqs}``: ISA IRQs 0-15, edge-triggered, active high, exclusive."""
    if not irqs:
        raise AmlError("IRQNoFlags needs at least one IRQ", value=irqs)
    mask = 0
    for irq in irqs:
        mask |= 1 << _check(irq, 4, "ISA IRQ")
    return struct.pack("<BH", IRQ_NO_FLAGS_TAG, mask)


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """``Memory32Fixed (ReadWrite|ReadOnly, base, length)``: an MMIO window such as a virtio-mmio slot."""
    _check(base, 32, "Memory32Fixed base")
    _check(length, 32, "Memory32Fixed length")
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, 1 if writable else 0, base, length)


def _address_space(
    tag: int,
    word: str,
    minimum: int,
    maximum: int,
    length: int,
    *,
    granularity: int,
    translation: int,
    consumer: bool,
    cacheable: int,
    writable: bool,
) -> bytes:
    bits = 32 if word == "I" else 64
    for what, number in (
        ("minimum", minimum),
        ("maximum", maximum),
        ("length", length),
        ("granularity", granularity),
        ("translation", translation),
    ):
        _check(number, bits, f"address space {what}")
    if length and maximum - minimum + 1 != length:
        raise AmlError(
            f"fixed address range {minimum:#x}-{maximum:#x} does not have length {length:#x}", value=length
        )
    _check(cacheable, 2, "memory caching type")
    # General flags: _MAF (bit 3) and _MIF (bit 2) set (fixed window), positive decode, consumer in bit 0.
    general = 0x0C | (1 if consumer else 0)
    specific = (cacheable << 1) | (1 if writable else 0)
    body = struct.pack(f"<BB5{word}", general, specific, granularity, minimum, maximum, translation, length)
    return struct.pack("<BHB", tag, len(body) + 1, RESOURCE_TYPE_MEMORY) + body


def dword_memory(
    minimum: int,
    maximum: int,
    length: int,
    *,
    granularity: int = 0,
    translation: int = 0,
    consumer: bool = True,
    cacheable: int = MEM_NON_CACHEABLE,
    writable: bool = True,
) -> bytes:
    """``DWordMemory (..., PosDecode, MinFixed, MaxFixed, ...)``: a fixed 32-bit memory window."""
    return _address_space(
        DWORD_ADDRESS_TAG, "I", minimum, maximum, length,
        granularity=granularity, translation=translation, consumer=consumer, cacheable=cacheable,
        writable=writable,
    )  # fmt: skip


def qword_memory(
    minimum: int,
    maximum: int,
    length: int,
    *,
    granularity: int = 0,
    translation: int = 0,
    consumer: bool = True,
    cacheable: int = MEM_NON_CACHEABLE,
    writable: bool = True,
) -> bytes:
    """``QWordMemory (..., PosDecode, MinFixed, MaxFixed, ...)``: a fixed 64-bit memory window."""
    return _address_space(
        QWORD_ADDRESS_TAG, "Q", minimum, maximum, length,
        granularity=granularity, translation=translation, consumer=consumer, cacheable=cacheable,
        writable=writable,
    )  # fmt: skip


def interrupt(
    *gsis: int,
    edge: bool,
    active_low: bool = False,
    shared: bool = False,
    consumer: bool = True,
    wake: bool = False,
) -> bytes:
    """``Interrupt (ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}``.

    The extended interrupt descriptor names global system interrupts (IOAPIC inputs), so it reaches
    beyond ISA IRQ 15. No ResourceSource: the interrupts belong to the platform's controller.
    Flags: bit 0 consumer, bit 1 edge, bit 2 active low, bit 3 shared, bit 4 wake capable.
    """
    if not 1 <= len(gsis) <= 255:
        raise AmlError(f"Interrupt descriptor with {len(gsis)} interrupts (1..255)", value=gsis)
    flags = (
        (1 if consumer else 0) | (2 if edge else 0) | (4 if active_low else 0) | (8 if shared else 0)
        | (16 if wake else 0)
    )  # fmt: skip
    numbers = b"".join(struct.pack("<I", _check(g, 32, "interrupt number")) for g in gsis)
    return struct.pack("<BHBB", EXTENDED_INTERRUPT_TAG, 2 + len(numbers), flags, len(gsis)) + numbers


def resource_template(*descriptors: bytes) -> Aml:
    """``ResourceTemplate () { descriptors }``: a Buffer of the descriptors plus End Tag (checksum 0)."""
    for descriptor in descriptors:
        if isinstance(descriptor, Aml) or not isinstance(descriptor, (bytes, bytearray)):
            raise AmlError("resource_template() takes descriptor bytes, not AML terms", value=descriptor)
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
