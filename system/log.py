"""QEMU-style log categories (``-d int,unimp,guest_errors``) and the log destination (``-D file``).

Why not plain ``logging`` levels: QEMU users select *what* to see by category, and a category that is off
must cost one attribute test on hot paths (every unassigned port access, every interrupt). Messages go to
stderr unless ``-D`` names a file.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from pyemu.errors import ConfigError

CATEGORIES: dict[str, str] = {
    "int": "show interrupts and exceptions delivered to the guest",
    "unimp": "log accesses to unassigned I/O ports and MMIO, and unimplemented device features",
    "guest_errors": "log guest mistakes (invalid register values, malformed descriptors)",
    "cpu_reset": "show CPU state at reset",
    "boot": "boot-progress timestamps from the debug port (0x80) and the boot loader",
    "exec": "show accelerator run-loop exits",
}


class _LogState:
    def __init__(self) -> None:
        self.enabled: frozenset[str] = frozenset()
        self.stream: TextIO = sys.stderr
        self.lock = threading.Lock()
        self.start = time.monotonic()


_state = _LogState()


def parse_mask(spec: str) -> frozenset[str]:
    """Parse a ``-d`` argument (comma-separated category names) into a set; unknown names are errors."""
    names = frozenset(n for n in spec.split(",") if n)
    unknown = sorted(names - CATEGORIES.keys())
    if unknown:
        raise ConfigError(f"-d: unknown log category '{unknown[0]}' (see -d help)", option="-d")
    return names


def set_mask(categories: frozenset[str] | set[str]) -> None:
    _state.enabled = frozenset(categories)


def set_file(path: str) -> None:
    """Send log output to ``path`` (``-D``)."""
    try:
        _state.stream = open(path, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"-D: cannot open log file '{path}': {exc.strerror}", option="-D") from exc


def enabled(category: str) -> bool:
    """Cheap test for hot paths: is ``category`` selected?"""
    return category in _state.enabled


def log(category: str, message: str) -> None:
    """Write ``message`` if ``category`` is selected, prefixed with seconds since start-up."""
    if category not in _state.enabled:
        return
    with _state.lock:
        _state.stream.write(f"[{time.monotonic() - _state.start:10.6f}] {category}: {message}\n")
        _state.stream.flush()
