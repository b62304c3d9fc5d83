"""Signals that end a process (SIGTERM, SIGHUP, ...), handled outside the signal handler.

Python runs a signal handler in the main thread between two of that thread's bytecodes, possibly while it
holds a lock that ending the process needs. The usual shape is a main thread that waits in
``event.wait(timeout)`` and a handler that calls ``event.set()``: the wait holds the event's lock for a
moment every time it wakes, and a handler that lands there waits for its own thread forever (and cannot
run again for the next SIGTERM). Seen as a VM that ignored SIGTERM, about one run in 40 on a loaded host.
"""

from __future__ import annotations

import _thread
import signal
from typing import Callable, Sequence

TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def install_termination_handlers(terminate: Callable[[int], None],
                                 signals: Sequence[int] = TERMINATING_SIGNALS) -> Callable[[], None]:
    """Call ``terminate(signum)`` on each of ``signals``, on a thread of its own; returns what puts the
    previous handlers back. The handler only starts the thread (``_thread.start_new_thread`` takes no
    Python lock); the thread takes the locks as any thread does. Outside the main thread (embedded use)
    nothing is installed: the caller handles signals."""
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum: int, _frame: object) -> None:
        _thread.start_new_thread(terminate, (signum,))

    try:
        for signum in signals:
            signal.signal(signum, handler)
    except ValueError:
        return lambda: None

    def restore() -> None:
        for signum, old in previous.items():
            try:
                signal.signal(signum, old)
            except (ValueError, TypeError):
                pass
    return restore
