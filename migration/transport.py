"""QEMU's migration URIs as byte streams: ``file:PATH`` and ``exec:COMMAND``.

``file:`` writes or reads a regular file (QEMU 8.2's spelling; ``offset=`` is not supported). ``exec:``
runs ``COMMAND`` through ``/bin/sh -c`` as QEMU does: the saving side writes into its standard input, the
loading side reads its standard output; a command that exits non-zero fails the migration. ``tcp:``,
``unix:`` and ``fd:`` are later work and refused by name.
"""

from __future__ import annotations

import subprocess
from typing import IO

from pyemu.migration.errors import TransportError

EXEC_TIMEOUT_S = 60.0
_LATER = ("tcp:", "unix:", "fd:", "rdma:", "vsock:")


def _split(uri: str) -> tuple[str, str]:
    for scheme in ("file:", "exec:"):
        if uri.startswith(scheme):
            rest = uri[len(scheme):]
            if not rest:
                raise TransportError(f"'{uri}': the URI has no {'path' if scheme == 'file:' else 'command'}")
            return scheme[:-1], rest
    if uri.startswith(_LATER):
        raise TransportError(f"'{uri}': migration over {uri.split(':', 1)[0]} is not supported yet "
                             "(file: and exec: are)")
    raise TransportError(f"unknown migration protocol: {uri}")


def check_uri(uri: str) -> None:
    """TransportError unless ``uri`` is a supported migration URI."""
    _split(uri)


class _Endpoint:
    """The open end of a ``file:`` or ``exec:`` URI, and the command's process for ``exec:``."""

    def __init__(self, uri: str, *, writing: bool) -> None:
        self.uri = uri
        kind, rest = _split(uri)
        self._process: subprocess.Popen[bytes] | None = None
        try:
            if kind == "file":
                self._io: IO[bytes] = open(rest, "wb" if writing else "rb")
            elif writing:
                self._process = subprocess.Popen(["/bin/sh", "-c", rest], stdin=subprocess.PIPE)
                assert self._process.stdin is not None
                self._io = self._process.stdin
            else:
                self._process = subprocess.Popen(["/bin/sh", "-c", rest], stdout=subprocess.PIPE)
                assert self._process.stdout is not None
                self._io = self._process.stdout
        except OSError as exc:
            raise TransportError(f"'{uri}': {exc.strerror or exc}") from exc

    def _reap(self, check: bool = True) -> None:
        """Wait for an ``exec:`` command (killed first when ``check`` is off and it still runs); a command
        that fails or hangs past EXEC_TIMEOUT_S fails the migration."""
        if self._process is None:
            return
        if self._process.poll() is None and not check:
            self._process.kill()
        try:
            status = self._process.wait(timeout=EXEC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise TransportError(f"'{self.uri}': the command did not finish within {EXEC_TIMEOUT_S:g} s") from None
        if check and status != 0:
            raise TransportError(f"'{self.uri}': the command exited with status {status}")


class OutgoingStream(_Endpoint):
    """Where a save goes. ``close`` finishes it (and reports a failed ``exec:`` command)."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, writing=True)

    def write(self, data: bytes, /) -> int:
        try:
            return self._io.write(data)
        except OSError as exc:
            if self._process is not None:
                try:
                    status = self._process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                else:
                    raise TransportError(f"'{self.uri}': the command exited with status {status} before "
                                         "it read the whole stream") from exc
            raise TransportError(f"'{self.uri}': write failed: {exc.strerror or exc}") from exc

    def close(self) -> None:
        try:
            self._io.close()
        except OSError as exc:
            raise TransportError(f"'{self.uri}': {exc.strerror or exc}") from exc
        finally:
            self._reap()

    def abort(self) -> None:
        try:
            self._io.close()
        except OSError:
            pass
        self._reap(check=False)


class IncomingStream(_Endpoint):
    """Where a load comes from: a readable binary stream; ``close`` reports a failed ``exec:`` command."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri, writing=False)

    @property
    def source(self) -> IO[bytes]:
        return self._io

    def close(self, check: bool = True) -> None:
        try:
            self._io.close()
        except OSError:
            pass
        self._reap(check)
