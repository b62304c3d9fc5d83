"""``-serial stdio`` on a real terminal: raw mode while the VM runs, keys reach the guest shell, Ctrl-A x
quits, and the terminal settings are restored on exit."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.assets]


def read_until(fd: int, needle: bytes, timeout: float, seen: bytearray) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; tail: {bytes(seen[-800:])!r}")
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                raise AssertionError(f"terminal closed before {needle!r}; tail: {bytes(seen[-800:])!r}")


def test_interactive_console_on_a_terminal(guest_assets):
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyemu.system.main", "-kernel", str(guest_assets.vmlinux),
         "-initrd", str(guest_assets.initrd), "-append", "console=ttyS0", "-nographic"],
        stdin=slave, stdout=slave, stderr=subprocess.PIPE, start_new_session=True)
    seen = bytearray()
    try:
        read_until(master, b"pyemu-guest: init reached", 240, seen)
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw mode while the VM runs
        read_until(master, b"# ", 60, seen)
        os.write(master, b'echo h""i-$((40+2))\r')  # Enter is CR on a raw terminal
        read_until(master, b"hi-42", 60, seen)
        os.write(master, b"\x01x")  # Ctrl-A x
        assert proc.wait(timeout=30) == 0
        assert termios.tcgetattr(slave) == before  # terminal restored exactly
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]
        os.close(master)
        os.close(slave)
