"""The default Linux guest under the software CPU is saved at its shell with a file in its RAM-backed root,
the VM quits, and a new VM started with ``-incoming file:`` answers at the same shell with the file still
there and its uptime continuing from where it was (not restarted, not jumped by the time in between)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

import pyemu
from pyemu.system.runstate import RunState

BOOT_TIMEOUT = 600.0
COMMAND_TIMEOUT = 120.0
MIGRATE_TIMEOUT = 120.0
_UPTIME = re.compile(r"UPTIME=(\d+\.\d+)")


def guest_uptime(vm: pyemu.VM) -> float:
    vm.console.send("printf 'UPTIME=%s\\n' $(cut -d' ' -f1 /proc/uptime)\n")
    return float(vm.console.expect(_UPTIME, timeout=COMMAND_TIMEOUT).group(1))


@pytest.mark.slow
@pytest.mark.assets
def test_linux_shell_and_its_files_survive_save_and_restore(guest_assets: object, short_dir: Path) -> None:
    state_file = short_dir / "linux.state"
    args = ("-m", "256M", "-accel", "tcg")
    with pyemu.VM(*args) as vm:
        vm.start()
        vm.console.expect("shell on the console", timeout=BOOT_TIMEOUT)
        vm.console.send("mkdir -p /tmp && echo kept-across-migration > /tmp/mig.txt\n")
        uptime_before = guest_uptime(vm)
        vm.execute("migrate", {"uri": f"file:{state_file}"})
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while (info := vm.execute("query-migrate"))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["status"] == "completed", info
        assert vm.state is RunState.POSTMIGRATE
        vm.quit()
    saved_at = time.monotonic()
    time.sleep(2.0)

    with pyemu.VM(*args, "-incoming", f"file:{state_file}") as vm:
        vm.start()
        restored_at = time.monotonic()
        vm.resume()  # a no-op when the restored VM already runs (QEMU: the source was running, no -S)
        assert vm.state is RunState.RUNNING
        vm.console.send("\n")
        vm.console.send("sed 's/-/_/g' /tmp/mig.txt\n")  # the echo of this line cannot match the pattern
        vm.console.expect("kept_across_migration", timeout=COMMAND_TIMEOUT)
        uptime_after = guest_uptime(vm)
        ran = time.monotonic() - restored_at
        vm.quit()
    assert uptime_after >= uptime_before  # the same boot, not a new one
    # Continued, without the seconds between save and restore (slack for the save's own commands).
    assert uptime_after - uptime_before < ran + 5.0


@pytest.mark.slow
@pytest.mark.assets
def test_linux_with_disk_io_in_flight_is_drained_and_the_disk_works_after(guest_assets: object,
                                                                          short_dir: Path) -> None:
    """A guest loop keeps writing its virtio disk while it is saved: the save drains the requests in
    flight (only ring indices travel), and after the restore the disk still serves writes and reads
    (shared storage: both VMs open the same image)."""
    disk = short_dir / "disk.raw"
    disk.write_bytes(bytes(4 << 20))
    state_file = short_dir / "disk.state"
    args = ("-m", "256M", "-accel", "tcg", "-drive", f"file={disk},format=raw,if=virtio")
    with pyemu.VM(*args) as vm:
        vm.start()
        vm.console.expect("shell on the console", timeout=BOOT_TIMEOUT)
        vm.console.send("(while true; do dd if=/dev/urandom of=/dev/vda bs=64k count=8 conv=fsync 2>/dev/null; "
                        "done) &\n")
        vm.console.send("sleep 1; printf 'WRITING=%s\\n' $(cat /sys/block/vda/stat | wc -w)\n")
        vm.console.expect(re.compile(r"WRITING=\d+"), timeout=COMMAND_TIMEOUT)
        vm.execute("migrate", {"uri": f"file:{state_file}"})
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while (info := vm.execute("query-migrate"))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["status"] == "completed", info
        vm.quit()

    with pyemu.VM(*args, "-incoming", f"file:{state_file}") as vm:
        vm.start()
        vm.console.send("\nkill %1; wait\n")
        vm.console.send("echo MARKER | dd of=/dev/vda bs=512 seek=7000 conv=fsync 2>/dev/null; "
                        "echo 3 > /proc/sys/vm/drop_caches; "
                        "dd if=/dev/vda bs=512 skip=7000 count=1 2>/dev/null | head -c 6 | tr A-Z a-z; echo\n")
        vm.console.expect("marker", timeout=COMMAND_TIMEOUT)
        vm.quit()
    with open(disk, "rb") as image:
        image.seek(7000 * 512)
        assert image.read(6) == b"MARKER"  # the restored VM's write reached the shared image


def drain(session: Any) -> None:
    """Read what a console session's process has written so far (until its output pauses for 0.2 s, for at
    most 2 s: a guest printing a counter every 0.1 s never pauses)."""
    import os
    import select

    fd = session.proc.stdout.fileno()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        session.output += chunk


HOST_ADDR = "10.0.2.2"
GUEST_ADDR = "10.0.2.15"
GUEST_MAC = "52:54:00:12:34:56"


def _ip(*argv: str) -> None:
    import subprocess

    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (argv, done.stderr)


@pytest.fixture
def bridged_namespace() -> Any:
    """A network namespace of our own with a bridge ``br0`` (10.0.2.2/24) that the source's and the
    destination's TAPs join, as two hosts on one LAN; deleted afterwards whatever happens. Nothing is
    routed outside it."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root, iproute2 and /dev/net/tun for a network namespace with TAPs")
    name = f"pyemu-mig-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if made.returncode:
        pytest.skip(f"'ip netns add' is unavailable here: {made.stderr.strip()}")
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        # A fixed address: a bridge otherwise takes its lowest port's, which changes when the destination's
        # TAP joins, and the guest's ARP entry for the host would point at the old one.
        _ip("-n", name, "link", "set", "br0", "address", "02:00:00:00:00:02")
        _ip("-n", name, "addr", "add", f"{HOST_ADDR}/24", "dev", "br0")
        _ip("-n", name, "link", "set", "br0", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


def _join_bridge(namespace: str, tap: str, proc: Any) -> None:
    """Put the TAP a pyemu process created into the bridge (it appears while the process starts)."""
    import subprocess

    deadline = time.monotonic() + COMMAND_TIMEOUT
    while subprocess.run(["ip", "-n", namespace, "link", "show", tap], capture_output=True).returncode:
        assert time.monotonic() < deadline and proc.poll() is None, f"{tap} did not appear"
        time.sleep(0.2)
    _ip("-n", namespace, "link", "set", tap, "master", "br0")
    _ip("-n", namespace, "link", "set", tap, "up")


@pytest.mark.slow
@pytest.mark.assets
def test_linux_counter_migrates_live_over_tcp_to_a_second_process(guest_assets: object, short_dir: Path,
                                                                  bridged_namespace: str) -> None:
    """Issue 13's done-when: a Linux guest printing a counter is migrated live over tcp: from one pyemu
    process to another; the second process's console goes on counting with no number missing or
    repeated (the console output of both processes, joined, is one unbroken count). Its virtio disk
    (shared storage: both processes open the same image; the destination takes the image's locks only
    when the migration ends) and its virtio-net NIC (each process has its own TAP on one bridge, as two
    hosts on a LAN) keep working; the source ends ``postmigrate``; a cancelled migration before it left
    the source running, counting, and on its disk."""
    import socket
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "boot"))
    from boot_helpers import ConsoleSession, qmp, shell

    class NamespacedSession(ConsoleSession):
        def __init__(self, argv: list[str]) -> None:  # noqa: D107 - a ConsoleSession inside the namespace
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", bridged_namespace, sys.executable, "-m", "pyemu.system.main", *argv],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.output = b""

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]  # the namespace's own loopback: any free number will do
    probe.close()
    disk = short_dir / "disk.raw"
    disk.write_bytes(bytes(8 << 20))
    src_sock, dst_sock = short_dir / "src.qmp", short_dir / "dst.qmp"
    args = ["-m", "256M", "-nographic", "-accel", "tcg", "-drive", f"file={disk},format=raw,if=virtio",
            "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"]
    source = NamespacedSession([*args, "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                                "-qmp", f"unix:{src_sock},server=on,wait=off"])
    dest: ConsoleSession | None = None
    try:
        source.expect(b"shell on the console", timeout=BOOT_TIMEOUT)
        _join_bridge(bridged_namespace, "tap0", source.proc)
        status, text = shell(source, f"ip link set eth0 up && ip addr add {GUEST_ADDR}/24 dev eth0 && "
                                     f"ping -c 2 -W 10 {HOST_ADDR}", COMMAND_TIMEOUT)
        assert status == 0 and "2 packets received" in text, text
        status, text = shell(source, "echo BEFORE-MOVE | dd of=/dev/vda bs=512 seek=100 conv=fsync", COMMAND_TIMEOUT)
        assert status == 0, text
        source.send("i=0; while true; do i=$((i+1)); echo \"COUNT=$i.\"; sleep 0.1; done &\n")
        source.expect(b"COUNT=20.", timeout=COMMAND_TIMEOUT)

        # A migration cancelled half-way leaves the source running on its image.
        qmp(src_sock, "migrate-set-parameters", {"max-bandwidth": 1 << 20})  # a few minutes for 256 MiB
        qmp(src_sock, "migrate", {"uri": "exec:cat > /dev/null"})
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while (info := qmp(src_sock, "query-migrate"))["status"] != "active" or info["ram"]["transferred"] == 0:
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        qmp(src_sock, "migrate_cancel")
        while (info := qmp(src_sock, "query-migrate"))["status"] not in ("cancelled", "failed", "completed"):
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["status"] == "cancelled", info
        assert qmp(src_sock, "query-status")["status"] == "running"
        drain(source)
        seen = int(re.findall(rb"COUNT=(\d+)\.", source.output)[-1])
        source.expect(f"COUNT={seen + 10}.".encode(), timeout=COMMAND_TIMEOUT)  # still counting
        qmp(src_sock, "migrate-set-parameters", {"max-bandwidth": 0})

        dest = NamespacedSession([*args, "-netdev", "tap,id=n0,ifname=tap1,script=no,downscript=no",
                                  "-qmp", f"unix:{dst_sock},server=on,wait=off",
                                  "-incoming", f"tcp:127.0.0.1:{port}"])
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not dst_sock.exists():
            assert time.monotonic() < deadline and dest.proc.poll() is None, "the destination did not start"
            time.sleep(0.1)
        _join_bridge(bridged_namespace, "tap1", dest.proc)
        assert qmp(dst_sock, "query-migrate")["socket-address"][0]["port"] == str(port)  # listening
        qmp(src_sock, "migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while (info := qmp(src_sock, "query-migrate"))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["status"] == "completed", info
        assert info["ram"]["dirty-sync-count"] >= 2 and info["ram"]["precopy-bytes"] > 0  # it went live
        # The source completes once it sent the end of the stream; the destination still loads the last
        # device state and starts the guest (QEMU's destination is "active" until then too).
        while (info := qmp(dst_sock, "query-migrate"))["status"] == "active":
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info == {"status": "completed"}
        assert qmp(dst_sock, "query-status")["status"] == "running"
        assert qmp(src_sock, "query-status")["status"] == "postmigrate"
        drain(source)  # everything the stopped source printed (it prints nothing more)
        counts_src = [int(n) for n in re.findall(rb"COUNT=(\d+)\.", source.output)]
        last = counts_src[-1]
        dest.expect(f"COUNT={last + 30}.".encode(), timeout=COMMAND_TIMEOUT)
        joined = source.output + dest.output
        counts = [int(n) for n in re.findall(rb"COUNT=(\d+)\.", joined)]
        start = counts.index(1)
        assert counts[start:] == list(range(1, len(counts) - start + 1)), counts[-60:]  # no gap, no repeat
        assert len(counts) - start > last  # and the second process added to it

        dest.send("\nkill %1; wait\n")
        # The disk: what the source wrote is there, and the destination writes and reads it.
        status, text = shell(dest, "echo 3 > /proc/sys/vm/drop_caches; "
                                   "dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | head -c 11 | tr A-Z a-z; echo; "
                                   "echo AFTER-MOVE | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null && "
                                   "echo 3 > /proc/sys/vm/drop_caches && "
                                   "dd if=/dev/vda bs=512 skip=200 count=1 2>/dev/null | head -c 10 | tr A-Z a-z",
                             COMMAND_TIMEOUT)
        assert status == 0 and "before-move" in text and "after-move" in text, text
        with open(disk, "rb") as image:
            image.seek(200 * 512)
            assert image.read(10) == b"AFTER-MOVE"  # the destination's write reached the shared image
        # The network: the guest, now behind the destination's TAP, still talks to the host.
        status, text = shell(dest, f"ping -c 3 -W 10 {HOST_ADDR}", COMMAND_TIMEOUT)
        assert status == 0 and "3 packets received" in text, text  # requests out, replies back in
    finally:
        source.close()
        if dest is not None:
            dest.close()


def _kernel_read_only_pages(vm: Any) -> set[int]:
    """Guest-physical pages of the running kernel's code and read-only data, as its /proc/iomem says."""
    vm.console.send("grep -E 'Kernel (code|rodata)' /proc/iomem | sed 's/^/IOMEM /'\n")
    pages: set[int] = set()
    for name in ("code", "rodata"):
        line = re.compile(rf"IOMEM\s+([0-9a-f]+)-([0-9a-f]+) : Kernel {name}")
        match = vm.console.expect(line, timeout=COMMAND_TIMEOUT)
        first, last = int(match.group(1), 16), int(match.group(2), 16)
        pages.update(range(first, last + 1 - 4095, 4096))
    assert len(pages) > 1000  # megabytes of them
    return pages


_READ_ONLY_TAG = "PYEMU-READ-ONLY-PAGE-"


def _tagged_pages(memory: Any) -> set[int]:
    """Guest-physical pages holding the page cache of the test's /tmp/ro (each page starts with its tag)."""
    tag = _READ_ONLY_TAG.encode()
    pages: set[int] = set()
    for region in memory.regions:
        data = memory.read(region.gpa, region.size)
        pages.update(region.gpa + offset for offset in range(0, region.size, 4096)
                     if data.startswith(tag, offset))
    assert len(pages) == 256, len(pages)  # the file's pages, each once in RAM
    return pages


@pytest.mark.slow
@pytest.mark.assets
def test_tcg_dirty_log_misses_no_page_a_busy_linux_guest_writes(guest_assets: object) -> None:
    """The software CPU's dirty log (TLB-fill hook) against the truth on a real kernel: while the guest
    forks, faults pages in, fills a tmpfs file and walks sysfs, every page whose bytes changed between two
    syncs is reported, round after round (RAM compared with a copy taken at the first sync).

    Precision is checked against pages known not to be written rather than against the changed set: once
    sysfs's dentries and inodes are cached, each walk takes and drops references in ~2000 pages whose bytes
    end the round as they began (written, so rightly reported, as KVM's log would). The kernel's code and
    read-only data (``/proc/iomem``), and the tmpfs pages of a file the loop reads with ``md5sum``, are fetched
    or read all round and written never (but for the rare jump label the kernel patches: random.c's
    ``crng_is_ready`` when the entropy pool fills); a log that marked read or fetch fills would report them."""
    import hashlib

    def digests(memory: Any) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for region in memory.regions:
            data = memory.read(region.gpa, region.size)
            for offset in range(0, region.size, 4096):
                out[region.gpa + offset] = hashlib.blake2b(data[offset:offset + 4096], digest_size=8).digest()
        return out

    with pyemu.VM("-m", "128M", "-accel", "tcg") as vm:
        vm.start()
        vm.console.expect("shell on the console", timeout=BOOT_TIMEOUT)
        # /tmp/ro: 256 pages, each starting with its own tag, read (never written) by every loop (md5sum, as
        # ``cat > /dev/null`` splices without reading the pages).
        vm.console.send(f"awk 'BEGIN {{ pad = \" \"; while (length(pad) < 4096) pad = pad pad; "
                        f"for (i = 0; i < 256; i++) printf \"{_READ_ONLY_TAG}%05d%s\", i, "
                        f"substr(pad, 1, 4096 - {len(_READ_ONLY_TAG) + 5}) }}' > /tmp/ro; echo MADE\n")
        vm.console.expect("\nMADE", timeout=COMMAND_TIMEOUT)
        vm.console.send("while true; do dd if=/dev/urandom of=/tmp/x bs=1k count=500 2>/dev/null; "
                        "md5sum /tmp/ro > /dev/null; ls -R /sys > /dev/null 2>&1; echo LOOP; done &\n")
        vm.console.expect("LOOP", timeout=COMMAND_TIMEOUT)
        machine = vm._instance.machine
        read_only = _kernel_read_only_pages(vm) | _tagged_pages(machine.memory)
        accel = machine.accel
        accel.start_dirty_log()
        try:
            for round_ in range(4):
                vm.pause()
                accel.fetch_dirty_pages()
                before = digests(machine.memory)
                vm.resume()
                time.sleep(1.0)  # the guest works meanwhile (what it writes is what is checked)
                vm.pause()
                reported = accel.fetch_dirty_pages()
                after = digests(machine.memory)
                vm.resume()
                changed = {gpa for gpa, digest in after.items() if before[gpa] != digest}
                assert changed, "the guest wrote nothing"
                assert not changed - reported, (round_, sorted(hex(gpa) for gpa in changed - reported)[:20])
                wrongly = (reported & read_only) - changed
                assert not wrongly, (round_, sorted(hex(gpa) for gpa in wrongly)[:20])
                assert len(reported) < len(before) // 4, (round_, len(reported))  # not "everything"
            vm.pause()
            accel.fetch_dirty_pages()  # what the guest wrote between the last round's resume and this pause
            assert accel.fetch_dirty_pages() == set()  # a sync clears the log; a paused guest writes nothing
            vm.resume()
        finally:
            accel.stop_dirty_log()
        vm.quit()
