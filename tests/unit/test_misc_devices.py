"""isa-debug-exit, the 0x80 debug port and the minimal i8042."""

from __future__ import annotations

import io

import pytest

from pyemu.errors import ConfigError
from pyemu.hw.core.irq import IrqLine
from pyemu.hw.misc import i8042 as k
from pyemu.hw.misc.debug_exit import DebugExitConfig, IsaDebugExit, exit_status
from pyemu.hw.misc.debugport import DebugPort, describe_code
from pyemu.hw.misc.i8042 import I8042
from pyemu.system import log
from pyemu.system.bus import pio_bus
from pyemu.system.timers import TimerQueue


# -- isa-debug-exit ------------------------------------------------------------------------------------------
def test_debug_exit_status_is_value_shifted_with_low_bit_set() -> None:
    assert exit_status(0) == 1
    assert exit_status(0x31) == 0x63
    statuses: list[int] = []
    config = DebugExitConfig.from_properties({"iobase": "0xf4", "iosize": "4"})
    assert (config.iobase, config.iosize) == (0xF4, 4)
    device = IsaDebugExit(statuses.append, config)
    bus = pio_bus()
    device.register(bus)
    bus.write(0xF4, 1, 0x10)
    bus.write(0xF6, 2, 0x1_0003)  # any offset in the range; the value is masked to the access size
    bus.write(0xF4, 4, 0x7FFF_FFFF)
    assert statuses == [0x21, 0x07, 0xFFFF_FFFF]
    assert bus.read(0xF4, 1) == 0xFF and bus.read(0xF4, 4) == 0xFFFF_FFFF
    assert bus.read(0xF8, 1) == 0xFF  # outside the range: unassigned


def test_debug_exit_defaults_and_bad_properties() -> None:
    assert DebugExitConfig() == DebugExitConfig(0x501, 2)
    with pytest.raises(ConfigError, match="iosize must be 1, 2 or 4"):
        DebugExitConfig.from_properties({"iosize": "3"})
    with pytest.raises(ConfigError, match="unknown property 'size'"):
        DebugExitConfig.from_properties({"size": "4"})
    with pytest.raises(ConfigError, match="expects a number"):
        DebugExitConfig.from_properties({"iobase": "port80"})
    with pytest.raises(ConfigError, match="does not fit"):
        DebugExitConfig(iobase=0xFFFF, iosize=4)


# -- debug port 0x80 -----------------------------------------------------------------------------------------
def test_debug_port_records_codes_with_time_since_start(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [5_000]
    timers = TimerQueue(clock=lambda: now[0])
    stream = io.StringIO()
    monkeypatch.setattr(log._state, "stream", stream)
    monkeypatch.setattr(log._state, "enabled", frozenset({"boot"}))
    port = DebugPort(timers, history=3)
    bus = pio_bus()
    port.register(bus)
    for delay, code in ((1_000, 0x01), (2_000_000, 0x41), (3_000, 0x61), (4_000, 0x99)):
        now[0] += delay
        bus.write(0x80, 1, code)
    assert port.history == [(2_001_000, 0x41), (2_004_000, 0x61), (2_008_000, 0x99)]  # bounded
    assert bus.read(0x80, 1) == 0x99
    text = stream.getvalue()
    assert "kernel code 0x41 at 0.002001 s" in text
    assert "custom code 0x99" in text
    assert text.count("boot:") == 4
    assert describe_code(0x10) == "firmware" and describe_code(0x25) == "bootloader"
    state = port.state()
    other = DebugPort(timers)
    other.from_state(state)
    assert other.history == port.history and other.read(0, 1) == 0x99


def test_debug_port_silent_unless_boot_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(log._state, "stream", stream)
    monkeypatch.setattr(log._state, "enabled", frozenset())
    port = DebugPort(TimerQueue(clock=lambda: 0))
    port.write(0, 1, 0x1234)
    assert port.history == [(0, 0x34)]
    assert stream.getvalue() == ""


# -- i8042 -------------------------------------------------------------------------------------------------
class Kbc:
    def __init__(self, with_irq: bool = True) -> None:
        self.resets = 0
        self.levels: list[int] = []
        irq = IrqLine(self.levels.append, "irq1") if with_irq else None
        self.dev = I8042(self._reset, irq)
        self.levels.clear()
        self.bus = pio_bus()
        self.dev.register(self.bus)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.bus.read(0x64, 1)

    def command(self, cmd: int, *params: int, replies: int = 0) -> list[int]:
        """Linux's i8042_command(): command, parameters, then wait for each reply byte."""
        assert not self.status() & k.STR_IBF
        self.bus.write(0x64, 1, cmd)
        for param in params:
            assert not self.status() & k.STR_IBF
            self.bus.write(0x60, 1, param)
        out = []
        for _ in range(replies):
            assert self.status() & k.STR_OBF, f"no reply to {cmd:#x}"
            out.append(self.bus.read(0x60, 1))
        return out


def test_reset_command_pulses_reset() -> None:
    kbc = Kbc()
    kbc.bus.write(0x64, 1, 0xFE)  # what reboot=k does
    assert kbc.resets == 1
    kbc.bus.write(0x64, 1, 0xFF)  # pulse nothing
    assert kbc.resets == 1


def test_output_port_write_with_bit0_clear_resets() -> None:
    kbc = Kbc()
    kbc.command(0xD1, 0x03)
    assert kbc.resets == 0
    assert kbc.command(0xD0, replies=1) == [0x03]
    kbc.command(0xD1, 0x02)
    assert kbc.resets == 1


def test_linux_probe_sequence_finds_a_controller_without_aux_quickly() -> None:
    kbc = Kbc()
    # i8042_controller_check(): flush finds no stale data.
    assert not kbc.status() & k.STR_OBF
    assert kbc.status() & k.STR_UNLOCKED  # no "Keylock active" warning
    # i8042_controller_selftest() (reset=always).
    assert kbc.command(0xAA, replies=1) == [0x55]
    # i8042_controller_init(): two identical CTR reads, then write it back modified.
    ctr = kbc.command(0x20, replies=1)[0]
    assert kbc.command(0x20, replies=1)[0] == ctr
    ctr = (ctr | k.CTR_KBDDIS) & ~k.CTR_KBDINT
    kbc.command(0x60, ctr)
    assert kbc.command(0x20, replies=1) == [ctr]
    # i8042_check_aux(): loop answers without AUXDATA, the AUX test reports an error -> no AUX port.
    assert kbc.command(0xD3, 0x5A, replies=0) == []
    assert kbc.status() & k.STR_OBF and not kbc.status() & k.STR_AUXDATA  # "auxerr", byte left unread
    aux_test = kbc.command(0xA9, replies=1)[0]  # the reply replaces the unread loop byte
    assert aux_test not in (0x00, 0xFA, 0xFF)
    # keyboard interface test, enable/disable
    assert kbc.command(0xAB, replies=1) == [0x00]
    kbc.command(0xAE)
    assert not kbc.command(0x20, replies=1)[0] & k.CTR_KBDDIS
    kbc.command(0xAD)
    assert kbc.command(0x20, replies=1)[0] & k.CTR_KBDDIS
    assert kbc.resets == 0


def test_bytes_to_the_absent_keyboard_time_out_with_irq1() -> None:
    kbc = Kbc()
    ctr = kbc.command(0x20, replies=1)[0]
    kbc.command(0x60, ctr | k.CTR_KBDINT)
    kbc.levels.clear()
    kbc.bus.write(0x60, 1, 0xF2)  # atkbd GETID
    status = kbc.status()
    assert status & k.STR_OBF and status & k.STR_TIMEOUT
    assert kbc.levels == [1]
    assert kbc.bus.read(0x60, 1) == 0xFE
    assert kbc.levels == [1, 0]
    assert not kbc.status() & (k.STR_OBF | k.STR_TIMEOUT)


def test_no_irq_when_keyboard_interrupt_disabled() -> None:
    kbc = Kbc()
    kbc.command(0x60, 0x00)
    kbc.command(0x20, replies=1)
    assert kbc.levels == []


def test_i8042_state_round_trip_and_reset() -> None:
    kbc = Kbc(with_irq=False)
    kbc.command(0x60, 0x47)
    kbc.bus.write(0x64, 1, 0xD1)  # a command waiting for its parameter survives a snapshot
    saved = kbc.dev.state()
    other = I8042(lambda: None)
    other.from_state(saved)
    assert other.state() == saved
    other.write_data(0x00)
    assert other.state().output_port == 0x00
    other.reset()
    assert other.state() == k.I8042State()
    assert kbc.bus.read(0x64, 2) >> 8 == 0xFF  # wide reads: undriven upper byte
