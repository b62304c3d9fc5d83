"""The ``stdio`` backend: the guest console on pyemu's own stdin and stdout.

On a terminal it behaves like QEMU's ``-nographic`` console: raw mode (keys go to the guest, Ctrl-C
included), the Ctrl-A escape (``x`` quits through the injected ``on_quit``, ``h`` helps, Ctrl-A Ctrl-A
types Ctrl-A), and the terminal settings restored on close, exit and fatal signals. On a pipe or file it
only forwards bytes, and end of input just ends input: the VM keeps running, as a test harness feeding
commands through a pipe expects.
"""

from __future__ import annotations

import os
import select
import termios
from typing import Callable

from pyemu.chardev.base import CharBackend, Selectable, host_warning
from pyemu.chardev.errors import ChardevError
from pyemu.chardev.escape import EscapeCommand, EscapeDecoder, escape_help
from pyemu.chardev.terminal import RawTerminal

READ_CHUNK = 4096
STDOUT_STALL_TIMEOUT = 5.0  # seconds a non-blocking stdout may stay full before output is dropped


class StdioBackend(CharBackend):
    """``on_quit()`` is called on the backend's input thread (not holding the machine lock) when the
    user types Ctrl-A x; it must be thread-safe, e.g. ``machine.request_shutdown(HOST_UI)``.

    ``raw`` and ``escapes`` default to whether ``stdin_fd`` is a terminal.
    """

    def __init__(
        self,
        *,
        on_quit: Callable[[], None] | None = None,
        stdin_fd: int = 0,
        stdout_fd: int = 1,
        raw: bool | None = None,
        escapes: bool | None = None,
        allow_signals: bool = False,
        install_signal_handlers: bool = True,
    ) -> None:
        super().__init__("stdio")
        self.on_quit = on_quit
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        is_tty = _isatty(stdin_fd)
        self._decoder = EscapeDecoder() if (is_tty if escapes is None else escapes) else None
        self._terminal: RawTerminal | None = None
        if is_tty if raw is None else raw:
            self._terminal = RawTerminal(stdin_fd, allow_signals=allow_signals,
                                         install_signal_handlers=install_signal_handlers)
            try:
                self._terminal.enter()
            except (termios.error, OSError) as exc:
                self._wake.close()
                raise ChardevError(f"cannot put stdin in raw mode: {exc}", spec="stdio") from exc
        self.input_ended = False
        self.quit_requested = False
        self._stdout_broken = False
        self._start_thread(self._run, "pyemu-chardev-stdio")

    @property
    def raw_mode(self) -> bool:
        return self._terminal is not None and self._terminal.active

    # -- output -----------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._stdout_broken or not data:
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    written = os.write(self._stdout_fd, view)
                except BlockingIOError:
                    _, writable, _ = select.select([], [self._stdout_fd], [], STDOUT_STALL_TIMEOUT)
                    if not writable:
                        host_warning("stdio: stdout is not being read; dropping guest output")
                        return
                    continue
                view = view[written:]
        except OSError as exc:
            self._stdout_broken = True
            host_warning(f"stdio: cannot write to stdout ({exc.strerror}); guest output is discarded")

    # -- input thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._offer_input()
                watch: list[Selectable] = [self._wake]
                if self._wants_input() and not self.input_ended:
                    watch.append(self._stdin_fd)
                readable, _, _ = select.select(watch, [], [], self._select_timeout())
                if self._wake in readable:
                    self._wake.drain()
                if self._stdin_fd in readable:
                    self._read_stdin()
        except (OSError, ValueError) as exc:
            if not self._closed.is_set():
                host_warning(f"stdio: input stopped: {exc}")

    def _read_stdin(self) -> None:
        try:
            data = os.read(self._stdin_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO after a terminal hang-up: treat as end of input
        if not data:
            self.input_ended = True  # EOF ends input only; the VM keeps running
            return
        if self._decoder is None:
            self._pending_input += data
            return
        for event in self._decoder.feed(data):
            if isinstance(event, bytes):
                self._pending_input += event
            elif event is EscapeCommand.QUIT:
                self.quit_requested = True
                if self.on_quit is not None:
                    self.on_quit()
            elif event is EscapeCommand.HELP:
                self.write(escape_help().encode())

    # -- close ------------------------------------------------------------------------------------------
    def _close_resources(self) -> None:
        if self._terminal is not None:
            self._terminal.restore()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._terminal is not None:
                self._terminal.restore()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
