"""A hand-driven clock for :class:`pyemu.system.timers.TimerQueue` in device tests.

Device models take time from an injected TimerQueue; built on this clock, a test moves time by setting
``clock.ns`` and running the due timers (``queue.run_due()``), so timer behaviour is exact and instant.
"""

from __future__ import annotations


class FakeClock:
    """Monotonic nanoseconds that only move when the test sets :attr:`ns`."""

    def __init__(self, ns: int = 0) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns
