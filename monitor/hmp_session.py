"""One interactive human-monitor connection (``-monitor``, ``-mon mode=readline``): banner, ``(qemu)``
prompt, a small line editor, and each line run through :class:`~pyemu.monitor.hmp.HumanMonitor`.

Like :class:`~pyemu.monitor.qmp.QmpSession` it never touches a socket: the server feeds it bytes and it
answers through ``send``, so the two kinds of session share one server. The line editor does what a
person at a terminal or a script needs: typed characters are echoed (QEMU's readline echoes too, by
redrawing the line with escape sequences), Backspace/DEL edits, CR or LF ends a line (so ``\\r\\n`` is a
command and an empty line, as in QEMU), terminal escape sequences (arrow keys) are skipped and other
control characters ignored. A line longer than :data:`MAX_LINE` is cut off, as QEMU's 1 KiB buffer does.
Events are not shown: HMP has none.
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.monitor.protocol import QEMU_VERSION
from pyemu.monitor.hmp import HumanMonitor

PROMPT = b"(qemu) "
MAX_LINE = 1024


def banner() -> bytes:
    version = f"{QEMU_VERSION['major']}.{QEMU_VERSION['minor']}.{QEMU_VERSION['micro']}"
    return f"QEMU {version} monitor - type 'help' for more information\r\n".encode()


class HmpSession:
    """The state of one human-monitor client."""

    def __init__(self, monitor: HumanMonitor, send: Callable[[bytes], None], *, echo: bool = True) -> None:
        self._monitor = monitor
        self._send = send
        self._echo = echo
        self._line = bytearray()
        self._escape = 0  # bytes of an escape sequence still to skip (0: none; -1: CSI until a final byte)
        self.closing = False

    def start(self) -> None:
        self._send(banner() + PROMPT)

    def send_event(self, name: str, data: dict[str, Any], stamp: dict[str, int] | None = None) -> None:
        """HMP shows no events."""

    def feed(self, data: bytes) -> None:
        echo = bytearray()
        for byte in data:
            if self.closing:
                return
            if self._escape:
                if self._escape == 1 and byte == 0x5B:  # ESC [ : a CSI sequence, ends at 0x40..0x7e
                    self._escape = -1
                elif self._escape == -1 and not 0x40 <= byte <= 0x7E:
                    continue
                else:
                    self._escape = 0
                continue
            if byte in (0x0D, 0x0A):
                self._flush_echo(echo)
                self._end_line()
            elif byte == 0x1B:
                self._escape = 1
            elif byte in (0x08, 0x7F):
                if self._line:
                    del self._line[-1]
                    echo += b"\b \b"
            elif byte >= 0x20:
                if len(self._line) < MAX_LINE:
                    self._line.append(byte)
                    echo.append(byte)
        self._flush_echo(echo)

    def _flush_echo(self, echo: bytearray) -> None:
        if echo and self._echo:
            self._send(bytes(echo))
        echo.clear()

    def _end_line(self) -> None:
        line = self._line.decode("utf-8", errors="replace")
        self._line.clear()
        if self._echo:
            self._send(b"\r\n")
        output = self._monitor.execute(line)
        self._send(output.text.encode("utf-8", errors="replace"))
        if output.after is not None:
            self.closing = True  # quit: nothing more to read
            output.after()
            return
        self._send(PROMPT)
