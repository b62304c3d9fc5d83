"""AML encodings, byte by byte, from ACPI 6.x chapter 20 (and resource descriptors from 6.4).

The expected byte strings are worked out from the grammar by hand; ``test_acpi_tables.py`` additionally
checks whole tables against ``iasl``.
"""

from __future__ import annotations

import pytest

from pyemu.hw.acpi import aml
from pyemu.hw.acpi.aml import Aml, FieldOffset, FieldReserved, FieldUnit
from pyemu.hw.acpi.errors import AmlError
from pyemu.hw.acpi import resources as res


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- PkgLength -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, encoded",
    [
        (0, "01"),  # the length counts its own byte
        (62, "3f"),  # largest one-byte form: 63
        (63, "4104"),  # 63 + 2 = 65 = 0x41: low nibble 1 in the lead byte, 0x04 follows
        (0xFFD, "4fff"),  # largest two-byte form: 0xFFF
        (0xFFE, "810001"),  # 0xFFE + 3 = 0x1001
        (0xFFFFC, "8fffff"),  # largest three-byte form: 0xFFFFF
        (0xFFFFD, "c1000001"),  # 0xFFFFD + 4 = 0x100001
        ((1 << 28) - 5, "cfffffff"),  # largest four-byte form
    ],
)
def test_pkg_length_boundaries(body: int, encoded: str) -> None:
    assert aml.pkg_length(body) == h(encoded)


def test_pkg_length_too_long_is_an_error() -> None:
    with pytest.raises(AmlError):
        aml.pkg_length((1 << 28) - 4)


@pytest.mark.parametrize("value, encoded", [(0, "00"), (32, "20"), (63, "3f"), (64, "4004"), (0x1000, "800001")])
def test_raw_pkg_length_for_field_widths(value: int, encoded: str) -> None:
    assert aml.encode_pkg_length(value) == h(encoded)


def test_scope_uses_two_byte_pkg_length_past_63() -> None:
    inner = aml.name("X", aml.buffer(bytes(53)))  # 08 'X___' 11 len 0A 35 + 53 bytes = 62 bytes
    assert len(inner) == 62
    encoded = aml.scope("\\_SB", inner)
    # body = 5 (\_SB_) + 62 = 67 -> 67 + 2 = 69 = 0x45 -> 45 04
    assert encoded[:3] == h("104504")
    assert encoded[3:8] == b"\\_SB_"
    assert len(encoded) == 1 + 2 + 67


# --- Names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, encoded",
    [
        ("PWRB", b"PWRB"),
        ("_SB", b"_SB_"),  # padded with underscores
        ("\\", b"\\\x00"),  # root alone: RootChar NullName
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.PWRB", b"\\\x2e_SB_PWRB"),  # DualNamePrefix
        ("^PWRB", b"^PWRB"),
        ("^", b"^\x00"),  # parent scope itself: ParentPrefix NullName
        ("^^GED", b"^^GED_"),
        ("_SB.GED.ESEL", b"\x2f\x03_SB_GED_ESEL"),  # MultiNamePrefix + count
        ("\\A.B.C.D", b"\\\x2f\x04A___B___C___D___"),
    ],
)
def test_name_strings(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "1ABC", "ABCDE", "ab", "A..B", "\\^A", "A-B", "^A.1B"])
def test_invalid_names_are_rejected(path: str) -> None:
    with pytest.raises(AmlError):
        aml.name_string(path)


# --- Data ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, "00"),
        (1, "01"),
        (2, "0a02"),
        (0xFF, "0aff"),
        (0x100, "0b0001"),
        (0xFFFF, "0bffff"),
        (0x10000, "0c00000100"),
        (0xFEA00000, "0c0000a0fe"),
        (0x100000000, "0e0000000001000000"),
        ((1 << 64) - 1, "0effffffffffffffff"),
    ],
)
def test_integers_use_shortest_prefix(value: int, encoded: str) -> None:
    assert aml.integer(value) == h(encoded)


def test_integer_constants_and_limits() -> None:
    assert aml.ZERO == h("00") and aml.ONE == h("01") and aml.ONES == h("ff")
    for bad in (-1, 1 << 64):
        with pytest.raises(AmlError):
            aml.integer(bad)


def test_strings() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.string("") == h("0d00")
    for bad in ("caf\u00e9", "a\x00b"):
        with pytest.raises(AmlError):
            aml.string(bad)


def test_buffer_and_package() -> None:
    assert aml.buffer(b"\x79\x00") == h("11 05 0a02 7900")
    assert aml.package(5, 0, 0, 0) == h("12 07 04 0a05 00 00 00")
    assert aml.package("A", aml.ONES) == h("12 06 02 0d4100 ff")
    with pytest.raises(AmlError):
        aml.package(*range(256))
    with pytest.raises(AmlError):
        aml.name("X", b"raw")  # type: ignore[arg-type]  # raw bytes must be wrapped in buffer()


@pytest.mark.parametrize(
    "eisa_id, value",
    [
        ("PNP0501", 0x0105D041),
        ("PNP0C0C", 0x0C0CD041),
        ("PNP0A03", 0x030AD041),
        ("PNP0103", 0x0301D041),
        ("IBM0001", 0x01004D24),
    ],
)
def test_eisaid_compression(eisa_id: str, value: int) -> None:
    assert aml.eisaid_value(eisa_id) == value
    assert aml.eisaid(eisa_id) == b"\x0c" + value.to_bytes(4, "little")


@pytest.mark.parametrize("bad", ["PNP050", "pnp0501", "PNP050G", "LNRO0005", "1NP0501"])
def test_invalid_eisaid(bad: str) -> None:
    with pytest.raises(AmlError):
        aml.eisaid(bad)


# --- Named objects, statements -------------------------------------------------------------------------------


def test_name_device_scope() -> None:
    assert aml.name("_UID", 0) == b"\x08_UID\x00"
    assert aml.name("_HID", aml.eisaid("PNP0501")) == b"\x08_HID\x0c\x41\xd0\x05\x01"
    assert aml.name("_HID", "ACPI0013") == b"\x08_HID\x0dACPI0013\x00"
    dev = aml.device("PWRB", aml.name("_UID", 0))
    assert dev == b"\x5b\x82\x0b" + b"PWRB" + b"\x08_UID\x00"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"


def test_method_flags() -> None:
    assert aml.method("_EVT", 1, serialized=True) == h("14 06") + b"_EVT" + h("09")
    assert aml.method("FOO", 0) == h("14 06") + b"FOO_" + h("00")
    assert aml.method("BAR", 7, sync_level=15)[-1] == 0xF7
    assert aml.method("_STA", 0, aml.return_(0x0F)) == h("14 09") + b"_STA" + h("00 a4 0a0f")
    for bad in ({"arg_count": 8}, {"arg_count": 0, "sync_level": 16}):
        with pytest.raises(AmlError):
            aml.method("X", **bad)  # type: ignore[arg-type]


def test_locals_and_args() -> None:
    assert aml.LOCAL0 == h("60") and aml.local(7) == h("67")
    assert aml.arg(0) == h("68") and aml.arg(6) == h("6e")
    with pytest.raises(AmlError):
        aml.arg(7)


def test_expressions() -> None:
    assert aml.store(aml.name_ref("ESEL"), aml.LOCAL0) == b"\x70ESEL\x60"
    assert aml.store(5, "\\_SB.GED.ESEL") == b"\x70\x0a\x05\\\x2f\x03_SB_GED_ESEL"
    assert aml.and_(aml.LOCAL0, 1) == h("7b 60 01 00")  # NullName target
    assert aml.or_(aml.LOCAL0, 2, aml.LOCAL1) == h("7d 60 0a02 61")
    assert aml.lequal(aml.and_(aml.LOCAL0, 1), 1) == h("93 7b600100 01")
    assert aml.land(aml.ONE, aml.lnot(aml.ZERO)) == h("90 01 92 00")
    assert aml.notify("\\_SB.PWRB", 0x80) == b"\x86\\\x2e_SB_PWRB\x0a\x80"
    with pytest.raises(AmlError):
        aml.store("ESEL", aml.LOCAL0)  # type: ignore[arg-type]  # ambiguous: name or string?


def test_if_else() -> None:
    if_term = aml.if_(aml.lequal(aml.LOCAL0, 1), aml.return_(1))
    assert if_term == h("a0 06 93 60 01 a4 01")
    assert aml.else_(aml.return_(0)) == h("a1 03 a4 00")


def test_operation_region_and_field() -> None:
    region = aml.operation_region("EREG", aml.RegionSpace.SYSTEM_MEMORY, 0xFEA00000, 4)
    assert region == b"\x5b\x80EREG\x00\x0c\x00\x00\xa0\xfe\x0a\x04"
    io_region = aml.operation_region("PRT", aml.RegionSpace.SYSTEM_IO, 0x402, 1)
    assert io_region == b"\x5b\x80PRT_\x01\x0b\x02\x04\x01"
    fld = aml.field(
        "EREG",
        FieldUnit("ESEL", 32),
        FieldOffset(8),  # gap of 32 bits from bit 32 to bit 64
        FieldUnit("CTL", 8),
        FieldReserved(4),
        FieldUnit("STS", 4),
        access=aml.AccessType.DWORD,
        update=aml.UpdateRule.WRITE_AS_ZEROS,
    )
    # flags: DWordAcc (3) | WriteAsZeros (2 << 5) = 0x43
    body = b"EREG\x43" + b"ESEL\x20" + b"\x00\x20" + b"CTL_\x08" + b"\x00\x04" + b"STS_\x04"
    assert fld == b"\x5b\x81" + bytes([len(body) + 1]) + body
    assert aml.field("R", FieldUnit("A", 8), access=aml.AccessType.BYTE, lock=True)[3 + 4] == 0x11
    with pytest.raises(AmlError):
        aml.field("R", FieldUnit("A", 16), FieldOffset(1))  # offset behind position


# --- Resource descriptors ------------------------------------------------------------------------------------


def test_io_and_irq_no_flags() -> None:
    assert res.io(0x3F8, 0x3F8, 1, 8) == h("47 01 f803 f803 01 08")
    assert res.io(0x60, 0x60, 0, 1, decode16=False) == h("47 00 6000 6000 00 01")
    assert res.irq_no_flags(4) == h("22 1000")
    assert res.irq_no_flags(1, 12) == h("22 0210")
    for bad in ((0x10000, 0x10000, 1, 8), (0x3F8, 0x3F8, 1, 0x100)):
        with pytest.raises(AmlError):
            res.io(*bad)
    with pytest.raises(AmlError):
        res.irq_no_flags(16)


def test_memory_descriptors() -> None:
    assert res.memory32_fixed(0xFEB00000, 0x200) == h("86 0900 01 0000b0fe 00020000")
    assert res.memory32_fixed(0xFED00000, 0x400, writable=False)[3] == 0
    dword = res.dword_memory(0xFEC00000, 0xFEC00FFF, 0x1000)
    assert dword == h("87 1700 00 0d 01 00000000 0000c0fe ff0fc0fe 00000000 00100000")
    qword = res.qword_memory(1 << 32, (2 << 32) - 1, 1 << 32, cacheable=res.MEM_CACHEABLE)
    assert qword[:6] == h("8a 2b00 00 0d 03")
    assert qword[6:] == (0).to_bytes(8, "little") + (1 << 32).to_bytes(8, "little") + ((2 << 32) - 1).to_bytes(
        8, "little"
    ) + (0).to_bytes(8, "little") + (1 << 32).to_bytes(8, "little")
    with pytest.raises(AmlError):
        res.dword_memory(0x1000, 0x1FFF, 0x2000)  # length does not match the fixed window


def test_extended_interrupt() -> None:
    assert res.interrupt(16, edge=False) == h("89 0600 01 01 10000000")
    assert res.interrupt(5, 6, edge=True, active_low=True, shared=True) == h("89 0a00 0f 02 05000000 06000000")
    assert res.interrupt(9, edge=True, consumer=False, wake=True)[3] == 0x12
    with pytest.raises(AmlError):
        res.interrupt(edge=True)


def test_resource_template_has_end_tag_with_zero_checksum() -> None:
    template = res.resource_template(res.io(0x3F8, 0x3F8, 1, 8), res.irq_no_flags(4))
    assert template == h("11 10 0a0d 47 01 f803 f803 01 08 22 1000 79 00")
    assert res.resource_template() == h("11 05 0a02 7900")
    with pytest.raises(AmlError):
        res.resource_template(aml.ONE)  # an AML term is not a descriptor


def test_aml_type_is_kept_through_builders() -> None:
    assert isinstance(aml.device("X"), Aml)
    assert isinstance(res.resource_template(), Aml)
    with pytest.raises(AmlError):
        aml.device("X", b"\x01")  # type: ignore[arg-type]
