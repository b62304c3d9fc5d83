"""A recorder for job events, for tests that drive jobs without a QMP connection.

A :class:`~pyemu.jobs.job.Job` reports through an ``emit(name, data)`` callable; tests pass a
:class:`JobEventLog` there and then wait for a state (``wait_status``) or look at the order of what happened
(``names``: JOB_STATUS_CHANGE entries shown as their status, other events by name), the same sequences QEMU's
iotests compare against.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


class JobEventLog:
    """Thread-safe list of (event name, data) pairs; waits time out with an AssertionError listing them."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.cond = threading.Condition()
        self.timeout = timeout

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        with self.cond:
            self.events.append((name, dict(data)))
            self.cond.notify_all()

    def statuses(self, job_id: str) -> list[str]:
        with self.cond:
            return [d["status"] for n, d in self.events if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]

    def names(self) -> list[str]:
        with self.cond:
            return [n if n != "JOB_STATUS_CHANGE" else d["status"] for n, d in self.events]

    def wait(self, predicate: Callable[[], bool], what: str = "condition") -> None:
        deadline = time.monotonic() + self.timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                assert left > 0, f"no {what}: {self.events}"
                self.cond.wait(left)

    def wait_status(self, job_id: str, status: str) -> None:
        self.wait(lambda: status in self.statuses(job_id), f"{status} for {job_id}")
