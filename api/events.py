"""Events of one VM (STOP, RESUME, RESET, POWERDOWN, SHUTDOWN...) as a thread-safe stream.

Both the embedded VM (fed by the control API's event sinks) and a remote one (fed by its QMP connection)
deliver into an :class:`EventStream`, so a program waits for "the guest shut down" the same way whichever
it drives. The stream keeps every event until it is read (bounded: the oldest are dropped past
``MAX_QUEUED``, since a program that never reads must not make the VM grow without limit).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from pyemu.api.errors import VmTimeout

MAX_QUEUED = 10_000


@dataclass(frozen=True)
class Event:
    """One event: QMP's name and data, and when it happened (seconds since the epoch)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    def to_qmp(self) -> dict[str, Any]:
        """The event as QMP puts it on the wire."""
        seconds = int(self.timestamp)
        return {"event": self.name, "data": self.data,
                "timestamp": {"seconds": seconds, "microseconds": int((self.timestamp - seconds) * 1e6)}}


class EventStream:
    """Events in arrival order; :meth:`get` and :meth:`wait_for` block with a timeout."""

    def __init__(self) -> None:
        self._queue: collections.deque[Event] = collections.deque(maxlen=MAX_QUEUED)
        self._cond = threading.Condition()
        self._closed = False

    def put(self, event: Event) -> None:
        with self._cond:
            self._queue.append(event)
            self._cond.notify_all()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """An event sink for :meth:`pyemu.monitor.control.ControlApi.subscribe`."""
        self.put(Event(name, dict(data), time.time()))

    def close(self) -> None:
        """No more events will come (the VM or the connection ended); waiting readers wake up."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Event:
        """The next event; VmTimeout when none arrives within ``timeout`` seconds or the stream ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self._closed:
                    raise VmTimeout("no more events: the VM has ended")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise VmTimeout(f"no event within {timeout} s")
                self._cond.wait(remaining)
            return self._queue.popleft()

    def wait_for(self, name: str, timeout: float | None = None) -> Event:
        """Skip events until one called ``name``; VmTimeout if it does not come in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = self.get(remaining)
            except VmTimeout:
                raise VmTimeout(f"no {name} event within {timeout} s") from None
            if event.name == name:
                return event

    def drain(self) -> list[Event]:
        """Every event queued now, without waiting."""
        with self._cond:
            events = list(self._queue)
            self._queue.clear()
            return events

    def __iter__(self) -> Iterator[Event]:
        """Events until the stream ends (blocks between them)."""
        while True:
            try:
                yield self.get()
            except VmTimeout:
                return
