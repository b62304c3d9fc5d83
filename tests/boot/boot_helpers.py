"""Helpers of the Linux boot tests: a pyemu process driven over its console, commands at the guest's
shell, one-shot QMP commands. A module of its own (not conftest): ``from conftest import`` picks whichever
test directory's conftest was imported first when several directories run together."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest


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


#: Console lines that mean the guest kernel went wrong, whatever the test checks: an oops (an emulation bug
#: that kills one task, like the stale translation that made ``insmod button`` jump to 0, lets a boot reach
#: its shell), a panic, a module the init script failed to load. Not soft-lockup reports: a starved host
#: can make a healthy guest print those.
KERNEL_TROUBLE = re.compile(rb"Oops: |Kernel panic|kernel BUG at|general protection fault|"
                            rb"stack-protector: |pyemu-guest: could not load [^\r\n]*")


def kernel_trouble(output: bytes) -> list[str]:
    """The lines of ``output`` that match :data:`KERNEL_TROUBLE`."""
    return [line.decode(errors="replace").strip() for line in output.splitlines() if KERNEL_TROUBLE.search(line)]


_marker_count = [0]
KERNEL_LOG_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")
KERNEL_LOG_TAIL = re.compile(r"\[\s*\d+\.\d+\] .*$")  # a kernel message that began mid-line runs to its end


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
    # interval...", "random: crng init done"), also in the middle of a line the command is printing
    # ("12[   40.1] random: crng init done", seen in CI): its messages are not the command's output.
    lines = []
    for line in text.split("\n"):
        if KERNEL_LOG_LINE.match(line):
            continue
        lines.append(KERNEL_LOG_TAIL.sub("", line))
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


# -- a Linux guest (pyemu or QEMU's microvm) writing its disk while QMP drives block jobs --------------------
# Shared by the live-image tests (issue 11's backup, issue 12's snapshot/stream/commit/mirror): each scenario
# runs on pyemu and on qemu-system-x86_64 -M microvm booting the same guest, so QEMU validates the test.

BOOT_TIMEOUT = 240
JOB_TIMEOUT = 120.0
KiB = 1 << 10
MiB = 1 << 20
BLOCK = 64 * KiB
DISK_SIZE = 32 * MiB
KINDS = ["pyemu", pytest.param("qemu", marks=pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"))]


class QemuConsole(ConsoleSession):
    """QEMU's microvm booting the same Debian guest, console on stdio (the reference run). The TSC frequency
    is given on the kernel's command line: on a busy host its PIT calibration under TCG fails and the kernel
    then hangs waiting for a timer it never calibrated."""

    def __init__(self, argv: list[str]) -> None:  # noqa: D107 -- same pipes as the pyemu session
        from pyemu.guest.assets import find_assets

        assets = find_assets()
        assert assets is not None
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-no-user-config", "-display", "none",
             "-serial", "stdio", "-kernel", str(assets.directory / "vmlinuz"),
             "-initrd", str(assets.directory / "initramfs.cpio.gz"), "-append", "console=ttyS0 tsc_early_khz=2000000", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.output = b""


class Monitor:
    """One QMP session kept open for the VM's life: commands, and the events they cause."""

    def __init__(self, sock: Path) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline, f"no QMP socket {sock}"
            time.sleep(0.05)
        self.qmp = QEMUMonitorProtocol(str(sock))
        self.qmp.connect(negotiate=True)
        self.events: list[dict[str, Any]] = []
        self.closed = False

    def raw(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.qmp.cmd_raw(name, args or {})

    def __call__(self, name: str, args: dict[str, Any] | None = None) -> Any:
        reply = self.raw(name, args)
        assert "return" in reply, f"{name} {args}: {reply}"
        return reply["return"]

    def error(self, name: str, args: dict[str, Any]) -> str:
        """Run a command that must fail with GenericError; its message."""
        reply = self.raw(name, args)
        assert "error" in reply, f"{name} {args} succeeded: {reply}"
        assert reply["error"]["class"] == "GenericError", reply
        return str(reply["error"]["desc"])

    def wait_event(self, name: str, job: str, timeout: float = JOB_TIMEOUT) -> dict[str, Any]:
        """The first event ``name`` about job ``job`` (kept or still to come)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and event.get("data", {}).get("device") == job:
                    self.events.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {name} for {job}; events: {self.events}"
            pulled = self.qmp.pull_event(wait=float(max(remaining, 0.1)))
            if pulled is not None:
                self.events.append(pulled)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):  # the VM may be gone already
                self.qmp.close()


class Guest:
    """A booted VM (pyemu or QEMU) with a virtio disk (raw, or qcow2) on nodes ``f0`` (file) / ``d0`` (the
    format) under device ``vblk0``, its console and its QMP monitor. The disk is created on the first boot
    and kept for the next one in the same directory."""

    def __init__(self, kind: str, console: Callable[[list[str]], ConsoleSession], tmp: Path, fmt: str) -> None:
        self.kind = kind
        self.disk = tmp / f"disk.{fmt}"
        if not self.disk.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(self.disk), str(DISK_SIZE)], check=True)
        boots = len(list(tmp.glob("qmp*.sock")))
        sock = tmp / f"qmp{boots}.sock"  # one per boot: a socket file left by an exited VM is never reused
        argv = ["-m", "256M", "-qmp", f"unix:{sock},server=on,wait=off",
                "-blockdev", f"driver=file,node-name=f0,filename={self.disk}",
                "-blockdev", f"driver={fmt},node-name=d0,file=f0",
                "-device", "virtio-blk-device,drive=d0,id=vblk0"]
        if kind == "pyemu":
            self.vm = console(["-nographic", *argv])
        else:
            self.vm = QemuConsole(argv)
        try:
            self.vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
            self.vm.expect(b"# ", 60)
            self.mon = Monitor(sock)
        except BaseException:
            self.vm.close()  # the console fixture only knows pyemu's sessions
            raise

    def sh(self, command: str, timeout: float = 120) -> str:
        status, out = shell(self.vm, command, timeout)
        assert status == 0, f"{command}: {out}"
        return out

    def start_writer(self, blocks: int, stride: int = 37) -> None:
        """Background loop: iteration n writes a numbered 64 KiB block at block (n*stride) % blocks, O_DIRECT,
        and records n in /tmp/n once the write is done (renamed into place: a reader never sees it empty)."""
        self.sh("rm -f /tmp/stop; echo 0 > /tmp/n; (n=0; while [ ! -e /tmp/stop ]; do n=$((n+1)); "
                "printf 'block %08d\\n' $n > /tmp/w; head -c 65521 /dev/urandom >> /tmp/w; "
                f"dd if=/tmp/w of=/dev/vda bs=65536 seek=$(( (n*{stride}) % {blocks} )) count=1 "
                "oflag=direct conv=notrunc 2>/dev/null || echo FAIL >> /tmp/fail; echo $n > /tmp/n1; mv /tmp/n1 /tmp/n; "
                "done) >/dev/null 2>&1 & true")

    def written(self) -> int:
        return int(self.sh("cat /tmp/n").split()[-1])

    def wait_writes(self, count: int) -> None:
        """Let the writer loop complete ``count`` more writes."""
        target = self.written() + count
        deadline = time.monotonic() + 120
        while self.written() < target:
            assert time.monotonic() < deadline, "the guest's writer loop stalled"
            self.sh("sleep 0.5")

    def stop_writer(self) -> None:
        self.sh("touch /tmp/stop; wait; test ! -e /tmp/fail")

    def write(self, block: int, count: int = 1) -> None:
        """Foreground random write of ``count`` 64 KiB blocks at block ``block``."""
        self.sh(f"dd if=/dev/urandom of=/dev/vda bs=65536 seek={block} count={count} oflag=direct 2>/dev/null")

    def snapshot_disk(self, dest: Path) -> None:
        """Copy the disk image: the VM must be paused."""
        assert self.mon("query-status")["running"] is False
        shutil.copyfile(self.disk, dest)

    def power_off(self) -> None:
        self.mon.close()
        self.vm.send("poweroff -f\n")
        assert self.vm.wait(60) == 0

    def bitmaps(self) -> dict[str, dict[str, Any]]:
        (d0,) = [n for n in self.mon("query-named-block-nodes") if n["node-name"] == "d0"]
        return {b["name"]: b for b in d0.get("dirty-bitmaps", [])}


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=check)


def qemu_img_check(image: Path) -> None:
    result = run("qemu-img", "check", "-U", str(image), check=False)
    assert result.returncode == 0 and "No errors were found" in result.stdout, result.stdout + result.stderr


def qcow2(path: Path, *backing: str) -> Path:
    args = ["-b", backing[0], "-F", "qcow2"] if backing else []
    run("qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), str(DISK_SIZE))
    return path
