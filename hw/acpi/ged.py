"""The hardware-reduced ACPI platform device: Generic Event Device, sleep registers and reset register.

Why one small MMIO block: a hardware-reduced ACPI platform (FADT flag HW_REDUCED_ACPI) has no PM1 event or
control blocks, no SCI and no GPE blocks. Platform events reach the OS through a Generic Event Device
(``ACPI0013``: an interrupt plus an ``_EVT`` method that asks this device which event fired), and power-off
and reset go through the FADT's SLEEP_CONTROL_REG, SLEEP_STATUS_REG and RESET_REG. QEMU's microvm uses the
same scheme. pyemu puts all of them in one 4 KiB MMIO page (so it can be mapped on its own under either
accelerator); the DSDT (:func:`pyemu.hw.acpi.dsdt.ged_device`) and the FADT are generated from the
constants below, so the tables and the model cannot disagree.

Register layout (offsets from :attr:`GedLayout.base`; other offsets read 0 and ignore writes):

====== ===== ========================================================================================
offset width register
====== ===== ========================================================================================
0x00   32    EVENT_SELECTOR (read-only): pending event bits; a read returns and clears them.
             Bit 0 (:data:`EVENT_POWER_BUTTON`): power button pressed -> ``Notify (\\_SB.PWRB, 0x80)``.
0x04   8     SLEEP_CONTROL (write-only): bits 2-4 SLP_TYP, bit 5 SLP_EN. Writing SLP_EN with SLP_TYP 5
             (the value of the DSDT's ``_S5`` package) powers the machine off through ``on_poweroff()``.
0x05   8     SLEEP_STATUS: bit 7 WAK_STS, write 1 to clear.
0x06   8     RESET (write-only): writing :data:`RESET_VALUE` resets the machine through ``on_reset()``.
====== ===== ========================================================================================

The event interrupt is level-triggered by default: the line stays high while any event bit is pending and
drops when the guest's ``_EVT`` reads EVENT_SELECTOR, so no press is lost between the interrupt and the read.
With ``level_triggered=False`` the line is pulsed once per new event instead.

Threading: like every device model, the GED expects its caller to hold the machine lock (the exit
dispatcher does for guest accesses; the board must do so around :meth:`GedDevice.press_power_button`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from pyemu.hw.acpi.errors import AcpiError
from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.system import log

DEFAULT_GED_BASE = 0xFEA00000
"""Where QEMU's microvm puts its GED; a free spot below the IOAPIC/LAPIC pages on a PC memory map."""
DEFAULT_GED_GSI = 9
"""The ISA IRQ a PC uses for the SCI, which a hardware-reduced platform does not have."""

GED_MMIO_SIZE = 0x1000

EVENT_SELECTOR = 0x00
EVENT_SELECTOR_WIDTH = 4
SLEEP_CONTROL = 0x04
SLEEP_STATUS = 0x05
RESET = 0x06

EVENT_POWER_BUTTON = 1 << 0

SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7
SLP_EN = 1 << 5
WAK_STS = 1 << 7
SLEEP_TYPE_S5 = 5
"""SLP_TYP value for soft-off; the DSDT's ``_S5`` package carries it and Linux writes it back."""

RESET_VALUE = 0x06
"""Value that requests a reset; the same number that asks for a hard reset through the PC's port 0xCF9."""


@dataclass(frozen=True)
class GedLayout:
    """Where the GED block lives and how its interrupt is wired: shared by the model, FADT and DSDT."""

    base: int = DEFAULT_GED_BASE
    gsi: int = DEFAULT_GED_GSI
    level_triggered: bool = True

    def __post_init__(self) -> None:
        if self.base % GED_MMIO_SIZE or not 0 < self.base <= 0xFFFFFFFF - GED_MMIO_SIZE + 1:
            raise AcpiError(f"GED base {self.base:#x} must be a page-aligned address below 4 GiB")
        if not 0 <= self.gsi <= 0xFFFFFFFF:
            raise AcpiError(f"GED GSI {self.gsi} is out of range")

    @property
    def size(self) -> int:
        return GED_MMIO_SIZE

    @property
    def event_selector_address(self) -> int:
        return self.base + EVENT_SELECTOR

    @property
    def sleep_control_address(self) -> int:
        return self.base + SLEEP_CONTROL

    @property
    def sleep_status_address(self) -> int:
        return self.base + SLEEP_STATUS

    @property
    def reset_address(self) -> int:
        return self.base + RESET


@dataclass(frozen=True, kw_only=True)
class GedState(DeviceState):
    """The guest-visible state of the block (the layout and callbacks belong to the board)."""

    VERSION: ClassVar[int] = 1

    pending_events: int = 0
    sleep_status: int = 0


class GedDevice:
    """The register machine behind the GED page. See the module docstring for the layout.

    ``irq`` is the line to the GSI named in ``layout``; ``on_poweroff`` and ``on_reset`` are called when the
    guest asks for soft-off (S5) or a reset. They are called from the guest's register write, so they
    should request the run-state change rather than tear the machine down on the spot.
    """

    def __init__(
        self,
        irq: IrqLine,
        *,
        on_poweroff: Callable[[], None],
        on_reset: Callable[[], None],
        layout: GedLayout | None = None,
    ) -> None:
        self.layout = layout or GedLayout()
        self.irq = irq
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._pending = 0
        self._sleep_status = 0

    # --- host side -------------------------------------------------------------------------------------------

    def raise_event(self, events: int) -> None:
        """Latch ``events`` (EVENT_* bits) and interrupt the guest."""
        events &= 0xFFFFFFFF
        if not events:
            return
        self._pending |= events
        if self.layout.level_triggered:
            self._update_level()
        else:
            self.irq.pulse()

    def press_power_button(self) -> None:
        """What ``system_powerdown`` does: the guest sees a power-button press (ACPI notify 0x80)."""
        self.raise_event(EVENT_POWER_BUTTON)

    # --- guest side ------------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == EVENT_SELECTOR and size == EVENT_SELECTOR_WIDTH:
            events, self._pending = self._pending, 0
            if self.layout.level_triggered:
                self._update_level()
            return events
        if offset == SLEEP_STATUS and size == 1:
            return self._sleep_status
        if offset in (SLEEP_CONTROL, RESET) and size == 1:
            return 0  # write-only command registers
        self._bad_access("read", offset, size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1 and offset == SLEEP_CONTROL:
            self._sleep_control(value & 0xFF)
        elif size == 1 and offset == SLEEP_STATUS:
            if value & WAK_STS:
                self._sleep_status &= ~WAK_STS
        elif size == 1 and offset == RESET:
            if value & 0xFF == RESET_VALUE:
                self._on_reset()
            else:
                log.log("guest_errors", f"ged: reset register written with {value:#x}, not {RESET_VALUE:#x}")
        else:
            self._bad_access("write", offset, size)

    def _sleep_control(self, value: int) -> None:
        if not value & SLP_EN:
            return
        sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
        if sleep_type == SLEEP_TYPE_S5:
            self._on_poweroff()
            return
        # Only _S5 is advertised. Report an immediate wake so an OS polling WAK_STS does not spin forever.
        log.log("guest_errors", f"ged: sleep type {sleep_type} requested but only S5 (soft-off) exists")
        self._sleep_status |= WAK_STS

    def _update_level(self) -> None:
        level = 1 if self._pending else 0
        if level != self.irq.level:
            self.irq.set_level(level)

    def _bad_access(self, kind: str, offset: int, size: int) -> None:
        if log.enabled("guest_errors"):
            log.log("guest_errors", f"ged: unsupported {size}-byte {kind} at offset {offset:#x}")

    # --- state -----------------------------------------------------------------------------------------------

    def state(self) -> GedState:
        """Pending events and the sleep status register now."""
        return GedState(pending_events=self._pending, sleep_status=self._sleep_status)

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state; a level-triggered line is driven to match the pending events. Checked first:
        on :class:`StateError` nothing changes."""
        s = check_state("ged", state, GedState)
        check_range("ged", "pending_events", s.pending_events, 0, 0xFFFFFFFF)
        check_range("ged", "sleep_status", s.sleep_status, 0, WAK_STS)
        if s.sleep_status & ~WAK_STS:
            raise StateError("ged", f"sleep_status={s.sleep_status:#x} sets bits other than WAK_STS")
        self._pending = s.pending_events
        self._sleep_status = s.sleep_status
        if self.layout.level_triggered:
            self._update_level()
