"""The GED / sleep / reset register block, driven the way Linux's ACPICA drives it."""

from __future__ import annotations

import pytest

from pyemu.hw.acpi import ged
from pyemu.hw.acpi.errors import AcpiError
from pyemu.hw.acpi.ged import GedDevice, GedLayout, GedState
from pyemu.hw.core.irq import IrqLine
from pyemu.system.bus import mmio_bus


class Board:
    """A fake board: records the interrupt line's levels and the power-off/reset requests."""

    def __init__(self, *, level_triggered: bool = True) -> None:
        self.levels: list[int] = []
        self.poweroffs = 0
        self.resets = 0
        self.irq = IrqLine(self.levels.append, "ged")
        self.ged = GedDevice(
            self.irq,
            on_poweroff=self.poweroff,
            on_reset=self.reset,
            layout=GedLayout(level_triggered=level_triggered),
        )

    def poweroff(self) -> None:
        self.poweroffs += 1

    def reset(self) -> None:
        self.resets += 1


def test_power_button_raises_level_until_event_selector_is_read() -> None:
    board = Board()
    board.ged.press_power_button()
    assert board.irq.level == 1 and board.levels == [1]
    board.ged.press_power_button()  # still pending: no new edge, line stays high
    assert board.levels == [1]
    assert board.ged.read(ged.EVENT_SELECTOR, 4) == ged.EVENT_POWER_BUTTON
    assert board.irq.level == 0 and board.levels == [1, 0]
    assert board.ged.read(ged.EVENT_SELECTOR, 4) == 0  # read clears
    assert board.levels == [1, 0]


def test_edge_mode_pulses_once_per_event() -> None:
    board = Board(level_triggered=False)
    board.ged.press_power_button()
    board.ged.press_power_button()
    assert board.levels == [1, 0, 1, 0]
    assert board.ged.read(ged.EVENT_SELECTOR, 4) == ged.EVENT_POWER_BUTTON
    assert board.levels == [1, 0, 1, 0]


def test_events_accumulate_and_partial_reads_do_not_clear() -> None:
    board = Board()
    board.ged.raise_event(0b100)
    board.ged.press_power_button()
    board.ged.raise_event(0)  # nothing to signal
    assert board.ged.read(ged.EVENT_SELECTOR, 1) == 0  # unsupported width: defined 0, nothing lost
    assert board.ged.read(ged.EVENT_SELECTOR, 4) == 0b101


def test_s5_write_powers_off_like_acpica() -> None:
    """ACPICA's extended sleep: write WAK_STS to the status register, then SLP_TYP<<2 | SLP_EN."""
    board = Board()
    board.ged.write(ged.SLEEP_STATUS, 1, ged.WAK_STS)
    board.ged.write(ged.SLEEP_CONTROL, 1, ged.SLEEP_TYPE_S5 << 2)  # SLP_EN clear: nothing happens
    assert board.poweroffs == 0
    board.ged.write(ged.SLEEP_CONTROL, 1, (ged.SLEEP_TYPE_S5 << 2) | ged.SLP_EN)
    assert board.poweroffs == 1
    assert 0x34 == (ged.SLEEP_TYPE_S5 << 2) | ged.SLP_EN  # the byte Linux writes


def test_other_sleep_types_wake_immediately_instead_of_hanging_the_guest() -> None:
    board = Board()
    assert board.ged.read(ged.SLEEP_STATUS, 1) == 0
    board.ged.write(ged.SLEEP_CONTROL, 1, (3 << 2) | ged.SLP_EN)  # S3: not offered
    assert board.poweroffs == 0
    assert board.ged.read(ged.SLEEP_STATUS, 1) == ged.WAK_STS
    board.ged.write(ged.SLEEP_STATUS, 1, ged.WAK_STS)  # write 1 to clear
    assert board.ged.read(ged.SLEEP_STATUS, 1) == 0


def test_reset_register() -> None:
    board = Board()
    board.ged.write(ged.RESET, 1, 0x01)
    assert board.resets == 0
    board.ged.write(ged.RESET, 1, ged.RESET_VALUE)
    assert board.resets == 1
    board.ged.write(ged.RESET, 2, ged.RESET_VALUE)  # wrong width: ignored
    assert board.resets == 1


def test_unknown_and_write_only_registers_read_zero() -> None:
    board = Board()
    for offset, size in ((ged.SLEEP_CONTROL, 1), (ged.RESET, 1), (0x10, 4), (0xFFC, 4), (ged.SLEEP_STATUS, 4)):
        assert board.ged.read(offset, size) == 0
    board.ged.write(ged.EVENT_SELECTOR, 4, 0xFFFFFFFF)  # read-only
    board.ged.write(0x100, 1, 0xFF)
    assert board.poweroffs == board.resets == 0 and board.levels == []


def test_state_round_trip_drives_the_line() -> None:
    board = Board()
    board.ged.press_power_button()
    board.ged.write(ged.SLEEP_CONTROL, 1, (1 << 2) | ged.SLP_EN)  # sets WAK_STS
    saved = board.ged.state()
    assert saved == GedState(pending_events=ged.EVENT_POWER_BUTTON, sleep_status=ged.WAK_STS)

    fresh = Board()
    fresh.ged.from_state(saved)
    assert fresh.irq.level == 1
    assert fresh.ged.read(ged.SLEEP_STATUS, 1) == ged.WAK_STS
    assert fresh.ged.read(ged.EVENT_SELECTOR, 4) == ged.EVENT_POWER_BUTTON
    assert fresh.irq.level == 0


def test_on_the_mmio_bus_at_the_addresses_the_fadt_names() -> None:
    board = Board()
    layout = board.ged.layout
    bus = mmio_bus()
    bus.register(layout.base, layout.size, board.ged, "ged")
    board.ged.press_power_button()
    assert bus.read(layout.event_selector_address, 4) == ged.EVENT_POWER_BUTTON
    bus.write(layout.reset_address, 1, ged.RESET_VALUE)
    bus.write(layout.sleep_control_address, 1, 0x34)
    assert (board.resets, board.poweroffs) == (1, 1)
    assert layout.sleep_control_address == ged.DEFAULT_GED_BASE + ged.SLEEP_CONTROL


@pytest.mark.parametrize("bad", [dict(base=0xFEA00004), dict(base=0x1_0000_0000), dict(base=0), dict(gsi=-1)])
def test_layout_validation(bad: dict[str, int]) -> None:
    with pytest.raises(AcpiError):
        GedLayout(**bad)  # type: ignore[arg-type]
