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
    """Read what a console session's process has written so far (until its output pauses for 1 s)."""
    import os
    import select

    fd = session.proc.stdout.fileno()
    while select.select([fd], [], [], 1.0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        session.output += chunk


@pytest.mark.slow
@pytest.mark.assets
def test_linux_counter_migrates_live_over_tcp_to_a_second_process(guest_assets: object, short_dir: Path) -> None:
    """Issue 13's done-when: a Linux guest printing a counter is migrated live over tcp: from one pyemu
    process to another; the second process's console goes on counting with no number missing or
    repeated (the console output of both processes, joined, is one unbroken count)."""
    import socket
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "boot"))
    from boot_helpers import ConsoleSession, qmp

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    src_sock, dst_sock = short_dir / "src.qmp", short_dir / "dst.qmp"
    args = ["-m", "256M", "-nographic", "-accel", "tcg"]
    source = ConsoleSession([*args, "-qmp", f"unix:{src_sock},server=on,wait=off"])
    dest: ConsoleSession | None = None
    try:
        source.expect(b"shell on the console", timeout=BOOT_TIMEOUT)
        source.send("i=0; while true; do i=$((i+1)); echo \"COUNT=$i.\"; sleep 0.1; done &\n")
        source.expect(b"COUNT=20.", timeout=COMMAND_TIMEOUT)
        dest = ConsoleSession([*args, "-qmp", f"unix:{dst_sock},server=on,wait=off",
                               "-incoming", f"tcp:127.0.0.1:{port}"])
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not dst_sock.exists():
            assert time.monotonic() < deadline and dest.proc.poll() is None, "the destination did not start"
            time.sleep(0.1)
        assert qmp(dst_sock, "query-migrate")["socket-address"][0]["port"] == str(port)  # listening
        qmp(src_sock, "migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while (info := qmp(src_sock, "query-migrate"))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["status"] == "completed", info
        assert info["ram"]["dirty-sync-count"] >= 2 and info["ram"]["precopy-bytes"] > 0  # it went live
        assert qmp(dst_sock, "query-migrate") == {"status": "completed"}
        assert qmp(dst_sock, "query-status")["status"] == "running"
        drain(source)  # everything the stopped source printed (it prints nothing more)
        counts_src = [int(n) for n in re.findall(rb"COUNT=(\d+)\.", source.output)]
        last = counts_src[-1]
        dest.expect(f"COUNT={last + 30}.".encode(), timeout=COMMAND_TIMEOUT)
        joined = source.output + dest.output
        counts = [int(n) for n in re.findall(rb"COUNT=(\d+)\.", joined)]
        start = counts.index(1)
        assert counts[start:] == list(range(1, len(counts) - start + 1)), counts[-60:]  # no gap, no repeat
        assert len(counts) - start > last  # and the second process added to it
    finally:
        source.close()
        if dest is not None:
            dest.close()
