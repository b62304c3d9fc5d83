"""Character-device backends (QEMU's chardev): where a UART's bytes go and come from.

Entry points: :func:`parse_chardev_spec` (CLI strings to frozen specs) and :func:`open_chardev` (spec to a
:class:`CharBackend`); ``backend.attach(uart, machine.lock)`` feeds the UART with flow control.
"""

from pyemu.chardev.base import CharBackend, CharFrontend
from pyemu.chardev.errors import ChardevError, ChardevTimeoutError
from pyemu.chardev.factory import open_chardev
from pyemu.chardev.spec import (
    ChardevRefSpec,
    ChardevSpec,
    FileSpec,
    NoneSpec,
    NullSpec,
    SocketSpec,
    StdioSpec,
    parse_chardev_spec,
)

__all__ = [
    "CharBackend",
    "CharFrontend",
    "ChardevError",
    "ChardevRefSpec",
    "ChardevSpec",
    "ChardevTimeoutError",
    "FileSpec",
    "NoneSpec",
    "NullSpec",
    "SocketSpec",
    "StdioSpec",
    "open_chardev",
    "parse_chardev_spec",
]
