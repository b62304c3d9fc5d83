"""The default Linux guest with a qcow2 disk: ``savevm`` at its shell, files changed (in its RAM-backed root
and on the disk), ``loadvm`` -- the same shell answers with the old files, the disk read back from the image
after dropping the guest's caches; then a new process started with ``-loadvm`` answers at that shell with
its uptime continuing from the save."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

import pyemu
from pyemu.block.qcow2.create import create_qcow2
from pyemu.system.runstate import RunState

from test_migration_linux import BOOT_TIMEOUT, COMMAND_TIMEOUT, guest_uptime


def hmp(vm: pyemu.VM, line: str) -> str:
    return str(vm.execute("human-monitor-command", {"command-line": line}))


def show(vm: pyemu.VM) -> None:
    """Print the file and the disk's first bytes with '-' turned to '_' (the command's echo cannot match)."""
    vm.console.send("echo 3 > /proc/sys/vm/drop_caches; "
                    "echo F=$(sed 's/-/_/g' /tmp/f.txt) D=$(head -c 9 /dev/vda | sed 's/-/_/g')\n")


@pytest.mark.slow
@pytest.mark.assets
def test_linux_savevm_loadvm_and_loadvm_at_start_up(guest_assets: object, short_dir: Path) -> None:
    disk = short_dir / "disk.qcow2"
    create_qcow2(str(disk), 8 << 20)
    args = ("-m", "256M", "-accel", "tcg", "-drive", f"file={disk},format=qcow2,if=virtio")
    with pyemu.VM(*args) as vm:
        vm.start()
        vm.console.expect("shell on the console", timeout=BOOT_TIMEOUT)
        vm.console.send("mkdir -p /tmp && echo old-file > /tmp/f.txt && "
                        "printf old-disk0 | dd of=/dev/vda conv=fsync 2>/dev/null; sync\n")
        show(vm)
        vm.console.expect("F=old_file D=old_disk0", timeout=COMMAND_TIMEOUT)
        uptime_saved = guest_uptime(vm)
        assert hmp(vm, "savevm linux") == ""
        assert vm.state is RunState.RUNNING
        vm.console.send("echo new-file > /tmp/f.txt && printf new-disk1 | dd of=/dev/vda conv=fsync 2>/dev/null\n")
        show(vm)
        vm.console.expect("F=new_file D=new_disk1", timeout=COMMAND_TIMEOUT)
        assert hmp(vm, "loadvm linux") == ""
        assert vm.state is RunState.RUNNING
        vm.console.send("\n")
        show(vm)
        vm.console.expect("F=old_file D=old_disk0", timeout=COMMAND_TIMEOUT)
        vm.quit()
    listing = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True, text=True,
                             check=True).stdout
    assert re.search(r"\blinux\s+\d+(\.\d+)? MiB ", listing), listing
    checked = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert checked.returncode == 0 and "No errors were found" in checked.stdout, checked.stdout

    with pyemu.VM(*args, "-loadvm", "linux") as vm:
        vm.start()
        started = time.monotonic()
        assert vm.state is RunState.RUNNING
        vm.console.send("\n")
        show(vm)
        vm.console.expect("F=old_file D=old_disk0", timeout=COMMAND_TIMEOUT)
        uptime_now = guest_uptime(vm)
        ran = time.monotonic() - started
        vm.quit()
    assert uptime_now >= uptime_saved  # the same boot, not a new one
    assert uptime_now - uptime_saved < ran + 5.0  # continued from the save, without the time in between
