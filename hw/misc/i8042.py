"""A minimal i8042 keyboard controller with no keyboard and no mouse attached.

Why have one at all: ``reboot=k`` (Linux's keyboard-controller reset, what Firecracker's guests use)
writes command 0xFE to port 0x64 to pulse the CPU reset line, and Linux's i8042 driver, if it probes,
must find a controller that answers its commands promptly instead of waiting out half-second timeouts on
a slow software CPU. So the controller answers the commands Linux sends (read/write the command byte,
self tests, port enable/disable, output-port write) and reports the absent devices quickly:

* AUX: the loopback command (0xD3) echoes its byte as keyboard data (Linux then sees no AUX port) and
  the AUX interface test (0xA9) reports "clock line stuck high";
* keyboard: a byte sent to the keyboard is answered with 0xFE and the status TIMEOUT bit, the AT
  controller's "device did not respond", which makes atkbd give up at once (needs ``kbd_irq`` wired).

Ports 0x60 (data) and 0x64 (status/command) are not contiguous, so :meth:`I8042.register` places two
small adapters. Port 0x61 (system control port B) belongs to the PIT/speaker model, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from pyemu.hw.core.irq import IrqLine
from pyemu.hw.core.state import DeviceState, StateError, check_range, check_state
from pyemu.system import log
from pyemu.system.bus import Bus

DATA_PORT = 0x60
COMMAND_PORT = 0x64

# Status register.
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04
STR_CMD = 0x08  # last write went to the command port
STR_UNLOCKED = 0x10  # keyboard not inhibited by the key lock
STR_AUXDATA = 0x20
STR_TIMEOUT = 0x40
STR_PARITY = 0x80

# Controller command byte ("CTR").
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYSFLAG = 0x04
CTR_IGNKEYLOCK = 0x08
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

# Output port.
OUT_RESET = 0x01  # active low: writing 0 resets the CPU
OUT_A20 = 0x02

INITIAL_CTR = CTR_KBDINT | CTR_SYSFLAG | CTR_AUXDIS | CTR_XLATE
INITIAL_OUTPUT_PORT = OUT_RESET | OUT_A20

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
INTERFACE_CLOCK_STUCK_HIGH = 0x02
KBD_NO_RESPONSE = 0xFE

_DATA_COMMANDS = (0x60, 0xD1, 0xD2, 0xD3, 0xD4)  # commands whose parameter follows on the data port


#: The status bits the controller stores; OBF is derived from the output buffer, IBF is never set.
_STORED_STATUS = STR_SYS | STR_CMD | STR_UNLOCKED | STR_AUXDATA | STR_TIMEOUT


def _takes_data(command: int) -> bool:
    """Whether ``command`` waits for a parameter byte on the data port (what ``pending_command`` can hold)."""
    return 0x60 <= command <= 0x7F or command in _DATA_COMMANDS


@dataclass(frozen=True, kw_only=True)
class I8042State(DeviceState):
    """The controller as data; the defaults are its power-on state."""

    VERSION: ClassVar[int] = 1

    ctr: int = INITIAL_CTR
    output_port: int = INITIAL_OUTPUT_PORT
    status: int = STR_SYS | STR_UNLOCKED  # the stored flags: SYS, CMD, AUXDATA, TIMEOUT
    output: int | None = None  # the one-byte output buffer (None: empty)
    last_output: int = 0
    pending_command: int | None = None  # a command waiting for its data byte


class I8042:
    """``on_reset()`` is called under the machine lock for every reset pulse (Linux sends 0xFE up to
    ten times); it should request a machine reset and return. ``kbd_irq`` is ISA IRQ 1 (optional)."""

    def __init__(self, on_reset: Callable[[], None], kbd_irq: IrqLine | None = None) -> None:
        self.on_reset = on_reset
        self.kbd_irq = kbd_irq
        self._irq_level = 0
        self.resets_requested = 0
        self._ctr = self._output_port = self._status = self._last_output = 0
        self._output: int | None = None
        self._pending_command: int | None = None
        self._load(I8042State())

    # -- registers --------------------------------------------------------------------------------------
    def read_status(self) -> int:
        status = self._status & (STR_SYS | STR_CMD | STR_AUXDATA | STR_TIMEOUT) | STR_UNLOCKED
        if self._output is not None:
            status |= STR_OBF
        return status

    def read_data(self) -> int:
        if self._output is not None:
            self._last_output = self._output
            self._output = None
            self._status &= ~(STR_AUXDATA | STR_TIMEOUT)
            self._update_irq()
        return self._last_output

    def write_command(self, command: int) -> None:
        self._status |= STR_CMD
        self._pending_command = None
        if command == 0x20:
            self._respond(self._ctr)
        elif 0x21 <= command <= 0x3F:
            self._respond(0x00)  # internal RAM we do not model
        elif _takes_data(command):
            self._pending_command = command
        elif command == 0xA7:
            self._ctr |= CTR_AUXDIS
        elif command == 0xA8:
            self._ctr &= ~CTR_AUXDIS
        elif command == 0xA9:
            self._respond(INTERFACE_CLOCK_STUCK_HIGH)  # no AUX port fitted
        elif command == 0xAA:
            self._status |= STR_SYS
            self._respond(SELF_TEST_OK)
        elif command == 0xAB:
            self._respond(INTERFACE_OK)
        elif command == 0xAD:
            self._ctr |= CTR_KBDDIS
        elif command == 0xAE:
            self._ctr &= ~CTR_KBDDIS
        elif command == 0xD0:
            self._respond(self._output_port)
        elif command == 0xDD:
            self._output_port &= ~OUT_A20
        elif command == 0xDF:
            self._output_port |= OUT_A20
        elif command == 0xE0:
            self._respond(0x00)  # test inputs: clock and data low
        elif 0xF0 <= command <= 0xFF:
            if not command & OUT_RESET:  # pulse output-port bits whose command bit is 0; bit 0 is reset
                self._request_reset()
        elif log.enabled("unimp"):
            log.log("unimp", f"i8042: command {command:#04x} not implemented")
        self._update_irq()

    def write_data(self, value: int) -> None:
        self._status &= ~STR_CMD
        command, self._pending_command = self._pending_command, None
        if command is None:
            self._respond(KBD_NO_RESPONSE, timeout=True)  # to the keyboard, which is absent
        elif command == 0x60:
            self._ctr = value & 0x7F
            self._status = (self._status & ~STR_SYS) | (STR_SYS if value & CTR_SYSFLAG else 0)
        elif command == 0xD1:
            self._output_port = value
            if not value & OUT_RESET:
                self._request_reset()
        elif command in (0xD2, 0xD3):
            # 0xD3 would loop through the AUX port; without one the byte comes back as keyboard data,
            # which tells Linux's i8042_check_aux() there is no AUX port without waiting.
            self._respond(value)
        # 0xD4 (to the AUX device) and internal RAM writes: nothing attached, nothing to store
        self._update_irq()

    # -- helpers ----------------------------------------------------------------------------------------
    def _respond(self, value: int, *, timeout: bool = False) -> None:
        """Put a byte in the output buffer (a controller reply replaces an unread byte)."""
        self._output = value & 0xFF
        self._status &= ~(STR_AUXDATA | STR_TIMEOUT)
        if timeout:
            self._status |= STR_TIMEOUT

    def _request_reset(self) -> None:
        self.resets_requested += 1
        self.on_reset()

    def _update_irq(self, force: bool = False) -> None:
        if self.kbd_irq is None:
            return
        level = int(self._output is not None and not self._status & STR_AUXDATA and bool(self._ctr & CTR_KBDINT))
        if force or level != self._irq_level:
            self._irq_level = level
            self.kbd_irq.set_level(level)

    # -- reset and state --------------------------------------------------------------------------------
    def reset(self) -> None:
        self._load(I8042State())
        self._update_irq(force=True)

    def state(self) -> I8042State:
        """The controller's registers and output buffer now."""
        return I8042State(ctr=self._ctr, output_port=self._output_port, status=self._status, output=self._output,
                          last_output=self._last_output, pending_command=self._pending_command)

    def from_state(self, state: DeviceState) -> None:
        """Load a saved state and drive IRQ1 to match. Checked first: on :class:`StateError` nothing changes."""
        s = check_state("i8042", state, I8042State)
        check_range("i8042", "ctr", s.ctr, 0, 0x7F)
        check_range("i8042", "output_port", s.output_port, 0, 0xFF)
        check_range("i8042", "status", s.status, 0, _STORED_STATUS)
        if s.status & ~_STORED_STATUS:
            raise StateError("i8042", f"status={s.status:#x} stores bits outside {_STORED_STATUS:#x}")
        if s.output is not None:
            check_range("i8042", "output", s.output, 0, 0xFF)
        check_range("i8042", "last_output", s.last_output, 0, 0xFF)
        if s.pending_command is not None:
            check_range("i8042", "pending_command", s.pending_command, 0, 0xFF)
            if not _takes_data(s.pending_command):
                raise StateError("i8042", f"pending_command={s.pending_command:#x} takes no parameter byte")
        self._load(s)
        self._update_irq(force=True)

    def _load(self, s: I8042State) -> None:
        """Set every register from a checked state (the IRQ is the caller's business)."""
        self._ctr = s.ctr
        self._output_port = s.output_port
        self._status = s.status
        self._output = s.output
        self._last_output = s.last_output
        self._pending_command = s.pending_command

    # -- bus binding ------------------------------------------------------------------------------------
    def register(self, pio: Bus, data_port: int = DATA_PORT, command_port: int = COMMAND_PORT) -> None:
        pio.register(data_port, 1, I8042DataPort(self), "i8042-data")
        pio.register(command_port, 1, I8042CommandPort(self), "i8042-command")


class I8042DataPort:
    """Port 0x60 as a bus device."""

    def __init__(self, controller: I8042) -> None:
        self.controller = controller

    def read(self, offset: int, size: int) -> int:
        return self.controller.read_data() | (((1 << (8 * size)) - 1) & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        self.controller.write_data(value & 0xFF)


class I8042CommandPort:
    """Port 0x64 as a bus device: status on read, command on write."""

    def __init__(self, controller: I8042) -> None:
        self.controller = controller

    def read(self, offset: int, size: int) -> int:
        return self.controller.read_status() | (((1 << (8 * size)) - 1) & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        self.controller.write_command(value & 0xFF)
