"""From a parsed spec to a running backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from pyemu.chardev.base import CharBackend
from pyemu.chardev.spec import (ChardevRefSpec, ChardevSpec, FileSpec, NoneSpec, NullSpec, SocketSpec, StdioSpec,
                                parse_chardev_spec)
from pyemu.errors import ConfigError

if TYPE_CHECKING:
    from pyemu.system.config import ObjectOptions


def open_chardev(
    spec: ChardevSpec | str,
    *,
    on_quit: Callable[[], None] | None = None,
    connect_timeout: float | None = None,
    chardevs: Sequence["ObjectOptions"] = (),
) -> CharBackend:
    """Open the backend ``spec`` describes (a string is parsed first).

    ``on_quit`` is the Ctrl-A x action of a stdio backend (called on its input thread, without the
    machine lock). ``connect_timeout`` bounds a socket's start-up wait (None: wait like QEMU).
    ``none`` opens a :class:`NullBackend`, but a board should check ``isinstance(spec, NoneSpec)`` first
    and create no device at all. Errors: ConfigError for a malformed string, ChardevError when opening
    fails. ``chardevs`` are the ``-chardev`` options a ``chardev:ID`` spec may name.
    """
    if isinstance(spec, str):
        spec = parse_chardev_spec(spec)
    # Each backend's module is imported when one is opened: a VM starts with the ones it uses only (the
    # socket backend alone brings ~5 ms of imports).
    if isinstance(spec, StdioSpec):
        from pyemu.chardev.stdio import StdioBackend

        return StdioBackend(on_quit=on_quit)
    if isinstance(spec, FileSpec):
        from pyemu.chardev.file import FileBackend

        return FileBackend(spec)
    if isinstance(spec, SocketSpec):
        from pyemu.chardev.socket import SocketBackend

        return SocketBackend(spec, connect_timeout=connect_timeout)
    if isinstance(spec, ChardevRefSpec):
        from pyemu.chardev.options import open_chardev_options

        for options in chardevs:
            if options.id == spec.id:
                return open_chardev_options(options, connect_timeout=connect_timeout)
        raise ConfigError(f"-serial {spec}: could not connect serial device to character backend '{spec}'",
                          option="-serial")
    if isinstance(spec, (NullSpec, NoneSpec)):
        from pyemu.chardev.null import NullBackend

        return NullBackend(str(spec))
    raise TypeError(f"not a chardev spec: {spec!r}")
