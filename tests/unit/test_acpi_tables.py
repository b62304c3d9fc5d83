"""ACPI tables: checksums, layout and cross-references, and what ACPICA's own tools make of them.

``iasl -d`` (the disassembler Linux's ACPICA ships) must parse every table without errors and show the
devices and registers we meant; the DSDT must survive a disassemble/recompile round trip byte for byte;
and ``acpiexec`` (ACPICA's interpreter, the same code Linux runs) executes the GED's ``_EVT`` method.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyemu.hw.acpi import aml, ged
from pyemu.hw.acpi.aml import FieldOffset, FieldReserved, FieldUnit
from pyemu.hw.acpi.builder import AcpiBlob, AcpiConfig, build_acpi
from pyemu.hw.acpi.dsdt import SerialPortInfo, VirtioMmioSlot
from pyemu.hw.acpi.errors import AcpiError, AcpiLayoutError
from pyemu.hw.acpi.fadt import FLAG_HW_REDUCED_ACPI, FLAG_RESET_REG_SUP, IAPC_CMOS_RTC_NOT_PRESENT
from pyemu.hw.acpi.madt import InterruptOverride, MadtConfig, build_madt
from pyemu.hw.acpi.resources import io, qword_memory, resource_template
from pyemu.hw.acpi.sdt import sdt

needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None, reason="acpica-tools (iasl) not installed")
needs_acpiexec = pytest.mark.skipif(shutil.which("acpiexec") is None, reason="acpica-tools (acpiexec) not installed")

VIRTIO = (
    VirtioMmioSlot(base=0xFEB00000, gsi=16),
    VirtioMmioSlot(base=0xFEB00200, gsi=17),
    VirtioMmioSlot(base=0xFEB00400, gsi=18, level_triggered=False),
)


def microvm_blob(**overrides: object) -> AcpiBlob:
    config = dict(cpus=2, virtio_slots=VIRTIO, ged=ged.GedLayout(base=0xFEA10000, gsi=23))
    config.update(overrides)
    return build_acpi(AcpiConfig(**config))  # type: ignore[arg-type]


def u32(data: bytes, offset: int) -> int:
    return struct.unpack_from("<I", data, offset)[0]


def u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


# --- Structure -----------------------------------------------------------------------------------------------


def test_every_table_sums_to_zero() -> None:
    blob = microvm_blob()
    for signature in ("XSDT", "FACP", "APIC", "DSDT"):
        table = blob.table(signature)
        assert table[:4] == signature.encode()
        assert u32(table, 4) == len(table)
        assert sum(table) % 256 == 0, signature
    rsdp = blob.table("RSDP")
    assert sum(rsdp[:20]) % 256 == 0  # ACPI 1.0 checksum
    assert sum(rsdp) % 256 == 0  # extended checksum


def test_rsdp_points_to_xsdt_and_xsdt_to_fadt_and_madt() -> None:
    blob = microvm_blob()
    rsdp = blob.table("RSDP")
    assert blob.rsdp_address == blob.address == 0xE0000
    assert rsdp[:8] == b"RSD PTR "
    assert rsdp[9:15] == b"PYEMU "
    assert rsdp[15] == 2  # revision: ACPI 2.0+
    assert u32(rsdp, 16) == 0  # no RSDT
    assert u32(rsdp, 20) == 36
    assert u64(rsdp, 24) == blob.tables["XSDT"]
    xsdt = blob.table("XSDT")
    pointers = [u64(xsdt, 36 + 8 * i) for i in range((len(xsdt) - 36) // 8)]
    assert pointers == [blob.tables["FACP"], blob.tables["APIC"]]
    for pointer, signature in zip(pointers, (b"FACP", b"APIC"), strict=True):
        offset = pointer - blob.address
        assert blob.data[offset : offset + 4] == signature


def test_layout_alignment_and_window() -> None:
    blob = microvm_blob()
    assert all(address % 16 == 0 for address in blob.tables.values())
    assert 0xE0000 <= blob.address and blob.end <= 0x100000
    # The OEM fields are pyemu's in every table.
    for signature in ("XSDT", "FACP", "APIC", "DSDT"):
        table = blob.table(signature)
        assert table[10:16] == b"PYEMU " and table[16:24] == b"PYEMUVM "
    # Elsewhere in RAM works too: every pointer follows the blob.
    high = microvm_blob(address=0x7FF0000, limit=0x8000000)
    assert high.rsdp_address == 0x7FF0000
    assert u64(high.table("RSDP"), 24) == high.tables["XSDT"] > 0x7FF0000


def test_layout_errors() -> None:
    with pytest.raises(AcpiLayoutError):
        AcpiConfig(address=0xE0008)
    with pytest.raises(AcpiLayoutError) as info:
        microvm_blob(address=0xFFF00)  # 256 bytes below the limit: nothing fits
    assert info.value.address == 0xFFF00 and info.value.size > 256
    with pytest.raises(AcpiError):
        microvm_blob(virtio_slots=tuple(VirtioMmioSlot(0xFEB00000 + i * 0x200, 16) for i in range(101)))


def test_fadt_is_hardware_reduced_and_points_at_ged_registers() -> None:
    blob = microvm_blob()
    fadt = blob.table("FACP")
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 3  # revision 6.3
    assert u32(fadt, 40) == blob.tables["DSDT"] and u64(fadt, 140) == blob.tables["DSDT"]
    flags = u32(fadt, 112)
    assert flags & FLAG_HW_REDUCED_ACPI and flags & FLAG_RESET_REG_SUP
    assert struct.unpack_from("<H", fadt, 109)[0] & IAPC_CMOS_RTC_NOT_PRESENT

    def gas(offset: int) -> tuple[int, int, int, int, int]:
        return struct.unpack_from("<BBBBQ", fadt, offset)

    base = 0xFEA10000
    assert gas(116) == (0, 8, 0, 1, base + ged.RESET)  # RESET_REG
    assert fadt[128] == ged.RESET_VALUE
    assert gas(244) == (0, 8, 0, 1, base + ged.SLEEP_CONTROL)
    assert gas(256) == (0, 8, 0, 1, base + ged.SLEEP_STATUS)
    assert fadt[268:276] == b"PYEMU\x00\x00\x00"
    assert not any(fadt[148:244])  # no legacy PM blocks
    with_rtc = microvm_blob(rtc=True).table("FACP")
    assert not struct.unpack_from("<H", with_rtc, 109)[0] & IAPC_CMOS_RTC_NOT_PRESENT


def madt_entries(madt: bytes) -> list[tuple[int, bytes]]:
    entries, offset = [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        entries.append((kind, madt[offset : offset + length]))
        offset += length
    assert offset == len(madt)
    return entries


def test_madt_entries() -> None:
    madt = microvm_blob(cpus=3).table("APIC")
    assert u32(madt, 36) == 0xFEE00000 and u32(madt, 40) == 0  # no PCAT_COMPAT
    entries = madt_entries(madt)
    lapics = [e for kind, e in entries if kind == 0]
    assert [(e[2], e[3], u32(e, 4)) for e in lapics] == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    (ioapic,) = [e for kind, e in entries if kind == 1]
    assert ioapic[2] == 0 and u32(ioapic, 4) == 0xFEC00000 and u32(ioapic, 8) == 0
    assert not [e for kind, e in entries if kind == 2]  # no PIT, no PIC: no IRQ0 override
    (nmi,) = [e for kind, e in entries if kind == 4]
    assert nmi == bytes([4, 6, 0xFF, 0, 0, 1])  # all processors, LINT1

    legacy = microvm_blob(pic=True, pit=True).table("APIC")
    assert u32(legacy, 40) == 1  # PCAT_COMPAT
    (override,) = [e for kind, e in madt_entries(legacy) if kind == 2]
    assert override == bytes([2, 10, 0, 0]) + struct.pack("<IH", 2, 0)


def test_madt_validation() -> None:
    for bad in (
        dict(apic_ids=()),
        dict(apic_ids=(0, 0)),
        dict(apic_ids=(255,)),
        dict(overrides=(InterruptOverride(16, 2),)),
        dict(overrides=(InterruptOverride(9, 9, flags=0b10),)),
    ):
        with pytest.raises(AcpiError):
            MadtConfig(**bad)  # type: ignore[arg-type]
    custom = build_madt(MadtConfig(apic_ids=(0, 4), ioapic_id=8, ioapic_gsi_base=24))
    entries = madt_entries(custom)
    assert [e[3] for kind, e in entries if kind == 0] == [0, 4]
    (ioapic,) = [e for kind, e in entries if kind == 1]
    assert ioapic[2] == 8 and u32(ioapic, 8) == 24


def test_sdt_rejects_bad_signature() -> None:
    with pytest.raises(AcpiError):
        sdt("FACPX", 1, b"")


# --- ACPICA's view -------------------------------------------------------------------------------------------


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def disassemble(tmp_path: Path, blob: AcpiBlob) -> dict[str, str]:
    """Write each table as <sig>.dat (acpixtract's names) and return iasl's .dsl text per signature."""
    names = {"FACP": "facp", "APIC": "apic", "DSDT": "dsdt", "XSDT": "xsdt"}
    listings = {}
    for signature, stem in names.items():
        (tmp_path / f"{stem}.dat").write_bytes(blob.table(signature))
        output = run(["iasl", "-d", f"{stem}.dat"], tmp_path)
        assert not re.search(r"\b(Error|Warning)\b", output), output
        listings[signature] = (tmp_path / f"{stem}.dsl").read_text()
        assert "**** ACPI table terminates in the middle of a data structure!" not in listings[signature]
        assert "Invalid" not in listings[signature]
    return listings


def squash(text: str) -> str:
    """Disassembly with comments removed and whitespace collapsed, for order-preserving substring checks."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r" \)", ")", re.sub(r"\s+", " ", text))


@needs_iasl
def test_iasl_disassembles_dsdt_with_expected_devices(tmp_path: Path) -> None:
    dsl = squash(disassemble(tmp_path, microvm_blob())["DSDT"])
    assert 'DefinitionBlock ("", "DSDT", 2, "PYEMU ", "PYEMUVM ", 0x00000001)' in dsl
    assert (
        'Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, Zero) Name (_CRS, ResourceTemplate () '
        "{ IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08,) Interrupt (ResourceConsumer, Edge, ActiveHigh, "
        "Exclusive, ,,) { 0x00000004, } }) }"
    ) in dsl
    assert (
        'Device (GED) { Name (_HID, "ACPI0013") Name (_UID, Zero) Name (_CRS, ResourceTemplate () '
        "{ Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,,) { 0x00000017, } }) "
        "OperationRegion (EREG, SystemMemory, 0xFEA10000, 0x04) "
        "Field (EREG, DWordAcc, NoLock, WriteAsZeros) { ESEL, 32 } "
        "Method (_EVT, 1, Serialized) { Local0 = ESEL If (((Local0 & One) == One)) "
        "{ Notify (\\_SB.PWRB, 0x80) } } }"
    ) in dsl
    assert 'Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) Name (_UID, Zero) }' in dsl
    for uid, (base, gsi, trigger) in enumerate(
        ((0xFEB00000, 16, "Level"), (0xFEB00200, 17, "Level"), (0xFEB00400, 18, "Edge"))
    ):
        uid_text = {0: "Zero", 1: "One"}.get(uid, f"0x{uid:02X}")
        assert (
            f'Device (VR{uid:02d}) {{ Name (_HID, "LNRO0005") Name (_UID, {uid_text}) Name (_CCA, One) '
            f"Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, 0x{base:08X}, 0x00000200,) "
            f"Interrupt (ResourceConsumer, {trigger}, ActiveHigh, Exclusive, ,,) {{ 0x{gsi:08X}, }} }}) }}"
        ) in dsl
    assert "Name (\\_S5, Package (0x04) { 0x05, Zero, Zero, Zero })" in dsl


@needs_iasl
def test_iasl_sees_legacy_irq_with_pic(tmp_path: Path) -> None:
    blob = microvm_blob(pic=True, serial_ports=(SerialPortInfo(), SerialPortInfo("COM2", 1, 0x2F8, 3)))
    dsl = squash(disassemble(tmp_path, blob)["DSDT"])
    assert "IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08,) IRQNoFlags () {4}" in dsl
    assert 'Device (COM2) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One)' in dsl
    assert "IO (Decode16, 0x02F8, 0x02F8, 0x01, 0x08,) IRQNoFlags () {3}" in dsl


@needs_iasl
def test_iasl_decodes_fadt_madt_xsdt(tmp_path: Path) -> None:
    blob = microvm_blob(pit=True, pic=True)
    listings = disassemble(tmp_path, blob)
    fadt = listings["FACP"]

    def field(name: str, text: str = fadt) -> str:
        match = re.search(rf"{re.escape(name)} : (\S+)", text)
        assert match, name
        return match.group(1)

    assert field("Revision") == "06" and field("FADT Minor Revision") == "03"
    assert field("Hardware Reduced (V5)") == "1"
    assert field("Reset Register Supported (V2)") == "1"
    assert f"{int(field('Value to cause reset'), 16):#x}" == f"{ged.RESET_VALUE:#x}"
    assert int(field("DSDT Address"), 16) == blob.tables["DSDT"]
    sleep = re.search(r"Sleep Control Register : .*?Address : (\w+)", fadt, re.S)
    status = re.search(r"Sleep Status Register : .*?Address : (\w+)", fadt, re.S)
    reset = re.search(r"Reset Register : .*?Address : (\w+)", fadt, re.S)
    assert sleep and status and reset
    assert int(sleep.group(1), 16) == 0xFEA10000 + ged.SLEEP_CONTROL
    assert int(status.group(1), 16) == 0xFEA10000 + ged.SLEEP_STATUS
    assert int(reset.group(1), 16) == 0xFEA10000 + ged.RESET
    assert field("Hypervisor ID") == "000000554D455950"  # "PYEMU" little-endian

    madt = listings["APIC"]
    assert field("Local Apic Address", madt) == "FEE00000"
    assert field("PC-AT Compatibility", madt) == "1"
    assert madt.count("[Processor Local APIC]") == 2
    assert re.search(r"\[I/O APIC\].*?Address : FEC00000.*?Interrupt : 00000000", madt, re.S)
    assert re.search(r"\[Interrupt Source Override\].*?Source : 00.*?Interrupt : 00000002", madt, re.S)
    assert re.search(r"\[Local APIC NMI\].*?Processor ID : FF.*?Interrupt Input LINT : 01", madt, re.S)

    xsdt = listings["XSDT"]
    addresses = [int(a, 16) for a in re.findall(r"ACPI Table Address\s+\d+ : (\w+)", xsdt)]
    assert addresses == [blob.tables["FACP"], blob.tables["APIC"]]


@needs_iasl
def test_dsdt_survives_disassemble_recompile_byte_for_byte(tmp_path: Path) -> None:
    blob = microvm_blob(pic=True)
    disassemble(tmp_path, blob)
    # -on: keep name paths as written (iasl would otherwise shorten \_SB.PWRB to a relative path).
    run(["iasl", "-on", "-p", "recompiled", "dsdt.dsl"], tmp_path)
    recompiled = (tmp_path / "recompiled.aml").read_bytes()
    assert recompiled[36:] == blob.table("DSDT")[36:]  # AML body (the header names iasl as creator)


ORACLE_ASL = r"""
DefinitionBlock ("", "SSDT", 2, "PYEMU ", "PYEMUVM ", 1)
{
    Scope (\_SB)
    {
        Device (TST0)
        {
            Name (_HID, EisaId ("PNP0C02"))
            Name (NAM, "pyemu")
            Name (BIG, 0x123456789A)
            Name (PKG, Package () { One, "two", Ones })
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x0510, 0x0510, 0x01, 0x0C)
                QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                    0x0, 0x100000000, 0x1FFFFFFFF, 0x0, 0x100000000)
            })
            OperationRegion (REGS, SystemIO, 0x0402, 0x10)
            Field (REGS, ByteAcc, Lock, Preserve)
            {
                DATA, 8,
                Offset (0x04),
                CTRL, 8,
                , 3,
                FLAG, 1
            }
            Method (TEST, 2, NotSerialized)
            {
                If (LAnd (LEqual (Arg0, 0x10), LNot (Arg1)))
                {
                    Or (DATA, 0x80, CTRL)
                    Return (^^TST0.CTRL)
                }
                Else
                {
                    Store (And (Arg1, 0xFFFF), Local2)
                    Return (Local2)
                }
            }
        }
    }
}
"""


def oracle_aml() -> bytes:
    return aml.scope(
        "\\_SB",
        aml.device(
            "TST0",
            aml.name("_HID", aml.eisaid("PNP0C02")),
            aml.name("NAM", "pyemu"),
            aml.name("BIG", 0x123456789A),
            aml.name("PKG", aml.package(1, "two", aml.ONES)),
            aml.name(
                "_CRS",
                resource_template(
                    io(0x510, 0x510, 1, 0x0C),
                    qword_memory(1 << 32, (2 << 32) - 1, 1 << 32),
                ),
            ),
            aml.operation_region("REGS", aml.RegionSpace.SYSTEM_IO, 0x402, 0x10),
            aml.field(
                "REGS",
                FieldUnit("DATA", 8),
                FieldOffset(4),
                FieldUnit("CTRL", 8),
                FieldReserved(3),
                FieldUnit("FLAG", 1),
                access=aml.AccessType.BYTE,
                lock=True,
            ),
            aml.method(
                "TEST",
                2,
                aml.if_(
                    aml.land(aml.lequal(aml.arg(0), 0x10), aml.lnot(aml.arg(1))),
                    aml.or_(aml.name_ref("DATA"), 0x80, "CTRL"),
                    aml.return_(aml.name_ref("^^TST0.CTRL")),
                ),
                aml.else_(
                    aml.store(aml.and_(aml.arg(1), 0xFFFF), aml.LOCAL2),
                    aml.return_(aml.LOCAL2),
                ),
            ),
        ),
    )


@needs_iasl
def test_builder_matches_iasl_compiling_the_same_asl(tmp_path: Path) -> None:
    (tmp_path / "oracle.asl").write_text(ORACLE_ASL)
    output = run(["iasl", "-on", "-p", "oracle", "oracle.asl"], tmp_path)
    assert "0 Errors" in output
    compiled = (tmp_path / "oracle.aml").read_bytes()
    assert compiled[36:] == oracle_aml()


GED_PROBE_ASL = r"""
DefinitionBlock ("", "SSDT", 2, "PYEMU ", "PROBE", 1)
{
    External (\_SB.GED.ESEL, FieldUnitObj)
    External (\_SB.GED._EVT, MethodObj)
    Method (PWR, 0) { \_SB.GED.ESEL = 0x01  \_SB.GED._EVT (0x17) }
    Method (OTHR, 0) { \_SB.GED.ESEL = 0x02  \_SB.GED._EVT (0x17) }
}
"""


@pytest.fixture
def acpica_namespace(tmp_path: Path) -> Path:
    """A directory with our DSDT/FADT/MADT and the probe SSDT, ready for acpiexec."""
    blob = microvm_blob()
    (tmp_path / "dsdt.dat").write_bytes(blob.table("DSDT"))
    (tmp_path / "facp.dat").write_bytes(blob.table("FACP"))
    (tmp_path / "apic.dat").write_bytes(blob.table("APIC"))
    (tmp_path / "probe.asl").write_text(GED_PROBE_ASL)
    run(["iasl", "probe.asl"], tmp_path)
    return tmp_path


def acpiexec(directory: Path, command: str) -> str:
    """Run one batch command. One per process: acpiexec delivers Notify on a separate thread, so its
    message may come after the output of a following command."""
    output = run(["acpiexec", "-b", command, "dsdt.dat", "facp.dat", "apic.dat", "probe.aml"], directory)
    assert "Exception" not in output and "Error" not in output, output
    return output


@needs_iasl
@needs_acpiexec
@pytest.mark.parametrize("method, notified", [("\\PWR", True), ("\\OTHR", False)])
def test_acpica_runs_ged_event_method(acpica_namespace: Path, method: str, notified: bool) -> None:
    """ACPICA's interpreter (simulated memory behind EREG) runs _EVT: only bit 0 notifies PWRB with 0x80."""
    output = acpiexec(acpica_namespace, f"evaluate {method}")
    assert f"Evaluating {method}" in output
    assert bool(re.search(r"Notify on \[PWRB\].*Value 0x80", output)) == notified, output


@needs_iasl
@needs_acpiexec
def test_acpica_evaluates_s5(acpica_namespace: Path) -> None:
    output = acpiexec(acpica_namespace, "evaluate \\_S5")
    assert re.search(r"Contains 4 Elements:\s+\[Integer\] = 0000000000000005", output), output


@needs_iasl
@pytest.mark.parametrize("pic", [False, True])
def test_iasl_sees_the_cmos_rtc_when_the_board_has_one(tmp_path: Path, pic: bool) -> None:
    dsl = squash(disassemble(tmp_path, microvm_blob(rtc=True, pic=pic))["DSDT"])
    irq = "IRQNoFlags () {8}" if pic else \
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,,) { 0x00000008, }"
    assert (f'Device (RTC) {{ Name (_HID, EisaId ("PNP0B00")) Name (_CRS, ResourceTemplate () '
            f"{{ IO (Decode16, 0x0070, 0x0070, 0x01, 0x02,) {irq} }}) }}") in dsl
    no_rtc = squash(disassemble(tmp_path, microvm_blob(rtc=False, pic=pic))["DSDT"])
    assert "PNP0B00" not in no_rtc
