"""Debian's 6.1 guest on a virtio-net NIC backed by a TAP: link, ping, and 1 MiB each way with busybox nc.

Everything happens inside a network namespace the test creates (``pyemu-test-<pid>``) and always deletes:
pyemu runs in it (``ip netns exec``), creates ``tap0`` there (``-netdev tap,ifname=tap0,script=no``), the
test gives tap0 the namespace-private address 10.0.2.2/24 and runs its TCP endpoints there too. No
address or route is added anywhere else, and no traffic leaves the namespace.

The guest is driven over its serial console like the other Linux boot tests. Data integrity is checked
with MD5 on both ends; the host side reports the transfer time, which the test prints (pytest -s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from boot_helpers import ConsoleSession, shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
COMMAND_TIMEOUT = 120.0
TRANSFER_TIMEOUT = 300
BULK_BYTES = 1 << 20
HOST_ADDR = "10.0.2.2"
GUEST_ADDR = "10.0.2.15"

# A TCP endpoint on the namespace's side of tap0: "recv" counts and hashes what the guest sends until
# EOF; "send" sends BULK random bytes and times until the guest's TCP acknowledged them all. Both
# report the MD5 of what went through.
ENDPOINT = """
import fcntl, hashlib, json, os, socket, struct, sys, termios, time
mode, addr, port, size, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
server = socket.create_server((addr, port))
server.settimeout(timeout)
print("listening", flush=True)
conn, peer = server.accept()
conn.settimeout(timeout)
start = time.monotonic()
digest = hashlib.md5()
count = 0
if mode == "recv":
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        digest.update(chunk)
        count += len(chunk)
else:
    data = os.urandom(size)
    digest.update(data)
    conn.sendall(data)
    count = size
    # Done when the guest has acknowledged every byte (the guest's nc half-closed at once, so its FIN
    # says nothing about the data): the send queue, unsent plus unacknowledged, is empty.
    while struct.unpack("i", fcntl.ioctl(conn, termios.TIOCOUTQ, bytes(4)))[0]:
        if time.monotonic() - start > timeout:
            raise TimeoutError("the guest did not acknowledge the data")
        time.sleep(0.001)
elapsed = time.monotonic() - start
if mode == "send":
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(1 << 16):
        pass
conn.close()
print(json.dumps({"md5": digest.hexdigest(), "bytes": count, "seconds": elapsed}), flush=True)
"""


def _run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def namespace():
    """A network namespace of our own, deleted afterwards whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_NET_ADMIN) for a network namespace and a TAP device")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 'ip' is not installed")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    name = f"pyemu-test-{os.getpid()}"
    made = _run("ip", "netns", "add", name)
    if made.returncode:
        pytest.skip(f"'ip netns add' is unavailable here: {made.stderr.strip()}")
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        _run("ip", "netns", "delete", name)


class NamespacedSession(ConsoleSession):
    """A ConsoleSession whose pyemu runs inside ``namespace``."""

    def __init__(self, namespace: str, argv: list[str]) -> None:  # noqa: D107 - same as the base
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", "pyemu.system.main", *argv],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.output = b""


class Endpoint:
    def __init__(self, namespace: str, mode: str, port: int) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", ENDPOINT, mode, HOST_ADDR, str(port),
             str(BULK_BYTES), str(TRANSFER_TIMEOUT)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the endpoint exits on its own accept timeout
        assert line.strip() == "listening", self.proc.stderr.read() if self.proc.stderr else line

    def result(self) -> dict[str, object]:
        out, err = self.proc.communicate(timeout=TRANSFER_TIMEOUT + 30)
        assert self.proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait_for_tap(namespace: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _run("ip", "-n", namespace, "link", "show", "tap0").returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("tap0 did not appear in the namespace")


def test_guest_pings_and_moves_a_mebibyte_each_way(namespace, guest_assets):
    vm = NamespacedSession(namespace, [
        "-machine", "microvm", "-accel", "tcg", "-m", "512M",
        "-kernel", str(guest_assets.vmlinux), "-initrd", str(guest_assets.initrd),
        "-append", "console=ttyS0", "-nographic",
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
    ])
    endpoints: list[Endpoint] = []
    try:
        boot = vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
        assert b"could not load virtio_net" not in boot
        vm.expect(b"# ", 60)
        _wait_for_tap(namespace)
        for argv in (("addr", "add", f"{HOST_ADDR}/24", "dev", "tap0"), ("link", "set", "tap0", "up")):
            done = _run("ip", "-n", namespace, *argv)
            assert done.returncode == 0, done.stderr

        status, text = shell(vm, "cat /sys/class/net/eth0/address")
        assert status == 0 and text.strip() == "52:54:00:12:34:56", text
        status, text = shell(vm, f"ip link set eth0 up && ip addr add {GUEST_ADDR}/24 dev eth0")
        assert status == 0, text
        status, text = shell(vm, f"ping -c 3 -W 10 {HOST_ADDR}", COMMAND_TIMEOUT)
        assert status == 0 and "3 packets transmitted, 3 packets received" in text, text

        # Guest -> host.
        status, text = shell(vm, f"dd if=/dev/urandom of=/tmp/up bs=1024 count={BULK_BYTES // 1024} 2>/dev/null "
                                 "&& md5sum /tmp/up", COMMAND_TIMEOUT)
        up_md5 = re.search(r"([0-9a-f]{32})\s+/tmp/up", text)
        assert status == 0 and up_md5 is not None, text
        receiver = Endpoint(namespace, "recv", 5001)
        endpoints.append(receiver)
        status, text = shell(vm, f"nc {HOST_ADDR} 5001 < /tmp/up", TRANSFER_TIMEOUT)
        assert status == 0, text
        up = receiver.result()
        assert up["bytes"] == BULK_BYTES and up["md5"] == up_md5.group(1), (up, up_md5.group(1))

        # Host -> guest.
        sender = Endpoint(namespace, "send", 5002)
        endpoints.append(sender)
        status, text = shell(vm, f"nc {HOST_ADDR} 5002 </dev/null >/tmp/down", TRANSFER_TIMEOUT)
        assert status == 0, text
        down = sender.result()
        status, text = shell(vm, "wc -c < /tmp/down; md5sum /tmp/down", COMMAND_TIMEOUT)
        down_md5 = re.search(r"([0-9a-f]{32})\s+/tmp/down", text)
        assert down_md5 is not None and down_md5.group(1) == down["md5"], (text, down)
        assert str(BULK_BYTES) in text, text

        print(f"\nvirtio-net under TCG: guest->host {BULK_BYTES / up['seconds'] / 1e6:.2f} MB/s "
              f"({up['seconds']:.2f} s), host->guest {BULK_BYTES / down['seconds'] / 1e6:.2f} MB/s "
              f"({down['seconds']:.2f} s)")
        vm.send("poweroff -f\n")
        assert vm.wait(60) == 0
    finally:
        for endpoint in endpoints:
            endpoint.close()
        vm.close()
