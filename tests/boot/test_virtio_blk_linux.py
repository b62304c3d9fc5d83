"""virtio-blk and virtio-rng seen from a Linux guest under the software CPU: what the guest writes with
sync is in the host file byte for byte, what the host wrote before boot reads back, a read-only drive
refuses writes, discard punches holes in the image, several drives at once, and /dev/hwrng yields bytes.

One boot covers all of it (a Linux boot under TCG takes tens of seconds on CI machines).
"""

from __future__ import annotations

import hashlib
import os

import pytest

from boot_helpers import shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
MiB = 1 << 20


def test_disks_and_entropy_from_linux(console, guest_assets, tmp_path):
    disk = tmp_path / "disk.img"
    second = tmp_path / "second.img"
    host_data = os.urandom(64 * 1024)
    with open(disk, "wb") as handle:
        handle.write(host_data)
        handle.write(b"\xAA" * (8 * MiB))  # allocated area the guest will discard
        handle.truncate(32 * MiB)
    with open(second, "wb") as handle:
        handle.write(b"READONLY" * 512)
        handle.truncate(4 * MiB)
    second_before = second.read_bytes()
    vm = console(["-m", "256M", "-nographic",
                  "-object", "iothread,id=io1",
                  "-drive", f"file={disk},format=raw,if=none,id=d0,discard=unmap,cache=writeback",
                  "-device", "virtio-blk-device,drive=d0,serial=pyemu-disk-0,iothread=io1",
                  "-drive", f"file={second},format=raw,if=virtio,readonly=on",
                  "-object", "rng-random,id=rng0,filename=/dev/urandom",
                  "-device", "virtio-rng-device,rng=rng0"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)

    status, out = shell(vm, "cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdb/ro /sys/block/vda/serial")
    assert status == 0 and out.split() == [str(32 * MiB // 512), str(4 * MiB // 512), "1", "pyemu-disk-0"], out

    # Host data written before boot reads back in the guest.
    status, out = shell(vm, "dd if=/dev/vda bs=4096 count=16 2>/dev/null | md5sum")
    assert status == 0 and hashlib.md5(host_data).hexdigest() in out, out

    # The guest writes with sync: the host file holds exactly those bytes.
    status, out = shell(vm, "dd if=/dev/urandom of=/tmp/p bs=4096 count=64 2>/dev/null && "
                            "dd if=/tmp/p of=/dev/vda bs=4096 seek=4096 conv=fsync 2>/dev/null && md5sum /tmp/p")
    assert status == 0, out
    guest_md5 = out.split()[0]
    with open(disk, "rb") as handle:
        handle.seek(4096 * 4096)
        assert hashlib.md5(handle.read(64 * 4096)).hexdigest() == guest_md5

    # A read-only drive refuses writes; the host file is unchanged.
    status, out = shell(vm, "dd if=/tmp/p of=/dev/vdb bs=4096 count=1 conv=fsync")
    assert status != 0, out
    assert second.read_bytes() == second_before
    status, out = shell(vm, "dd if=/dev/vdb bs=8 count=1 2>/dev/null")
    assert "READONLY" in out

    # Discard punches holes: the image's allocated blocks shrink.
    blocks_before = os.stat(disk).st_blocks
    status, out = shell(vm, f"blkdiscard -o {64 * 1024} -l {8 * MiB} /dev/vda && sync")
    assert status == 0, out
    blocks_after = os.stat(disk).st_blocks
    assert blocks_before - blocks_after >= (8 * MiB // 512) * 0.9, (blocks_before, blocks_after)
    status, out = shell(vm, f"dd if=/dev/vda bs=4096 skip=16 count=4 2>/dev/null | md5sum")
    assert hashlib.md5(bytes(4 * 4096)).hexdigest() in out  # discarded blocks read as zeroes

    # Entropy.
    status, out = shell(vm, "dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n'; echo")
    assert status == 0 and len(out.strip()) == 64 and out.strip() != "0" * 64, out
    status, out = shell(vm, "cat /sys/class/misc/hw_random/rng_current")
    assert "virtio_rng" in out

    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0
