"""The typed errors of saving and loading VM state.

Every problem with a stream read from a file or another process is a :class:`StreamError` subclass that
says what is wrong and where (section kind and id), so ``migrate-incoming`` can report it in one line and
the destination stays stopped; problems on the saving side (a device that cannot be saved yet, a transport
that fails) are :class:`MigrationError` too, so the source VM resumes.
"""

from __future__ import annotations

from pyemu.errors import PyemuError


class MigrationError(PyemuError):
    """Saving or loading VM state failed; the message says why."""


class MigrationBlocked(MigrationError):
    """A device's state cannot be saved completely yet (QEMU's migration blocker): nothing is written."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"device '{device}' blocks migration: {reason}")
        self.device = device
        self.reason = reason


class TransportError(MigrationError):
    """The URI is invalid or the file/command behind it failed."""


class StreamError(MigrationError):
    """A stream that cannot be loaded. ``where`` names the section (empty for the stream's own header)."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class StreamFormatError(StreamError):
    """Not a pyemu VM-state stream, or an unsupported format version."""


class StreamTruncated(StreamError):
    """The stream ends before its end marker."""


class StreamCorrupt(StreamError):
    """A checksum, a length, a field or a value is wrong."""


class StreamMismatch(StreamError):
    """A valid stream of a different VM: board, board options, RAM, vCPUs or devices differ."""


class IncomingLoadFailed(MigrationError):
    """A start-up ``-incoming`` load failed in a pyemu process: the reason has been reported, and this is
    qemu-system's last word before it exits 1 (QEMU 7.2's process_incoming_migration_co)."""

    def __init__(self) -> None:
        super().__init__("load of migration failed: Invalid argument")
