"""What every monitor session needs before any command runs: the version it announces and the reply type.

Kept apart from :mod:`pyemu.monitor.commands` (which imports every command module) so that a QMP or HMP
session, and a VM that has none, does not pay for the command table until a command arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pyemu import __version__

QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
"""The QEMU release whose QMP pyemu speaks (clients check the greeting's version)."""
PACKAGE = f"pyemu {__version__}"


@dataclass(frozen=True)
class Reply:
    """A return value plus an action to run once the reply is on its way to the client."""

    value: Any
    after: Callable[[], None] | None = None
