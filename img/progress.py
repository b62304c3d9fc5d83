"""``-p``: qemu-img's progress display, ``"    (12.34/100%)"`` followed by a carriage return, on stdout.

A line is printed at the start (0.00), whenever the progress has grown by at least ``step`` percent since the
last line, and at 100%; :meth:`Progress.end` finishes with a newline. Scripts that parse qemu-img's progress
therefore parse ours, and a terminal shows one line that updates in place. Thread-safe: convert's workers
report completed bytes from several threads.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO


class Progress:
    """Progress of one command; disabled instances do nothing, so callers need no ``if``."""

    def __init__(self, enabled: bool, *, step: float = 1.0, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.step = step
        self._stream = stream
        self._lock = threading.Lock()
        self._done = 0
        self._total = 0
        self._printed = -1.0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def start(self, total: int) -> None:
        """Set the amount of work (bytes) and print 0.00%."""
        with self._lock:
            self._total = max(total, 0)
            self._done = 0
            self._print(0.0)

    def advance(self, amount: int) -> None:
        """``amount`` more bytes are done."""
        with self._lock:
            self._done += amount
            self._maybe_print()

    def set(self, done: int) -> None:
        """``done`` bytes are done in all."""
        with self._lock:
            self._done = done
            self._maybe_print()

    def end(self) -> None:
        """Finish the progress line (newline)."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def _maybe_print(self) -> None:
        percent = 100.0 if self._total == 0 else min(100.0, self._done * 100.0 / self._total)
        if percent >= 100.0 and self._printed < 100.0 or percent - self._printed >= self.step:
            self._print(percent)

    def _print(self, percent: float) -> None:
        self._printed = percent
        if self.enabled:
            self.stream.write(f"    ({percent:0.2f}/100%)\r")
            self.stream.flush()
