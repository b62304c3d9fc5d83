"""A Linux guest under the software CPU keeps writing and reading its disk while the node under its
virtio-blk device is swapped over QMP (``qom-set /machine/peripheral/vblk0 drive <node>``, QEMU's fleecing
step), and does not notice.

Phase 1 inserts a pass-through node (``raw`` with ``file=d0``) above the device's node and removes it again
while a guest loop writes a pattern with O_DIRECT and reads it back: every read must match, and the disk
holds the data. Phase 2 moves the device onto a qcow2 overlay whose backing is its old node: the guest
still reads its disk through it, its writes land in the overlay (checked with ``qemu-io`` after shutdown),
and the base image is untouched by them. QMP is driven with ``qemu.qmp``, the client QEMU's own tests use.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from boot_helpers import qmp, shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
MiB = 1 << 20


LOOP = ("rm -f /tmp/stop /tmp/log; (n=0; while [ ! -e /tmp/stop ]; do "
        "dd if=/tmp/a of=/dev/vda bs=65536 seek=16 count=4 oflag=direct 2>/dev/null; "
        "dd if=/dev/vda bs=65536 skip=16 count=4 iflag=direct 2>/dev/null | md5sum > /tmp/got; "
        "cmp -s /tmp/got /tmp/want || echo MISMATCH; n=$((n+1)); echo iter $n; done) > /tmp/log 2>&1 & true")


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io not installed")
def test_guest_does_not_notice_node_swaps(console, guest_assets, tmp_path):  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "16M"], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw", str(top)], check=True)
    sock = tmp_path / "qmp.sock"
    vm = console(["-m", "256M", "-nographic", "-qmp", f"unix:{sock},server=on,wait=off",
                  "-blockdev", f"driver=file,node-name=f0,filename={disk}",
                  "-blockdev", "driver=raw,node-name=d0,file=f0",
                  "-device", "virtio-blk-device,drive=d0,id=vblk0"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)
    status, out = shell(vm, "dd if=/dev/urandom of=/tmp/a bs=65536 count=4 2>/dev/null && md5sum < /tmp/a > /tmp/want"
                            " && dd if=/dev/zero bs=65536 count=1 2>/dev/null | tr '\\000' B > /tmp/b")
    assert status == 0, out

    # Phase 1: a pass-through node in, then out, under a guest writing and reading all the time.
    status, out = shell(vm, LOOP)
    assert status == 0, out
    shell(vm, "sleep 2")
    qmp(sock, "blockdev-add", {"driver": "raw", "node-name": "filter", "file": "d0"})
    qmp(sock, "qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "filter"})
    assert qmp(sock, "qom-get", {"path": "/machine/peripheral/vblk0", "property": "drive"}) == "filter"
    shell(vm, "sleep 3")
    qmp(sock, "qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "d0"})
    qmp(sock, "blockdev-del", {"node-name": "filter"})
    shell(vm, "sleep 2")
    status, out = shell(vm, "touch /tmp/stop; wait; grep -c MISMATCH /tmp/log; tail -n 1 /tmp/log", timeout=120)
    lines = out.split("\n")
    assert lines[-2:][0] == "0", out  # no read ever differed from what was written
    assert int(lines[-1].split()[-1]) >= 3, out  # the loop really ran across the swaps
    # Phase 2: onto a qcow2 overlay over d0: reads still see the disk; writes go to the overlay.
    qmp(sock, "blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "d0",
                               "file": {"driver": "file", "filename": str(top)}})
    qmp(sock, "qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "ov"})
    status, out = shell(vm, "dd if=/dev/vda bs=65536 skip=16 count=4 iflag=direct 2>/dev/null | md5sum | "
                            "cmp -s - /tmp/want && dd if=/tmp/b of=/dev/vda bs=65536 seek=64 oflag=direct "
                            "2>/dev/null && dd if=/dev/vda bs=65536 skip=64 count=1 iflag=direct 2>/dev/null | "
                            "cmp -s - /tmp/b && echo SAME")
    assert status == 0 and out.endswith("SAME"), out
    qmp(sock, "qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "d0"})
    qmp(sock, "blockdev-del", {"node-name": "ov"})
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0
    data = disk.read_bytes()
    assert data[64 * 65536:65 * 65536] == bytes(65536)  # the overlay took the write, not the base
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P 0x42 {4 * MiB} 65536", str(top)],
                         check=True, capture_output=True, text=True).stdout
    assert "read 65536/65536" in out and "verification failed" not in out, out
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
