"""The ``pty`` backend (``-chardev pty,id=ID``): the guest's port on a fresh host pseudo-terminal.

Like QEMU's char-pty: pyemu allocates a pty pair, puts the slave side in raw mode (the guest's own
line discipline does echo and line editing; the host side must pass bytes through untouched), prints
``char device redirected to /dev/pts/N (label ID)`` on stderr so a user can ``screen /dev/pts/N``, and
closes its copy of the slave. Whether anybody has the slave open is read from the master's POLLHUP
(the kernel sets it while no slave descriptor is open), so:

* output while nobody is connected is dropped, as QEMU does -- otherwise the pty buffer would fill and
  the first user to connect would get a screenful of stale output, and a full buffer must never block
  the device writing into it;
* output a connected but slow reader has not taken yet is buffered up to ``output_limit`` bytes and
  the excess dropped (``write`` must not block: it runs on a device I/O thread);
* input follows the base class's flow-control contract: read from the master only while the frontend
  has taken everything read before.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
from dataclasses import dataclass
from typing import Callable

from pyemu.chardev.base import CharBackend, append_bounded, host_warning
from pyemu.chardev.errors import ChardevError

READ_CHUNK = 4096
DEFAULT_OUTPUT_LIMIT = 1 << 16
#: While nobody has the slave open, look for a new peer this often (seconds). QEMU polls once a second.
RECONNECT_POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class PtySpec:
    """A new pseudo-terminal; ``label`` is the ``-chardev`` id, shown in the redirect notice."""

    label: str = "pty"

    def __str__(self) -> str:
        return "pty"


def _stderr_notice(message: str) -> None:
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def make_raw(fd: int) -> None:
    """``cfmakeraw`` on ``fd``: no echo, no line editing, no signals, no CR/LF translation, 8-bit."""
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                  | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[1] &= ~termios.OPOST
    attrs[2] &= ~(termios.CSIZE | termios.PARENB)
    attrs[2] |= termios.CS8
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attrs[6] = list(attrs[6])
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class PtyBackend(CharBackend):
    """A pty master served by its own I/O thread. ``notice`` receives the redirect line (stderr by
    default; tests pass a list's ``append``)."""

    def __init__(self, spec: PtySpec = PtySpec(), *, notice: Callable[[str], None] | None = _stderr_notice,
                 output_limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        super().__init__(f"pty:{spec.label}")
        self.output_limit = output_limit
        self.bytes_dropped = 0
        self._lock = threading.Lock()  # guards _output and _connected
        self._output = bytearray()
        self._connected = False
        try:
            master, slave = os.openpty()
        except OSError as exc:
            self._wake.close()
            raise ChardevError(f"cannot allocate a pseudo-terminal: {exc.strerror}", spec="pty") from exc
        try:
            make_raw(slave)
            self.pty_name = os.ttyname(slave)
            os.set_blocking(master, False)
        except (OSError, termios.error) as exc:
            os.close(master)
            self._wake.close()
            raise ChardevError(f"cannot set up the pseudo-terminal: {exc}", spec="pty") from exc
        finally:
            os.close(slave)
        self._master: int | None = master
        if notice is not None:
            notice(f"char device redirected to {self.pty_name} (label {spec.label})")
        self._start_thread(self._run, f"pyemu-chardev-pty-{spec.label}")

    # -- status -----------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether some process has the slave side open (as last seen by the I/O thread)."""
        return self._connected

    # -- output -----------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        wake = False
        with self._lock:
            master = self._master
            if master is None or not self._connected:
                self.bytes_dropped += len(data)
                return
            if not self._output:
                try:
                    sent = os.write(master, data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    # EIO: the last slave descriptor was closed; the I/O thread notices the hang-up.
                    self._connected = False
                    self.bytes_dropped += len(data)
                    self._wake.wake()
                    return
                data = data[sent:]
            if data:
                self.bytes_dropped += append_bounded(self._output, data, self.output_limit)
                wake = True
        if wake:
            self._wake.wake()

    # -- I/O thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._offer_input()
                master = self._master
                if master is None:
                    return
                poller = select.poll()
                poller.register(self._wake.read_fd, select.POLLIN)
                if self._connected:
                    events = 0
                    if self._wants_input():
                        events |= select.POLLIN
                    with self._lock:
                        if self._output:
                            events |= select.POLLOUT
                    poller.register(master, events)  # POLLHUP is reported even for events == 0
                    timeout = self._select_timeout()
                else:
                    timeout = RECONNECT_POLL_INTERVAL
                ready = dict(poller.poll(None if timeout is None else int(timeout * 1000)))
                if ready.get(self._wake.read_fd):
                    self._wake.drain()
                if not self._connected:
                    self._check_peer(master)
                    continue
                revents = ready.get(master, 0)
                if revents & select.POLLIN:
                    self._read(master)
                if revents & select.POLLOUT:
                    self._flush(master)
                if revents & (select.POLLHUP | select.POLLERR) and not revents & select.POLLIN:
                    self._hang_up()
        except (OSError, ValueError) as exc:
            if not self._closed.is_set():
                host_warning(f"chardev {self.label}: stopped: {exc}")

    def _check_peer(self, master: int) -> None:
        """Nobody was connected: has somebody opened the slave since? (POLLHUP clears when they do.)"""
        poller = select.poll()
        poller.register(master, select.POLLIN)
        revents = dict(poller.poll(0)).get(master, 0)
        if not revents & select.POLLHUP:
            with self._lock:
                self._connected = True

    def _hang_up(self) -> None:
        with self._lock:
            self._connected = False
            self.bytes_dropped += len(self._output)
            self._output.clear()

    def _read(self, master: int) -> None:
        try:
            data = os.read(master, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: every slave descriptor is closed
        if data:
            self._pending_input += data
        else:
            self._hang_up()

    def _flush(self, master: int) -> None:
        with self._lock:
            if not self._output:
                return
            try:
                sent = os.write(master, self._output)
            except BlockingIOError:
                return
            except OSError:
                sent = -1
            if sent >= 0:
                del self._output[:sent]
                return
        self._hang_up()

    # -- close ------------------------------------------------------------------------------------------
    def _close_resources(self) -> None:
        with self._lock:
            master, self._master = self._master, None
            self._connected = False
        if master is not None:
            os.close(master)
