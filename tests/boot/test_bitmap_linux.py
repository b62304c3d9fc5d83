"""The done-when check of persistent dirty bitmaps with a Linux guest on the software CPU: a persistent
bitmap added over QMP while the guest runs, the guest writes its disk with ``dd``, the guest powers off and
pyemu exits; then ``qemu-img info`` lists the bitmap with its granularity, ``qemu-img check`` is clean, and
QEMU (``qemu-nbd -B`` read by ``nbdinfo --map``) sees exactly the granules the guest wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from boot_helpers import qmp, shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
MiB = 1 << 20


def nbd_dirty_extents(image: Path, name: str, tmp: Path) -> list[tuple[int, int]]:
    sock = tmp / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", str(sock), "-t", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        out = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{name}",
                              f"nbd+unix:///?socket={sock}"], check=True, capture_output=True, text=True,
                             timeout=60).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


@pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("nbdinfo") is None,
                    reason="qemu-nbd/nbdinfo not installed")
def test_persistent_bitmap_records_guest_writes(console, guest_assets, tmp_path):  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    sock = tmp_path / "qmp.sock"
    vm = console(["-m", "256M", "-nographic", "-qmp", f"unix:{sock},server=on,wait=off",
                  "-drive", f"file={disk},format=qcow2,if=virtio,id=disk0"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)
    qmp(sock, "block-dirty-bitmap-add", {"node": "disk0", "name": "inc", "granularity": 65536,
                                         "persistent": True})
    status, out = shell(vm, "dd if=/dev/urandom of=/dev/vda bs=65536 seek=16 count=2 oflag=direct 2>/dev/null && "
                            "dd if=/dev/urandom of=/dev/vda bs=4096 seek=2305 count=1 oflag=direct 2>/dev/null")
    assert status == 0, out
    info = [d for d in qmp(sock, "query-block") if d["device"] == "disk0"][0]
    bitmap = info["inserted"]["dirty-bitmaps"][0]
    assert (bitmap["name"], bitmap["persistent"], bitmap["recording"]) == ("inc", True, True)
    assert bitmap["count"] == 3 * 65536, bitmap
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0
    listed = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], check=True,
                                       capture_output=True, text=True).stdout)
    assert listed["format-specific"]["data"]["bitmaps"] == [{"flags": ["auto"], "name": "inc",
                                                             "granularity": 65536}]
    check = subprocess.run(["qemu-img", "check", str(disk)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors were found" in check.stdout, check.stdout
    assert nbd_dirty_extents(disk, "inc", tmp_path) == [(MiB, 128 * 1024), (9 * MiB, 65536)]
