"""I/O throttling seen from a Linux guest under the software CPU (one boot, four throttled drives):

* a drive limited to 2 MiB/s: ``dd`` of 40 MiB with fsync takes 20 s within 10%;
* two drives in one throttle group (2 MiB/s for both): writing 8 MiB to each at once takes as long as
  16 MiB through one limit, and neither drive is starved (they finish close together);
* a burst (1 MiB/s, peaks of 8 MiB/s for 1 s: an 8 MiB bucket): 12 MiB go in about 4 s -- far faster than
  the 12 s the average alone allows, slower than the 1.5 s of the peak alone.

Timing is taken on the host around each guest command (the console round trip is well under 1% of 20 s).
"""

from __future__ import annotations

import time

import pytest

from boot_helpers import shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
MiB = 1 << 20


def timed(vm, command: str, timeout: float = 120) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    status, out = shell(vm, command, timeout)
    elapsed = time.monotonic() - start
    assert status == 0, out
    return elapsed, out


def test_throttled_drives_from_linux(console, guest_assets, tmp_path):  # type: ignore[no-untyped-def]
    disks = {}
    for name, size in (("rated", 48), ("ga", 16), ("gb", 16), ("burst", 16)):
        disks[name] = tmp_path / f"{name}.raw"
        with open(disks[name], "wb") as handle:
            handle.truncate(size * MiB)
    vm = console(["-m", "256M", "-nographic",
                  "-drive", f"file={disks['rated']},format=raw,if=none,id=rated,throttling.bps-total={2 * MiB}",
                  "-device", "virtio-blk-device,drive=rated",
                  "-object", f"throttle-group,id=grp,x-bps-total={2 * MiB}",
                  "-drive", f"file={disks['ga']},format=raw,if=none,id=ga,throttling.group=grp",
                  "-device", "virtio-blk-device,drive=ga",
                  "-drive", f"file={disks['gb']},format=raw,if=none,id=gb,throttling.group=grp",
                  "-device", "virtio-blk-device,drive=gb",
                  "-drive", f"file={disks['burst']},format=raw,if=none,id=burst,throttling.bps-total={MiB},"
                            f"throttling.bps-total-max={8 * MiB},throttling.bps-total-max-length=1",
                  "-device", "virtio-blk-device,drive=burst"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)
    status, out = shell(vm, "cat /sys/block/vda/size /sys/block/vdb/size /sys/block/vdc/size /sys/block/vdd/size")
    assert status == 0 and out.split() == [str(48 * MiB // 512)] + [str(16 * MiB // 512)] * 3, out

    # 2 MiB/s over 20 s: within 10% (a tenth of a second's worth may go before the limit bites).
    elapsed, _ = timed(vm, "dd if=/dev/zero of=/dev/vda bs=64k count=640 conv=fsync 2>/dev/null")
    rate = 40 * MiB / elapsed
    print(f"throttle: 2 MiB/s drive: {rate / MiB:.3f} MiB/s over {elapsed:.1f} s")
    assert 0.9 * 2 * MiB <= rate <= 1.1 * 2 * MiB, f"{rate / MiB:.3f} MiB/s over {elapsed:.1f} s"

    # One group limit for two drives: 16 MiB at 2 MiB/s, split between them.
    elapsed, out = timed(vm, "for d in vdb vdc; do (dd if=/dev/zero of=/dev/$d bs=64k count=128 conv=fsync "
                             "2>/dev/null; echo \"$d $(cut -d' ' -f1 /proc/uptime)\") & done; wait")
    print(f"throttle: group of two, 16 MiB at 2 MiB/s: {elapsed:.1f} s; {out!r}")
    assert 0.9 * 8 <= elapsed <= 1.1 * 8 + 2, f"{elapsed:.1f} s"
    ends = dict(line.split() for line in out.splitlines() if line.startswith("vd"))
    assert abs(float(ends["vdb"]) - float(ends["vdc"])) < 2.5, ends  # neither waited for the other

    # Burst: about 9 MiB at the 8 MiB/s peak, the rest at 1 MiB/s.
    elapsed, _ = timed(vm, "dd if=/dev/zero of=/dev/vdd bs=64k count=192 conv=fsync 2>/dev/null")
    print(f"throttle: burst drive, 12 MiB: {elapsed:.1f} s")
    assert 2.5 < elapsed < 7, f"{elapsed:.1f} s"
    vm.send("poweroff -f\n")
