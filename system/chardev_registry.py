"""The VM's character backends by label, for the monitor (QMP ``query-chardev``, HMP ``info chardev``).

Backends are opened in several places -- the board for ``-serial``, the virtio-serial binding for a
``-device virtconsole,chardev=ID``, the monitor server for ``-qmp``/``-monitor``/``-mon`` sockets -- and
each of them registers what it opened here, under QEMU's label (``serialN``, the ``-chardev`` id,
``compat_monitorN``). The registry keeps only references and callables, so it never decides how a
backend is described: :mod:`pyemu.monitor.chardev_info` does that when asked.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ChardevUse:
    """One open backend. ``backend`` is the object itself (a :class:`~pyemu.chardev.base.CharBackend`,
    or whatever a monitor listens with); ``filename`` overrides how it is described (monitor sockets know
    their own state); ``frontend_open`` says whether the device or monitor on it has it open."""

    label: str
    backend: object
    frontend_open: Callable[[], bool]
    filename: Callable[[], str] | None = None


class ChardevRegistry:
    """Backends in the order they were opened; thread-safe (the monitor reads while the board builds)."""

    def __init__(self) -> None:
        self._uses: list[ChardevUse] = []
        self._lock = threading.Lock()

    def add(self, label: str, backend: object, frontend_open: Callable[[], bool] = lambda: True,
            filename: Callable[[], str] | None = None) -> None:
        with self._lock:
            self._uses = [use for use in self._uses if use.label != label]
            self._uses.append(ChardevUse(label, backend, frontend_open, filename))

    def remove(self, label: str) -> None:
        with self._lock:
            self._uses = [use for use in self._uses if use.label != label]

    def uses(self) -> list[ChardevUse]:
        with self._lock:
            return list(self._uses)
