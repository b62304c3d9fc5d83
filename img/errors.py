"""Errors of the image tool.

Every problem a user can cause -- a bad option, an unreadable file, an image that cannot do what was asked --
is an :class:`ImgError`; :func:`pyemu.img.cli.main` prints it as one ``pyemu-img: ...`` line and exits with
its ``exit_code`` (1 unless a command documents another, e.g. ``compare`` uses 2 for errors).
"""

from __future__ import annotations

from pyemu.errors import PyemuError


class ImgError(PyemuError):
    """A failure the user should read about; never shown with a traceback."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(ImgError):
    """The command line itself is wrong (unknown option, missing argument)."""
