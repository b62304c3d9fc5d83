"""QEMU's console escape (Ctrl-A prefix) as a small state machine, apart from any terminal or thread.

``Ctrl-A x`` quits, ``Ctrl-A h`` (or ``?``) prints help, ``Ctrl-A Ctrl-A`` sends one literal Ctrl-A;
any other key after Ctrl-A is swallowed together with the prefix, as QEMU's multiplexer does. The
decoder keeps its state between :meth:`EscapeDecoder.feed` calls, so a prefix split across two reads
still works.
"""

from __future__ import annotations

import enum

CTRL_A = 0x01


class EscapeCommand(enum.Enum):
    QUIT = "quit"
    HELP = "help"


def escape_help(escape_char: int = CTRL_A) -> str:
    """The help text printed for ``Ctrl-A h`` (CR-LF line ends: the terminal is in raw mode)."""
    name = f"C-{chr(escape_char + 0x60)}"
    lines = [
        f"{name} h    print this help",
        f"{name} x    exit emulator",
        f"{name} {name}  type {name}",
    ]
    return "\r\n" + "\r\n".join(lines) + "\r\n"


class EscapeDecoder:
    def __init__(self, escape_char: int = CTRL_A) -> None:
        self.escape_char = escape_char
        self._after_escape = False

    def feed(self, data: bytes) -> list[bytes | EscapeCommand]:
        """Split ``data`` into runs of bytes for the guest and escape commands, in input order."""
        events: list[bytes | EscapeCommand] = []
        run = bytearray()
        for byte in data:
            if self._after_escape:
                self._after_escape = False
                if byte == self.escape_char:
                    run.append(byte)
                    continue
                command = _COMMANDS.get(byte)
                if command is not None:
                    if run:
                        events.append(bytes(run))
                        run.clear()
                    events.append(command)
                continue  # unknown command: dropped with its prefix
            if byte == self.escape_char:
                self._after_escape = True
            else:
                run.append(byte)
        if run:
            events.append(bytes(run))
        return events


_COMMANDS = {
    ord("x"): EscapeCommand.QUIT,
    ord("X"): EscapeCommand.QUIT,
    ord("h"): EscapeCommand.HELP,
    ord("?"): EscapeCommand.HELP,
}
