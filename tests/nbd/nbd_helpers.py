"""Helpers for the NBD tests: servers in-process and as processes (pyemu-nbd, qemu-nbd), tool checks, and a
raw protocol speaker for hostile-client tests."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from pyemu.block.nbd import protocol as P

TIMEOUT = 60.0


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def run(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {path} after {timeout} s")


def pyemu_nbd_argv() -> list[str]:
    return [sys.executable, "-m", "pyemu.block.nbd.cli"]


@contextlib.contextmanager
def server_process(argv: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server (``argv`` listens on ``sock``) for the block; killed afterwards."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


def url(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def make_image(path: Path, size: int = 8 << 20) -> bytes:
    """A raw image with recognisable data at a few places and holes elsewhere; returns its contents."""
    data = bytearray(size)
    for offset, byte in ((0, 0x11), (1 << 20, 0x22), (size - 4096, 0x33)):
        data[offset:offset + 4096] = bytes([byte]) * 4096
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, 1 << 20, size - 4096):
            f.seek(offset)
            f.write(data[offset:offset + 4096])
    return bytes(data)


class RawPeer:
    """A hand-driven NBD client for protocol tests: does exactly what the test says, nothing more."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)

    @classmethod
    def connect(cls, path: Path) -> "RawPeer":
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        return cls(s)

    def close(self) -> None:
        self.sock.close()

    def greeting(self, client_flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        magic, opt, flags = P.HANDSHAKE_HEAD.unpack(P.recv_exact(self.sock, P.HANDSHAKE_HEAD.size))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(P.U32.pack(client_flags))
        return int(flags)

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION_HEAD.pack(P.IHAVEOPT, option, len(data)) + data)

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        out = []
        while True:
            magic, opt, kind, length = P.OPTION_REPLY_HEAD.unpack(P.recv_exact(self.sock, 20))
            assert magic == P.OPTION_REPLY_MAGIC and opt == option
            out.append((kind, P.recv_exact(self.sock, length)))
            if kind == P.REP_ACK or kind & P.REP_FLAG_ERROR:
                return out

    def go(self, export: str = "", *, structured: bool = True, contexts: tuple[str, ...] = ()) -> dict[str, int]:
        """Greeting, optional structured replies and contexts, NBD_OPT_GO. Returns the context ids."""
        self.greeting()
        ids: dict[str, int] = {}
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.replies(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
        if contexts:
            self.option(P.OPT_SET_META_CONTEXT, P.MetaQuery(export, contexts).pack())
            for kind, data in self.replies(P.OPT_SET_META_CONTEXT):
                if kind == P.REP_META_CONTEXT:
                    ids[data[4:].decode()] = P.U32.unpack_from(data)[0]
        self.option(P.OPT_GO, P.InfoRequest(export, ()).pack())
        assert self.replies(P.OPT_GO)[-1][0] == P.REP_ACK
        return ids

    def request(self, kind: int, offset: int, length: int, *, handle: int = 1, flags: int = 0,
                payload: bytes = b"") -> None:
        self.sock.sendall(P.Request(flags, kind, handle, offset, length).pack() + payload)

    def structured_reply(self) -> tuple[int, int, int, bytes]:
        """(flags, type, handle, payload) of the next structured chunk."""
        magic, flags, kind, handle, length = P.STRUCTURED_REPLY.unpack(P.recv_exact(self.sock, 20))
        assert magic == P.STRUCTURED_REPLY_MAGIC
        return flags, kind, handle, P.recv_exact(self.sock, length)

    def simple_reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, handle = P.SIMPLE_REPLY.unpack(P.recv_exact(self.sock, 16))
        assert magic == P.SIMPLE_REPLY_MAGIC
        return error, handle, P.recv_exact(self.sock, data_length) if not error else b""

    def error_of(self) -> int:
        """The NBD error of the next (structured) reply, 0 for success (reads its data)."""
        while True:
            flags, kind, _, payload = self.structured_reply()
            if kind in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
                return int(P.U32.unpack_from(payload)[0])
            if flags & P.REPLY_FLAG_DONE:
                return 0

    def is_closed(self, timeout: float = TIMEOUT) -> bool:
        """True when the server closed the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

