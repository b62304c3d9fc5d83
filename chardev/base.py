"""What every character backend shares: the frontend protocol, input flow control and the wake pipe.

A backend moves bytes between the host (terminal, file, socket) and one frontend (a UART). Output is
``write(data)``, called by the device model under the machine lock, so it must never block for long.
Input is read on the backend's own I/O thread and handed to a *receiver* that returns how many bytes it
took; the rest stays in the backend until the frontend reports room (:meth:`CharBackend.notify_room`),
so nothing typed is lost when the guest reads slowly. :meth:`CharBackend.attach` builds that receiver
for a frontend: it takes the machine lock, asks ``can_receive()`` and calls ``receive()``.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import Callable, Protocol, Union

Receiver = Callable[[bytes], int]

#: While input is held back, re-offer it at least this often even without a notification (seconds).
INPUT_RETRY_INTERVAL = 0.05
#: How long close() waits for an I/O thread to finish (seconds).
THREAD_JOIN_TIMEOUT = 2.0


def append_bounded(buffer: bytearray, data: bytes, limit: int) -> int:
    """Queue ``data`` for a slow reader, keeping ``buffer`` at most ``limit`` bytes; returns how many bytes
    did not fit (dropped: output must never block the device model that writes it)."""
    room = max(0, limit - len(buffer))
    buffer += data[:room]
    return max(0, len(data) - room)


def host_warning(message: str) -> None:
    """One line on stderr for host-side trouble that must not stop the VM (as QEMU's warn_report)."""
    try:
        sys.stderr.write(f"pyemu: warning: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class CharFrontend(Protocol):
    """The device side of a character backend (a UART). Called with the machine lock held."""

    def can_receive(self) -> int: ...

    def receive(self, data: bytes) -> None: ...

    def set_rx_space_notifier(self, callback: Callable[[], None] | None) -> None: ...


class HasFileno(Protocol):
    def fileno(self) -> int: ...


Selectable = Union[int, HasFileno]  # what select() accepts


class MachineLock(Protocol):
    """The board's lock as a backend sees it (a ``threading.RLock`` or ``Lock``)."""

    def __enter__(self) -> object: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None, /) -> object: ...


class WakePipe:
    """A self-pipe: lets any thread interrupt an I/O thread's ``select`` without blocking itself."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self.read_fd

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"w")
        except (BlockingIOError, OSError):
            pass  # a full pipe already means "wake up"; a closed one means nobody listens

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class CharBackend:
    """Base class: receiver plumbing, the held-back input buffer and the close protocol.

    Subclasses implement :meth:`write` and, if they produce input, an I/O thread that appends to
    ``self._pending_input`` (only while :meth:`_wants_input`) and calls :meth:`_offer_input`.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._receiver: Receiver | None = None
        self._pending_input = b""
        self._wake = WakePipe()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._frontend: CharFrontend | None = None

    # -- output -----------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Guest output. Never raises for host-side trouble: output that cannot go anywhere is dropped."""
        raise NotImplementedError

    # -- input ------------------------------------------------------------------------------------------
    def set_receiver(self, receiver: Receiver | None) -> None:
        """Install the function that takes input. It is called on the backend's I/O thread, must return
        how many leading bytes it accepted, and may accept fewer (even zero) for flow control."""
        self._receiver = receiver
        self._wake.wake()

    def attach(self, frontend: CharFrontend, lock: MachineLock) -> None:
        """Feed ``frontend`` from this backend, taking ``lock`` (the machine lock: the same one the exit
        dispatcher and the timer queue hold) around every ``can_receive``/``receive`` pair, and let the
        frontend announce free space through :meth:`notify_room`."""

        def receiver(data: bytes) -> int:
            with lock:
                count = min(len(data), frontend.can_receive())
                if count > 0:
                    frontend.receive(data[:count])
                return count

        self._frontend = frontend
        frontend.set_rx_space_notifier(self.notify_room)
        self.set_receiver(receiver)

    def detach(self) -> None:
        """Stop feeding the frontend; input stays with the host until a receiver is set again."""
        if self._frontend is not None:
            self._frontend.set_rx_space_notifier(None)
            self._frontend = None
        self.set_receiver(None)

    def notify_room(self) -> None:
        """The frontend can take input again. Safe from any thread, never blocks (called under the
        machine lock)."""
        self._wake.wake()

    @property
    def pending_input(self) -> int:
        """Bytes read from the host and not yet taken by the frontend."""
        return len(self._pending_input)

    def _wants_input(self) -> bool:
        """Whether the I/O thread should read more from the host now."""
        return self._receiver is not None and not self._pending_input and not self._closed.is_set()

    def _offer_input(self) -> None:
        """Hand held-back input to the receiver (I/O thread only)."""
        receiver = self._receiver
        if receiver is None or not self._pending_input:
            return
        taken = receiver(self._pending_input)
        if taken > 0:
            self._pending_input = self._pending_input[taken:]

    def _select_timeout(self) -> float | None:
        """Poll interval for an I/O thread: retry held input periodically, otherwise sleep."""
        return INPUT_RETRY_INTERVAL if self._pending_input and self._receiver is not None else None

    # -- life cycle -------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the I/O thread and release host resources. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=THREAD_JOIN_TIMEOUT)
        self._close_resources()
        self._wake.close()

    def _close_resources(self) -> None:
        """Subclass hook: close files and sockets (after the I/O thread stopped)."""

    def __enter__(self) -> "CharBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"
