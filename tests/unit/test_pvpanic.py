"""pvpanic: the guest reports a panic through one I/O port; the device hands the event to the board."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyemu.errors import ConfigError
from pyemu.hw.core.state import StateError
from pyemu.hw.misc.debug_exit import DebugExitState
from pyemu.hw.misc.pvpanic import ACPI_HID, DEFAULT_IOPORT, PanicEvent, Pvpanic, PvpanicConfig, PvpanicState


def make(config: PvpanicConfig = PvpanicConfig()) -> tuple[Pvpanic, list[PanicEvent]]:
    events: list[PanicEvent] = []
    return Pvpanic(events.append, config), events


def test_reads_offer_the_supported_events() -> None:
    device, _ = make()
    assert device.read(0, 1) == 3
    assert make(PvpanicConfig(events=1))[0].read(0, 1) == 1


def test_writes_report_events_panicked_first() -> None:
    device, events = make()
    device.write(0, 1, 1)
    device.write(0, 1, 2)
    device.write(0, 1, 3)
    assert events == [PanicEvent.PANICKED, PanicEvent.CRASH_LOADED, PanicEvent.PANICKED, PanicEvent.CRASH_LOADED]


def test_events_not_offered_or_unknown_are_ignored() -> None:
    device, events = make(PvpanicConfig(events=int(PanicEvent.PANICKED)))
    device.write(0, 1, 2)
    device.write(0, 1, 0xFC)
    device.write(0, 1, 0)
    assert events == []


def test_config_from_properties_and_errors() -> None:
    assert PvpanicConfig.from_properties({"ioport": "0x600", "events": "1"}) == PvpanicConfig(0x600, 1)
    assert PvpanicConfig.from_properties({}).ioport == DEFAULT_IOPORT
    with pytest.raises(ConfigError, match="unknown property 'iobase'"):
        PvpanicConfig.from_properties({"iobase": "1"})
    with pytest.raises(ConfigError, match="expects a number"):
        PvpanicConfig.from_properties({"ioport": "port"})
    with pytest.raises(ConfigError, match="I/O space"):
        PvpanicConfig(ioport=0x10000)
    with pytest.raises(ConfigError, match="unknown bits"):
        PvpanicConfig(events=4)


def test_state_round_trip_and_validation() -> None:
    device, _ = make()
    device.from_state(device.state())
    with pytest.raises(StateError):
        device.from_state(DebugExitState())


def test_aml_names_the_device_and_its_port() -> None:
    aml = make(PvpanicConfig(ioport=0x505))[0].aml()
    assert ACPI_HID.encode() in aml and b"PEVT" in aml
    # IO (Decode16, 0x0505, 0x0505, 0x01, 0x01): descriptor 0x47, decode 1, min, max, align, length
    assert bytes([0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]) in aml
    assert PvpanicState().version == 1


@pytest.mark.skipif(shutil.which("iasl") is None, reason="acpica-tools (iasl) not installed")
def test_dsdt_with_pvpanic_disassembles_cleanly(tmp_path: Path) -> None:
    """ACPICA's own disassembler reads the device as QEMU describes it: QEMU0001 with I/O port 0x505."""
    from pyemu.hw.acpi.dsdt import build_dsdt_aml
    from pyemu.hw.acpi.ged import GedLayout
    from pyemu.hw.acpi.tables import build_dsdt

    aml = build_dsdt_aml(ged_layout=GedLayout(base=0xFEA00000, gsi=9), device_aml=(make()[0].aml(),))
    (tmp_path / "dsdt.dat").write_bytes(build_dsdt(aml))
    run = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    listing = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, "QEMU0001")' in listing
    assert "IO (Decode16,\n" in listing and "0x0505," in listing
