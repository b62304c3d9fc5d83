"""qcow2 under a Linux guest on the software CPU: a disk that is an overlay on a qcow2 backing file, and a
drive with snapshot=on.

After the guest writes and powers off, ``qemu-img check`` finds the overlay clean, ``qemu-img compare`` says
it holds exactly the backing data plus what the guest wrote, and the backing file is unchanged; the
snapshot=on drive's image is untouched although the guest saw its own writes. One boot covers both.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from boot_helpers import shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240
MiB = 1 << 20
PATTERN = b"pyemu-qcow2\n"  # repeated by _pattern_source in the guest and _pattern here


def _pattern_source(length: int) -> str:
    """A guest shell command printing ``_pattern(length)``: one awk process with a few large writes.
    Why not ``yes | head -c``: busybox's ``head -c`` copies 1 MiB in ~30 s of emulated time on a busy host
    (measured), and its small writes turn ``dd``'s blocks into thousands of partial ones."""
    return (f"awk 'BEGIN {{ s = \"pyemu-qcow2\\n\"; while (length(s) < {length}) s = s s; "
            f"printf \"%s\", substr(s, 1, {length}) }}'")


def _sha256(path) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pattern(length: int) -> bytes:
    return (PATTERN * (length // len(PATTERN) + 1))[:length]


def test_qcow2_overlay_and_snapshot_drive(console, guest_assets, tmp_path):
    size = 16 * MiB
    base_raw = tmp_path / "base.raw"
    base_bytes = bytes(range(256)) * (size // 256)
    base_raw.write_bytes(base_bytes)
    base = tmp_path / "base.qcow2"
    overlay = tmp_path / "overlay.qcow2"
    scratch = tmp_path / "scratch.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(base_raw), str(base)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(overlay)],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch), "4M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", str(scratch)], check=True, capture_output=True)
    base_sum, scratch_sum = _sha256(base), _sha256(scratch)

    vm = console(["-m", "256M", "-nographic",
                  "-drive", f"file={overlay},format=qcow2,if=virtio,discard=unmap",
                  "-drive", f"file={scratch},format=qcow2,if=virtio,snapshot=on"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)

    status, out = shell(vm, "cat /sys/block/vda/size /sys/block/vdb/size")
    assert status == 0 and out.split() == [str(size // 512), str(4 * MiB // 512)], out
    # The backing file's data shows through the empty overlay.
    status, out = shell(vm, "dd if=/dev/vda bs=65536 count=4 2>/dev/null | md5sum")
    assert status == 0 and hashlib.md5(base_bytes[:4 * 65536]).hexdigest() in out, out

    # Writes: 1 MiB at 3 MiB (whole clusters), 5000 bytes at 8 MiB + 512 (partial clusters: copy-on-write
    # from the backing file), then read back through the guest page cache dropped.
    status, out = shell(vm, f"{_pattern_source(MiB)} | dd of=/dev/vda bs=65536 seek=48 iflag=fullblock "
                            f"conv=fsync 2>/dev/null && {_pattern_source(5120)} | "
                            "dd of=/dev/vda bs=512 seek=16385 iflag=fullblock conv=fsync 2>/dev/null && "
                            "echo 3 > /proc/sys/vm/drop_caches && md5sum /dev/vda")
    assert status == 0, out
    expected = bytearray(base_bytes)
    expected[3 * MiB:4 * MiB] = _pattern(MiB)
    expected[8 * MiB + 512:8 * MiB + 512 + 5120] = _pattern(5120)
    assert hashlib.md5(expected).hexdigest() in out, out

    # The snapshot=on drive: the guest sees its write ...
    status, out = shell(vm, f"{_pattern_source(65536)} | dd of=/dev/vdb bs=65536 iflag=fullblock conv=fsync 2>/dev/null "
                            "&& echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vdb bs=65536 count=1 2>/dev/null "
                            "| md5sum")
    assert status == 0 and hashlib.md5(_pattern(65536)).hexdigest() in out, out

    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0

    # ... and its image is untouched; the overlay is clean and holds exactly what the guest wrote.
    assert _sha256(scratch) == scratch_sum
    assert _sha256(base) == base_sum
    check = subprocess.run(["qemu-img", "check", str(overlay)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    model = tmp_path / "expected.raw"
    model.write_bytes(bytes(expected))
    compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(overlay), str(model)],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert subprocess.run(["qemu-img", "check", str(scratch)], capture_output=True).returncode == 0
