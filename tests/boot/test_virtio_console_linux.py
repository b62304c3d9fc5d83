"""virtio-console seen from a Linux guest under the software CPU: an interactive shell on ``/dev/hvc0``,
driven from the host through a ``-chardev socket`` as a user with ``socat``/``nc -U`` would.

The guest's virtio_console driver runs the whole MULTIPORT handshake (DEVICE_READY, PORT_ADD,
PORT_READY, CONSOLE_PORT, PORT_NAME, PORT_OPEN) before ``/dev/hvc0`` and the port's sysfs name exist, so
seeing both proves the control path; a command typed into the socket and its output read back from it
proves both data queues and the input flow control. COM1 (``-nographic``) stays the setup channel.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time

import pytest

from boot_helpers import ConsoleSession, shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240  # seconds; a boot takes well under a minute on our machines
PORT_NAME = "org.pyemu.console.0"


class SocketPeer:
    """The host end of the console socket: everything read is kept, every wait is bounded."""

    def __init__(self, path: str, vm: ConsoleSession, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if vm.proc.poll() is not None or time.monotonic() > deadline:
                    self.sock.close()
                    stderr = vm.proc.stderr.read().decode(errors="replace") if vm.proc.poll() is not None else ""
                    raise AssertionError(f"pyemu never listened on {path}; stderr:\n{stderr}") from None
                time.sleep(0.05)
        self.output = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def expect(self, needle: bytes, timeout: float, *, after: int = 0) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output[after:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {needle!r} on the console socket; got:\n"
                                     f"{self.output[-2000:].decode(errors='replace')}")
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"pyemu closed the console socket before {needle!r}; got:\n"
                                     f"{self.output[-2000:].decode(errors='replace')}")
            self.output += chunk
        return self.output

    def close(self) -> None:
        self.sock.close()


def test_interactive_shell_on_hvc0_over_a_socket_chardev(console, guest_assets):
    # A short directory: a Unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    directory = tempfile.mkdtemp(prefix="pyemu-vcon-")
    path = os.path.join(directory, "c0.sock")
    peer: SocketPeer | None = None
    try:
        vm: ConsoleSession = console([
            "-machine", "microvm", "-accel", "tcg", "-m", "512M",
            "-kernel", str(guest_assets.vmlinux), "-initrd", str(guest_assets.initrd),
            "-append", "console=ttyS0", "-nographic",
            "-chardev", f"socket,id=c0,path={path},server=on,wait=off",
            "-device", "virtio-serial-device",
            "-device", f"virtconsole,chardev=c0,name={PORT_NAME}",
        ])
        peer = SocketPeer(path, vm, timeout=60)  # wait=off: pyemu listens and boots without us
        vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
        vm.expect(b"# ", 60)
        # The handshake completes asynchronously after insmod: wait (bounded) for the console port.
        status, out = shell(vm, "for i in $(seq 300); do [ -e /dev/hvc0 ] && break; sleep 0.1; done; "
                                "ls /dev/hvc0 && cat /sys/class/virtio-ports/vport*p0/name")
        assert status == 0 and out.split() == ["/dev/hvc0", PORT_NAME], out

        # An interactive shell on hvc0 in its own session (hvc0 becomes its controlling terminal).
        vm.send("setsid sh -c 'exec sh </dev/hvc0 >/dev/hvc0 2>&1' &\n")
        peer.expect(b"# ", 60)
        # The quotes make the typed line (echoed by the guest's tty) differ from the output.
        mark = len(peer.output)
        peer.send('echo vi""rtio-$((6*7))\n')
        peer.expect(b"virtio-42", 60, after=mark)
        mark = len(peer.output)
        peer.send('echo "t""ty=$(tty)"\n')
        out = peer.expect(b"tty=/dev/", 60, after=mark)
        peer.expect(b"\n", 10, after=out.index(b"tty=/dev/", mark))
        assert b"tty=/dev/hvc0" in peer.output[mark:], peer.output[mark:]
        # Several lines typed at once (more than one receive buffer's worth in flight): none is lost. Each
        # command writes to a file, and the last one prints it: printed while input still arrives, the
        # tty's echo of later lines could land inside earlier lines' output.
        mark = len(peer.output)
        peer.send("".join(f'echo "li""ne-{n}" >> /tmp/typed\n' for n in range(20))
                  + 'echo "be""gin"; cat /tmp/typed; echo "e""nd"\n')
        block = re.search(rb"begin\r\n(.*?)end\r\n", peer.expect(b"end\r\n", 60, after=mark)[mark:], re.S)
        assert block is not None, peer.output[mark:]
        assert block.group(1).split() == [f"line-{n}".encode() for n in range(20)], peer.output[mark:]

        vm.send("poweroff -f\n")
        assert vm.wait(60) == 0
    finally:
        if peer is not None:
            peer.close()
        shutil.rmtree(directory, ignore_errors=True)
