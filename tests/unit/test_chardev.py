"""Character backends: spec parsing, file/socket/stdio backends, flow control into a real UART."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from pyemu.chardev import (
    ChardevError,
    ChardevTimeoutError,
    FileSpec,
    NoneSpec,
    NullSpec,
    SocketSpec,
    StdioSpec,
    open_chardev,
    parse_chardev_spec,
)
from pyemu.chardev.escape import EscapeCommand, EscapeDecoder
from pyemu.chardev.null import NullBackend
from pyemu.chardev.socket import SocketBackend
from pyemu.chardev.stdio import StdioBackend
from pyemu.errors import ConfigError
from pyemu.hw.char import serial as s
from pyemu.hw.char.serial import Serial16550
from pyemu.hw.core.irq import IrqLine
from pyemu.system.timers import TimerQueue

TIMEOUT = 3.0


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class Collector:
    """A receiver that takes everything (or at most ``limit`` bytes a call)."""

    def __init__(self, limit: int | None = None) -> None:
        self.data = bytearray()
        self.limit = limit
        self.lock = threading.Lock()

    def __call__(self, chunk: bytes) -> int:
        with self.lock:
            take = len(chunk) if self.limit is None else min(self.limit, len(chunk))
            self.data += chunk[:take]
            return take


def read_available(fd: int, want: int, timeout: float = TIMEOUT) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while len(out) < want and time.monotonic() < deadline:
        try:
            out += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.005)
    return bytes(out)


def recv_exactly(conn: socket.socket, want: int) -> bytes:
    conn.settimeout(TIMEOUT)
    out = bytearray()
    while len(out) < want:
        chunk = conn.recv(4096)
        if not chunk:
            break
        out += chunk
    return bytes(out)


# -- spec parsing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("stdio", StdioSpec()),
        ("null", NullSpec()),
        ("none", NoneSpec()),
        ("file:/tmp/out.log", FileSpec("/tmp/out.log")),
        ("file:/tmp/a,b", FileSpec("/tmp/a,b")),
        ("unix:/tmp/s", SocketSpec("unix", path="/tmp/s")),
        ("unix:/tmp/s,server", SocketSpec("unix", path="/tmp/s", server=True, wait=True)),
        ("unix:/tmp/s,server,nowait", SocketSpec("unix", path="/tmp/s", server=True, wait=False)),
        ("unix:/tmp/s,server=on,wait=off", SocketSpec("unix", path="/tmp/s", server=True, wait=False)),
        ("unix:/tmp/a,,b,server", SocketSpec("unix", path="/tmp/a,b", server=True)),
        ("tcp:localhost:4444,server,nowait",
         SocketSpec("tcp", host="localhost", port=4444, server=True, wait=False)),
        ("tcp::4444,server", SocketSpec("tcp", host="", port=4444, server=True)),
        ("tcp:[::1]:5555", SocketSpec("tcp", host="::1", port=5555)),
        ("tcp:127.0.0.1:23,nodelay", SocketSpec("tcp", host="127.0.0.1", port=23, nodelay=True)),
    ],
)
def test_parse_valid_specs(text: str, expected: object) -> None:
    spec = parse_chardev_spec(text)
    assert spec == expected
    assert parse_chardev_spec(str(spec)) == spec  # str() is a spec string again


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "empty"),
        ("stdoi", "unknown character device"),
        ("file:", "needs a path"),
        ("unix:", "socket path"),
        ("unix:/tmp/s,nowait", "only valid with 'server'"),
        ("unix:/tmp/s,server,bogus", "unknown socket option 'bogus'"),
        ("unix:/tmp/s,server=maybe", "expects 'on' or 'off'"),
        ("unix:/tmp/s,server,server", "given twice"),
        ("unix:/tmp/s,,", ""),  # trailing ",," is a comma in the path: valid, checked below
        ("unix:/tmp/s,nodelay", "tcp: sockets only"),
        ("unix:/" + "x" * 200, "at most 107"),
        ("tcp:4444", "HOST:PORT"),
        ("tcp:host:port", "not a number"),
        ("tcp:host:70000,server", "out of range"),
        ("tcp:host:0", "other than 0"),
        ("tcp:::1:80", "brackets"),
        ("tcp:[::1:80", "[IPV6]:PORT"),
        ("pty", "not supported"),
        ("mon:stdio", "not supported"),
        ("stdio:x", "takes no options"),
        ("unix:/tmp/s,,server,", "stray comma"),
    ],
)
def test_parse_malformed_specs(text: str, fragment: str) -> None:
    if text == "unix:/tmp/s,,":
        assert parse_chardev_spec(text) == SocketSpec("unix", path="/tmp/s,")
        return
    with pytest.raises(ConfigError) as info:
        parse_chardev_spec(text, option="-serial")
    assert fragment in str(info.value)
    assert info.value.option == "-serial"
    assert str(info.value).startswith("-serial ")


# -- simple backends ----------------------------------------------------------------------------------------
def test_file_backend_truncates_like_qemu_or_appends_on_request(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    path.write_bytes(b"old run\n")
    with open_chardev(f"file:{path}") as backend:
        backend.write(b"first\r\n")
    assert path.read_bytes() == b"first\r\n"
    with open_chardev(FileSpec(str(path), append=True)) as backend:
        backend.write(b"second\r\n")
        backend.write(b"")
    assert path.read_bytes() == b"first\r\nsecond\r\n"


def test_file_backend_open_error_is_typed(tmp_path: Path) -> None:
    with pytest.raises(ChardevError) as info:
        open_chardev(f"file:{tmp_path}/missing-dir/out.log")
    assert info.value.spec.startswith("file:")
    assert isinstance(info.value.__cause__, OSError)


def test_null_and_none_discard_output() -> None:
    for text in ("null", "none"):
        backend = open_chardev(text)
        assert isinstance(backend, NullBackend)
        backend.write(b"gone")
        assert backend.bytes_discarded == 4
        backend.close()
        backend.close()  # idempotent


# -- escape decoder -----------------------------------------------------------------------------------------
def test_escape_decoder_commands_literals_and_split_prefix() -> None:
    decoder = EscapeDecoder()
    assert decoder.feed(b"ls\r") == [b"ls\r"]
    assert decoder.feed(b"a\x01\x01b") == [b"a\x01b"]
    assert decoder.feed(b"x\x01") == [b"x"]  # prefix at the end of one read ...
    assert decoder.feed(b"x") == [EscapeCommand.QUIT]  # ... command at the start of the next
    assert decoder.feed(b"1\x01h2") == [b"1", EscapeCommand.HELP, b"2"]
    assert decoder.feed(b"\x01zq") == [b"q"]  # unknown command: swallowed with its prefix


# -- stdio backend ------------------------------------------------------------------------------------------
def make_uart() -> tuple[Serial16550, TimerQueue]:
    timers = TimerQueue(clock=lambda: 0)
    uart = Serial16550(IrqLine(), timers)
    return uart, timers


def test_stdio_pipe_forwards_bytes_without_escapes_and_survives_eof() -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    quits: list[int] = []
    backend = StdioBackend(stdin_fd=in_r, stdout_fd=out_w, on_quit=lambda: quits.append(1))
    try:
        assert not backend.raw_mode
        got = Collector()
        backend.set_receiver(got)
        os.write(in_w, b"echo hi\n\x01x")
        os.close(in_w)  # EOF
        assert wait_until(lambda: backend.input_ended and bytes(got.data) == b"echo hi\n\x01x")
        assert quits == []  # no escape handling on a pipe, and EOF does not quit
        backend.write(b"guest output\r\n")
        assert read_available(out_r, 14) == b"guest output\r\n"
    finally:
        backend.close()
        for fd in (in_r, out_r, out_w):
            os.close(fd)


def test_input_is_held_until_the_uart_has_room() -> None:
    """Flow control: 40 bytes typed into a 16-byte FIFO arrive complete and in order."""
    uart, timers = make_uart()
    uart.write(s.FCR, 1, s.FCR_ENABLE)
    in_r, in_w = os.pipe()
    backend = StdioBackend(stdin_fd=in_r, stdout_fd=2)
    try:
        backend.attach(uart, timers.lock)
        typed = bytes(range(0x20, 0x48))
        os.write(in_w, typed)
        assert wait_until(lambda: uart.can_receive() == 0)
        assert wait_until(lambda: backend.pending_input == len(typed) - 16)
        received = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while len(received) < len(typed) and time.monotonic() < deadline:
            with timers.lock:
                if uart.read(s.LSR, 1) & s.LSR_DR:
                    received.append(uart.read(s.RBR, 1))
                    continue
            time.sleep(0.002)
        assert bytes(received) == typed
        assert uart.state().stats.overruns == 0
        backend.detach()
    finally:
        backend.close()
        os.close(in_r)
        os.close(in_w)


def test_stdio_tty_raw_mode_escapes_and_restore() -> None:
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON and before[3] & termios.ECHO
    quits: list[str] = []
    backend = StdioBackend(stdin_fd=slave, stdout_fd=slave, on_quit=lambda: quits.append("quit"),
                           install_signal_handlers=False)
    try:
        assert backend.raw_mode
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not raw[0] & termios.ICRNL
        got = Collector()
        backend.set_receiver(got)
        os.write(master, b"ab\x01\x01c\x03")  # Ctrl-A Ctrl-A types one Ctrl-A; Ctrl-C goes to the guest
        assert wait_until(lambda: bytes(got.data) == b"ab\x01c\x03")
        os.write(master, b"\x01h")
        assert b"exit emulator" in read_available(master, 40)
        os.write(master, b"\x01x")
        assert wait_until(lambda: quits == ["quit"])
        assert backend.quit_requested
        assert bytes(got.data) == b"ab\x01c\x03"  # the escape never reached the guest
    finally:
        backend.close()
    after = termios.tcgetattr(slave)
    assert after == before
    os.close(master)
    os.close(slave)


CHILD = r"""
import os, signal, sys, time
from pyemu.chardev.stdio import StdioBackend
backend = StdioBackend()
os.write(1, b"READY\n")
mode = sys.argv[1]
if mode == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
elif mode == "exception":
    raise RuntimeError("boom")
"""


@pytest.mark.parametrize("mode,check", [("signal", lambda rc: rc == -15), ("exception", lambda rc: rc == 1)])
def test_terminal_restored_when_process_dies(mode: str, check: Callable[[int], bool]) -> None:
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=slave, stdout=slave,
                             stderr=subprocess.DEVNULL, close_fds=True)
    try:
        assert b"READY" in read_available(master, 6, timeout=10)
        child.wait(timeout=10)
        assert check(child.returncode), child.returncode
        after = termios.tcgetattr(slave)
        assert after[3] & termios.ICANON and after[3] & termios.ECHO
        assert after == before
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
        os.close(slave)


# -- socket backends ----------------------------------------------------------------------------------------
def connect_unix(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(TIMEOUT)
    conn.connect(path)
    return conn


def test_unix_server_nowait_exchanges_data_and_serves_one_client_at_a_time(tmp_path: Path) -> None:
    path = str(tmp_path / "console.sock")
    backend = open_chardev(f"unix:{path},server,nowait")
    assert isinstance(backend, SocketBackend)
    try:
        got = Collector()
        backend.set_receiver(got)
        backend.write(b"before anyone listens")  # dropped, like QEMU
        assert backend.bytes_dropped == len(b"before anyone listens")
        first = connect_unix(path)
        assert backend.wait_connected(TIMEOUT)
        backend.write(b"login: ")
        assert recv_exactly(first, 7) == b"login: "
        first.sendall(b"root\n")
        assert wait_until(lambda: bytes(got.data) == b"root\n")
        second = connect_unix(path)  # waits in the backlog while the first is connected
        backend.write(b"#")
        assert recv_exactly(first, 1) == b"#"
        first.close()
        assert wait_until(lambda: backend.connected and backend._client is not None
                          and backend._client.fileno() >= 0 and _serves(backend, second))
        second.close()
    finally:
        backend.close()
    assert not os.path.exists(path)  # the socket file is removed on close


def _serves(backend: SocketBackend, conn: socket.socket) -> bool:
    """True once ``conn`` (not an earlier client) receives what the backend writes."""
    backend.write(b"?")
    conn.settimeout(0.05)
    try:
        return conn.recv(16) == b"?"
    except (TimeoutError, BlockingIOError):
        return False


def test_unix_server_wait_blocks_until_a_client_connects(tmp_path: Path) -> None:
    path = str(tmp_path / "wait.sock")
    clients: list[socket.socket] = []

    def connect_later() -> None:
        assert wait_until(lambda: os.path.exists(path))
        clients.append(connect_unix(path))

    helper = threading.Thread(target=connect_later)
    helper.start()
    notices: list[str] = []
    backend = SocketBackend(parse_chardev_spec(f"unix:{path},server"), connect_timeout=TIMEOUT,
                            notice=notices.append)  # type: ignore[arg-type]
    helper.join(TIMEOUT)
    try:
        assert backend.connected
        assert notices and "waiting for connection" in notices[0]
        backend.write(b"hello")
        assert recv_exactly(clients[0], 5) == b"hello"
    finally:
        backend.close()
        for conn in clients:
            conn.close()


def test_unix_server_wait_times_out_cleanly(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(ChardevTimeoutError):
        SocketBackend(SocketSpec("unix", path=path, server=True), connect_timeout=0.1, notice=None)
    assert not os.path.exists(path)


def test_unix_server_replaces_stale_socket_but_not_a_regular_file(tmp_path: Path) -> None:
    stale = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)
    leftover.close()
    backend = open_chardev(f"unix:{stale},server,nowait")
    backend.close()
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(ChardevError):
        open_chardev(f"unix:{regular},server,nowait")
    assert regular.read_text() == "keep me"


def test_unix_client_connects_to_a_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "peer.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    backend = open_chardev(f"unix:{path}", connect_timeout=TIMEOUT)
    try:
        peer, _ = listener.accept()
        got = Collector()
        backend.set_receiver(got)
        backend.write(b"out")
        assert recv_exactly(peer, 3) == b"out"
        peer.sendall(b"in")
        assert wait_until(lambda: bytes(got.data) == b"in")
        peer.close()
        assert wait_until(lambda: not backend.connected)
        backend.write(b"dropped")
        assert backend.bytes_dropped >= 7
    finally:
        backend.close()
        listener.close()
    assert os.path.exists(path)  # a client never removes the peer's socket


def test_unix_client_connect_failure_is_typed(tmp_path: Path) -> None:
    with pytest.raises(ChardevError) as info:
        open_chardev(f"unix:{tmp_path}/absent.sock", connect_timeout=1)
    assert isinstance(info.value.__cause__, OSError)


def test_tcp_server_on_an_ephemeral_port() -> None:
    backend = open_chardev("tcp:127.0.0.1:0,server,nowait")
    assert isinstance(backend, SocketBackend)
    try:
        host, port = backend.address  # type: ignore[misc]
        assert port > 0
        got = Collector()
        backend.set_receiver(got)
        client = socket.create_connection((host, port), timeout=TIMEOUT)
        assert backend.wait_connected(TIMEOUT)
        client.sendall(b"tcp in")
        assert wait_until(lambda: bytes(got.data) == b"tcp in")
        backend.write(b"tcp out")
        assert recv_exactly(client, 7) == b"tcp out"
        client.close()
    finally:
        backend.close()


def test_slow_client_output_is_bounded(tmp_path: Path) -> None:
    path = str(tmp_path / "slow.sock")
    backend = SocketBackend(SocketSpec("unix", path=path, server=True, wait=False), output_limit=4096)
    try:
        client = connect_unix(path)
        assert backend.wait_connected(TIMEOUT)
        start = time.monotonic()
        for _ in range(2000):  # ~2 MB the client never reads: must neither block nor grow without bound
            backend.write(b"x" * 1024)
        assert time.monotonic() - start < 1.5
        assert len(backend._output) <= 4096
        assert backend.bytes_dropped > 0
        client.close()
    finally:
        backend.close()


def test_input_waits_while_no_receiver_is_set(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    backend = open_chardev(f"unix:{path},server,nowait")
    try:
        client = connect_unix(path)
        assert backend.wait_connected(TIMEOUT)
        client.sendall(b"early")
        time.sleep(0.05)
        got = Collector(limit=2)  # and a receiver that takes little at a time
        backend.set_receiver(got)
        assert wait_until(lambda: bytes(got.data) == b"early")
        client.close()
    finally:
        backend.close()
