"""Errors of the character-device backends.

Malformed spec strings are :class:`pyemu.errors.ConfigError` (the user typed them); failures to open or
serve a well-formed spec (a socket path in a missing directory, a refused connection, nobody connecting
in time) are :class:`ChardevError`, raised ``from`` the underlying OSError so the cause is kept.
"""

from __future__ import annotations

from pyemu.errors import PyemuError


class ChardevError(PyemuError):
    """A character backend could not be opened or failed while running."""

    def __init__(self, message: str, *, spec: str) -> None:
        super().__init__(message)
        self.spec = spec


class ChardevTimeoutError(ChardevError):
    """Waiting for a socket peer (server ``wait`` mode, or a client connect) took longer than allowed."""
