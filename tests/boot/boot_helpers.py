"""Helpers of the Linux boot tests: a pyemu process driven over its console, commands at the guest's
shell, one-shot QMP commands. A module of its own (not conftest): ``from conftest import`` picks whichever
test directory's conftest was imported first when several directories run together."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time


class ConsoleSession:
    """A pyemu child process whose COM1 is its stdin/stdout (``-serial stdio`` on pipes)."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyemu.system.main", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.output = b""

    def expect(self, needle: bytes, timeout: float, *, after: int = 0) -> bytes:
        """Read the console until ``needle`` appears at or after offset ``after``; return everything
        read so far."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while needle not in self.output[after:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; console tail:\n"
                                     f"{self.output[-3000:].decode(errors='replace')}")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"pyemu exited ({self.proc.wait()}) before {needle!r}; tail:\n"
                                         f"{self.output[-3000:].decode(errors='replace')}\nstderr:\n"
                                         f"{self.proc.stderr.read().decode(errors='replace')}")
                self.output += chunk
        return self.output

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


_marker_count = [0]
KERNEL_LOG_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")


def shell(vm: ConsoleSession, command: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``command`` at the guest's busybox shell; returns its exit status and output (stdout and
    stderr as the console shows them). The start and end markers are computed by the shell (``$((...))``),
    so the echo of the typed line -- which the terminal may wrap -- can never be mistaken for them."""
    _marker_count[0] += 1
    tag = 7000 + 2 * _marker_count[0]
    start = len(vm.output)
    vm.send(f"echo \"@@$(({tag}+1))@@\"; {command}; echo \"@@$(({tag}+2))@@rc=$?@@\"\n")
    begin_needle = f"@@{tag + 1}@@".encode()
    end_needle = f"@@{tag + 2}@@rc=".encode()
    out = vm.expect(end_needle, timeout, after=start)
    end = out.index(end_needle, start)
    vm.expect(b"@@", 10, after=end + len(end_needle))
    status = int(vm.output[end + len(end_needle):].split(b"@@", 1)[0])
    begin = out.index(begin_needle, start) + len(begin_needle)
    text = out[begin:end].decode(errors="replace").replace("\r", "")
    # The kernel prints to the same console whenever it likes (on a busy host: "clocksource: Long readout
    # interval..."); its lines are not the command's output.
    lines = [line for line in text.split("\n") if not KERNEL_LOG_LINE.match(line)]
    return status, "\n".join(lines).strip("\n")


def qmp(sock: "os.PathLike[str] | str", command: str, args: dict | None = None):  # type: ignore[no-untyped-def]
    """Run one QMP command on a pyemu's socket with the real ``qemu.qmp`` client (a fresh session each
    time, so a test reads like a script of commands); returns the command's value."""
    import asyncio

    from qemu.qmp import QMPClient

    async def call():  # type: ignore[no-untyped-def]
        client = QMPClient("boot-test")
        await client.connect(str(sock))
        try:
            return await client.execute(command, args or {})
        finally:
            await client.disconnect()
    return asyncio.run(call())
