"""pyemu's own error and warning lines, with QEMU's ``-msg timestamp=on[,guest-name=on]`` prefixes.

QEMU prefixes every ``error_report``/``warn_report`` line with an ISO-8601 UTC timestamp
(``2026-12-03T15:08:31.970230Z qemu-system-x86_64: ...``) when ``-msg timestamp=on`` is given, and with
the guest name when ``guest-name=on`` and ``-name`` are given; management tools (libvirt writes
``-msg timestamp=on``) correlate these lines with their own logs. Code that reports a problem to the user
calls :func:`error_report` or :func:`warn_report` instead of printing, so the prefix is uniform.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

PROGRAM = "pyemu"


@dataclass(frozen=True)
class MsgOptions:
    """``-msg timestamp=on|off,guest-name=on|off``."""

    timestamp: bool = False
    guest_name: bool = False


class _Prefix:
    options = MsgOptions()
    guest: str | None = None


def configure(options: MsgOptions, guest: str | None = None) -> None:
    """Apply ``-msg`` (and the ``-name`` guest name for ``guest-name=on``) to every later message."""
    _Prefix.options = options
    _Prefix.guest = guest


def prefix() -> str:
    parts: list[str] = []
    if _Prefix.options.timestamp:
        import datetime  # (-msg timestamp=on only: ~2 ms of every start otherwise)

        now = datetime.datetime.now(datetime.timezone.utc)
        parts.append(now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    if _Prefix.options.guest_name and _Prefix.guest:
        parts.append(_Prefix.guest)
    parts.append(f"{PROGRAM}:")
    return " ".join(parts)


def error_report(message: str, *, stream: TextIO | None = None) -> None:
    """One error line on stderr: ``[timestamp] [guest] pyemu: message``."""
    print(f"{prefix()} {message}", file=stream or sys.stderr, flush=True)


def warn_report(message: str, *, stream: TextIO | None = None) -> None:
    print(f"{prefix()} warning: {message}", file=stream or sys.stderr, flush=True)
