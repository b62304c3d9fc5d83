"""virtio-vsock seen from a Linux guest under the software CPU, with host programs on the Unix sockets.

A small static C program (built here with gcc, put into the guest by appending a second cpio archive to
the cached initramfs -- Linux unpacks concatenated archives in order) plays the guest application:

* ``vsock-test listen PORT``: accept one AF_VSOCK connection, echo everything upper-cased until EOF;
* ``vsock-test connect CID PORT``: connect, send a line, half-close, print the reply.

The host side is what a user of Firecracker-style hybrid vsock does: connect to ``uds-path`` and send
``CONNECT 1234\\n`` (answer ``OK <port>\\n``), and listen on ``<uds-path>_5000`` for the guest. Half a
megabyte each way crosses the 256 KiB credit windows several times; a connection to a port nobody
listens on is refused (ECONNRESET in the guest).
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from boot_helpers import shell

from pyemu.guest.cpio import CpioArchive

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
IO_TIMEOUT = 120
VSOCK_MODULES = ("vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport")

PROGRAM = r"""
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int write_all(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        buf += n; len -= (size_t)n;
    }
    return 0;
}

static char buf[65536];

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 3 && strcmp(argv[1], "listen") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm addr = {0};
        addr.svm_family = AF_VSOCK;
        addr.svm_cid = VMADDR_CID_ANY;
        addr.svm_port = (unsigned)strtoul(argv[2], NULL, 10);
        if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) || listen(s, 1)) {
            printf("vsock-test: listen failed: %s\n", strerror(errno));
            return 1;
        }
        printf("vsock-test: listening on port %u\n", addr.svm_port);
        struct sockaddr_vm peer = {0};
        socklen_t peer_len = sizeof peer;
        int c = accept(s, (struct sockaddr *)&peer, &peer_len);
        if (c < 0) { printf("vsock-test: accept failed: %s\n", strerror(errno)); return 1; }
        printf("vsock-test: accepted cid %u port %u\n", peer.svm_cid, peer.svm_port);
        long total = 0;
        for (;;) {
            ssize_t n = read(c, buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            for (ssize_t i = 0; i < n; i++) buf[i] = (char)toupper((unsigned char)buf[i]);
            if (write_all(c, buf, (size_t)n)) { printf("vsock-test: write failed: %s\n", strerror(errno)); return 1; }
            total += n;
        }
        close(c);
        printf("vsock-test: echoed %ld bytes\n", total);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "connect") == 0) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        struct sockaddr_vm addr = {0};
        addr.svm_family = AF_VSOCK;
        addr.svm_cid = (unsigned)strtoul(argv[2], NULL, 10);
        addr.svm_port = (unsigned)strtoul(argv[3], NULL, 10);
        if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr)) {
            printf("vsock-test: connect failed: %s\n", strerror(errno));
            return 1;
        }
        const char *msg = "hello from the guest";
        if (write_all(s, msg, strlen(msg))) { printf("vsock-test: write failed: %s\n", strerror(errno)); return 1; }
        shutdown(s, SHUT_WR);
        size_t got = 0;
        for (;;) {
            ssize_t n = read(s, buf + got, sizeof buf - 1 - got);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            got += (size_t)n;
        }
        buf[got] = 0;
        printf("vsock-test: reply [%s]\n", buf);
        close(s);
        return 0;
    }
    printf("usage: vsock-test listen PORT | connect CID PORT\n");
    return 2;
}
"""

def _compile(tmp_path: Path) -> bytes:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed (needed to build the guest's vsock test program)")
    source = tmp_path / "vsock-test.c"
    source.write_text(PROGRAM)
    binary = tmp_path / "vsock-test"
    done = subprocess.run([gcc, "-static", "-O2", "-o", str(binary), str(source)], capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"gcc -static cannot build the guest program here (static libc missing?): "
                    f"{done.stderr.strip()[-300:]}")
    return binary.read_bytes()


def _initrd_with(cached: Path, files: dict[str, tuple[bytes, int]], out: Path) -> Path:
    """The cached initramfs with a second (gzip) cpio archive appended holding ``files``."""
    extra = CpioArchive()
    for name, (data, mode) in files.items():
        extra.add_file(name, data, mode)
    base = cached.read_bytes()
    base += b"\0" * (-len(base) % 4)  # the kernel skips NUL padding between archives
    out.write_bytes(base + gzip.compress(extra.to_bytes(), mtime=0))
    return out


def _wait_path(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def _host_listener(path: str, result: dict[str, object]) -> threading.Thread:
    """Accept one guest connection at ``path``: read until EOF, answer, close."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(IO_TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(IO_TIMEOUT)
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            result["received"] = data
            conn.sendall(b"host saw: " + data)
            conn.close()
        except OSError as exc:
            result["error"] = exc
        finally:
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_vsock_between_linux_and_host_programs(console, guest_assets, tmp_path):
    missing = [m for m in VSOCK_MODULES if m not in guest_assets.module_order]
    if missing:
        pytest.skip(f"the cached guest has no {', '.join(missing)} (built before vsock was added): run "
                    "'pyemu-guest fetch' to rebuild it")
    initrd = _initrd_with(guest_assets.initrd, {"vsock-test": (_compile(tmp_path), 0o755)},
                          tmp_path / "initrd.gz")
    sockdir = tempfile.mkdtemp(prefix="pyemu-vsock-", dir="/tmp")  # short: sun_path is 107 bytes
    uds = os.path.join(sockdir, "vm.vsock")
    argv = ["-machine", "microvm", "-accel", "tcg", "-m", "256M", "-kernel", str(guest_assets.vmlinux),
            "-initrd", str(initrd), "-append", "console=ttyS0", "-nographic",
            "-device", f"vhost-vsock-device,guest-cid=3,uds-path={uds}"]
    vm = console(argv)
    try:
        vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
        vm.expect(b"# ", 60)
        _wait_path(uds, 10)
        status, out = shell(vm, "ls /sys/bus/virtio/drivers/ && cat /sys/bus/virtio/devices/*/device")
        assert status == 0 and "vmw_vsock_virtio_transport" in out and "0x0013" in out, out

        # Host -> guest: CONNECT, OK, then 512 KiB through the echo server and back.
        start = len(vm.output)
        vm.send("/vsock-test listen 1234 &\n")
        vm.expect(b"vsock-test: listening on port 1234", 60, after=start)
        host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host.settimeout(IO_TIMEOUT)
        host.connect(uds)
        host.sendall(b"CONNECT 1234\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = host.recv(1)
            assert chunk, f"closed before the OK line (got {line!r})"
            line += chunk
        assert line.startswith(b"OK ") and int(line[3:]) >= 1 << 30, line
        blob = (b"the quick brown fox jumps over the lazy vsock. " * 11200)[: 512 * 1024]

        def send_all() -> None:
            host.sendall(blob)
            host.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        echoed = b""
        while chunk := host.recv(65536):
            echoed += chunk
        sender.join(IO_TIMEOUT)
        host.close()
        assert len(echoed) == len(blob) and echoed == blob.upper()
        vm.expect(b"vsock-test: echoed %d bytes" % len(blob), 60, after=start)
        assert b"vsock-test: accepted cid 2 port " + line[3:].strip() in vm.output

        # Guest -> host: a listener at <uds>_5000.
        result: dict[str, object] = {}
        listener = _host_listener(f"{uds}_5000", result)
        status, out = shell(vm, "/vsock-test connect 2 5000", timeout=IO_TIMEOUT)
        listener.join(IO_TIMEOUT)
        assert status == 0 and "vsock-test: reply [host saw: hello from the guest]" in out, (out, result)
        assert result.get("received") == b"hello from the guest"

        # Nobody listens on <uds>_5001: the guest's connect is refused.
        status, out = shell(vm, "/vsock-test connect 2 5001")
        assert status == 1 and "vsock-test: connect failed: Connection reset by peer" in out, out

        vm.send("poweroff -f\n")
        assert vm.wait(60) == 0
        assert not os.path.exists(uds)  # pyemu removed its socket
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
