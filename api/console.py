"""The serial console of a VM as an object: ``send`` text to it, ``expect`` what the guest prints.

The embedded VM puts COM1 on a Unix socket in a private directory (``-serial unix:...,server=on,wait=off``)
and connects to it before the vCPUs start, so nothing the guest prints is missed and the console works the
same for a VM in this process or another. A reader thread keeps everything the guest printed (bounded by
``MAX_OUTPUT``, oldest dropped); ``expect`` searches from where the previous match ended, as pexpect does,
so a prompt matched once is not matched again.
"""

from __future__ import annotations

import codecs
import re
import socket
import threading
import time

from pyemu.api.errors import ConsoleClosed, ConsoleError, ConsoleTimeout
from pyemu.api.sockets import connect_stream

MAX_OUTPUT = 8 << 20
"""Characters of console output kept; older output is dropped (and the match cursor moves with it)."""
READ_SIZE = 65536


class Console:
    """A connected serial console. Thread-safe: one thread may ``expect`` while another ``send``s."""

    def __init__(self, sock: socket.socket, *, encoding: str = "utf-8") -> None:
        self._sock = sock
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self._encoding = encoding
        self._text = ""
        self._cursor = 0
        self._closed = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_loop, name="pyemu-console", daemon=True)
        self._reader.start()

    @classmethod
    def connect_unix(cls, path: str, *, timeout: float = 10.0) -> "Console":
        try:
            sock = connect_stream(path, timeout)
        except OSError as error:
            raise ConsoleError(f"cannot connect to the console at {path}: {error.strerror or error}") from error
        sock.settimeout(None)
        return cls(sock)

    # -- output -------------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(READ_SIZE)
            except OSError:
                chunk = b""
            with self._cond:
                if chunk:
                    self._text += self._decoder.decode(chunk)
                    excess = len(self._text) - MAX_OUTPUT
                    if excess > 0:
                        self._text = self._text[excess:]
                        self._cursor = max(0, self._cursor - excess)
                else:
                    self._text += self._decoder.decode(b"", final=True)
                    self._closed = True
                self._cond.notify_all()
            if not chunk:
                return

    @property
    def output(self) -> str:
        """Everything the guest printed (up to ``MAX_OUTPUT`` characters)."""
        with self._cond:
            return self._text

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait until ``pattern`` (a plain string, or a compiled regular expression) appears in the output
        after the previous match; returns the match (``match.string[:match.start()]`` is what came before).
        ConsoleTimeout after ``timeout`` seconds, ConsoleClosed if the VM ends first."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._text, self._cursor)
                if match is not None:
                    self._cursor = match.end()
                    return match
                if self._closed:
                    raise ConsoleClosed(f"the console closed before {shown!r} appeared",
                                        output=self._text)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConsoleTimeout(f"{shown!r} did not appear within {timeout} s",
                                         output=self._text)
                self._cond.wait(remaining)

    # -- input --------------------------------------------------------------------------------------------
    def send(self, text: str | bytes) -> None:
        """Type ``text`` at the console (a line needs its own ``\\n``)."""
        data = text.encode(self._encoding) if isinstance(text, str) else text
        try:
            self._sock.sendall(data)
        except OSError as error:
            raise ConsoleError(f"cannot write to the console: {error.strerror or error}") from error

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)
