"""Putting the controlling terminal in raw mode and, whatever happens, putting it back.

Raw mode is needed so every key (Ctrl-C included, unless signals are allowed) reaches the guest one
byte at a time without local echo. Leaving a user's shell in raw mode after a crash is the classic bug
of such tools, so restoration is idempotent and reached by three routes: :meth:`RawTerminal.restore`
(called from ``close()`` and ``finally`` blocks), an ``atexit`` hook, and handlers for SIGTERM/SIGHUP
that restore the terminal and then let the signal take its default effect. Signal handlers are only
installed from the main thread and only where no one else installed one (a board that handles SIGTERM
itself keeps its handler and is expected to close the backend).
"""

from __future__ import annotations

import atexit
import os
import signal
import termios
import threading
from types import FrameType
from typing import Any

RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class RawTerminal:
    def __init__(self, fd: int, *, allow_signals: bool = False, install_signal_handlers: bool = True) -> None:
        self.fd = fd
        self.allow_signals = allow_signals
        self.install_signal_handlers = install_signal_handlers
        self._saved: list[Any] | None = None
        self._installed: dict[int, Any] = {}
        self._lock = threading.RLock()  # a signal handler may interrupt enter()/restore()

    @property
    def active(self) -> bool:
        return self._saved is not None

    def enter(self) -> None:
        """Save the current settings and switch to raw input (output post-processing stays on)."""
        with self._lock:
            if self._saved is not None:
                return
            saved = termios.tcgetattr(self.fd)
            raw = termios.tcgetattr(self.fd)
            raw[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                        | termios.IGNCR | termios.ICRNL | termios.IXON)
            raw[1] |= termios.OPOST
            raw[2] &= ~(termios.CSIZE | termios.PARENB)
            raw[2] |= termios.CS8
            raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
            if not self.allow_signals:
                raw[3] &= ~termios.ISIG
            raw[6] = list(raw[6])
            raw[6][termios.VMIN] = 1
            raw[6][termios.VTIME] = 0
            termios.tcsetattr(self.fd, termios.TCSANOW, raw)
            self._saved = saved
            atexit.register(self.restore)
            if self.install_signal_handlers and threading.current_thread() is threading.main_thread():
                for signum in RESTORE_SIGNALS:
                    if signal.getsignal(signum) == signal.SIG_DFL:
                        signal.signal(signum, self._on_signal)
                        self._installed[signum] = signal.SIG_DFL

    def restore(self) -> None:
        """Put the saved settings back (idempotent; safe from atexit and signal handlers)."""
        with self._lock:
            saved, self._saved = self._saved, None
            if saved is None:
                return
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)
            except (termios.error, OSError):
                pass  # the terminal is gone (hang-up): nothing left to restore
            atexit.unregister(self.restore)
            installed, self._installed = self._installed, {}
            if threading.current_thread() is threading.main_thread():
                for signum, previous in installed.items():
                    if signal.getsignal(signum) == self._on_signal:
                        signal.signal(signum, previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.restore()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
