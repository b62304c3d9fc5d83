"""Issue 12's done-when checks of live image operations with a Linux guest on the software CPU writing a known
pattern the whole time (the numbered-block writer loop of :class:`boot_helpers.Guest`).

Three boots per VM kind, each a chain of operations on one disk:

- the qcow2 chain: copy-on-read through a ``copy-on-read`` filter fills the top image from its backing file
  (which can then be dropped: the data still reads the same); a live snapshot (``blockdev-snapshot-sync``)
  then ``block-stream`` makes the new top independent of everything below it; a second snapshot and an active
  ``block-commit`` with ``job-complete`` pivot the guest back onto that base, which then holds everything; a
  third snapshot's stream is cancelled at a random point and the guest keeps running on a consistent chain.
- the raw disk: a ``blockdev-mirror`` cancelled at a random point, then one that becomes ready and is
  completed with the VM paused, so source and target compare equal at the switch; the guest keeps running on
  the target.
- ``block_resize`` grows the running raw disk: the guest sees the new size (virtio-blk's config-change
  interrupt) and writes and reads the new space.

Every image ends ``qemu-img check`` clean, and the guest's own checksum of its disk (its writer stopped, page
cache dropped) equals the host's view of the image afterwards. Each scenario also runs on
``qemu-system-x86_64 -M microvm`` booting the same guest: QEMU validates the test itself."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from boot_helpers import BLOCK, DISK_SIZE, KINDS, MiB, Guest, qemu_img_check, run

pytestmark = [pytest.mark.slow, pytest.mark.assets,
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")]

HALF = DISK_SIZE // 2 // BLOCK  # the writer loop keeps to the first half of the disk
COR_OFFSET, COR_LENGTH = DISK_SIZE - 4 * MiB, 4 * MiB  # backing data the guest reads through copy-on-read
PATTERN = 0x5A


def guest_md5(g: Guest, *, skip: int = 0, count: int = 0) -> str:
    """The guest's checksum of /dev/vda (or of ``count`` 64 KiB blocks from block ``skip``), read after
    dropping its page cache so the bytes come from the device."""
    limit = f" skip={skip} count={count}" if count else ""
    out = g.sh(f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=65536{limit} 2>/dev/null | md5sum")
    (digest,) = re.findall(r"\b[0-9a-f]{32}\b", out)
    return digest


def host_md5(image: Path, tmp: Path, fmt: str = "qcow2") -> str:
    """The host's checksum of what ``image`` (and its backing chain) reads as."""
    flat = tmp / f"{image.name}.flat"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(flat))
    digest = hashlib.md5(flat.read_bytes()).hexdigest()
    flat.unlink()
    return digest


def info(image: Path) -> dict[str, Any]:
    return json.loads(run("qemu-img", "info", "--output=json", str(image)).stdout)


def backing_depth(g: Guest, node: str) -> int:
    (entry,) = [n for n in g.mon("query-named-block-nodes") if n["node-name"] == node]
    return int(entry["backing_file_depth"])


def wait_job(g: Guest, job: str, event: str = "BLOCK_JOB_COMPLETED") -> dict[str, Any]:
    done = g.mon.wait_event(event, job)
    assert "error" not in done["data"], done
    return done


def cancel_at_random_point(g: Guest, job: str, rng: random.Random) -> None:
    """Cancel a (rate-limited) job somewhere in its run; the guest must still answer afterwards."""
    time.sleep(rng.uniform(0.2, 1.5))
    g.mon("block-job-cancel", {"device": job})
    g.mon.wait_event("BLOCK_JOB_CANCELLED", job)
    assert g.sh("echo alive").endswith("alive")


def snapshot(g: Guest, node: str, overlay: Path, name: str) -> None:
    g.mon("blockdev-snapshot-sync", {"node-name": node, "snapshot-file": str(overlay),
                                     "snapshot-node-name": name, "format": "qcow2"})


@pytest.mark.parametrize("kind", KINDS)
def test_cor_snapshot_stream_commit_and_cancel(guest, tmp_path, kind):  # type: ignore[no-untyped-def]
    rng = random.Random()
    base, disk = tmp_path / "base.qcow2", tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(DISK_SIZE))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN} {COR_OFFSET} {COR_LENGTH}", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(disk), str(DISK_SIZE))
    g = guest(kind, "qcow2")  # d0 = disk.qcow2 over base.qcow2

    # Copy-on-read: the guest reads the backing data through the filter, which writes it into disk.qcow2.
    g.mon("blockdev-add", {"driver": "copy-on-read", "node-name": "cor0", "file": "d0"})
    g.mon("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "cor0"})
    cor_md5 = guest_md5(g, skip=COR_OFFSET // BLOCK, count=COR_LENGTH // BLOCK)
    g.mon("qom-set", {"path": "/machine/peripheral/vblk0", "property": "drive", "value": "d0"})
    g.mon("blockdev-del", {"node-name": "cor0"})

    # Snapshot -> stream, the guest writing all along: the new top no longer needs anything below it.
    g.start_writer(HALF)
    g.wait_writes(3)
    ov1, ov2, ov3 = (tmp_path / f"ov{i}.qcow2" for i in (1, 2, 3))
    snapshot(g, "d0", ov1, "ov1")
    g.wait_writes(2)
    g.mon("block-stream", {"job-id": "s1", "device": "ov1"})
    wait_job(g, "s1")
    assert backing_depth(g, "ov1") == 0
    g.wait_writes(2)

    # Snapshot -> active commit -> ready -> complete: the guest is back on ov1, which holds everything.
    snapshot(g, "ov1", ov2, "ov2")
    g.wait_writes(3)
    g.mon("block-commit", {"job-id": "c1", "device": "ov2"})
    g.mon.wait_event("BLOCK_JOB_READY", "c1")
    g.wait_writes(2)
    g.mon("job-complete", {"id": "c1"})
    wait_job(g, "c1")
    (block,) = [b for b in g.mon("query-block") if b["qdev"].endswith("vblk0")]
    assert block["inserted"]["node-name"] == "ov1"
    # The committed overlay left the graph with the pivot (QEMU drops the snapshot's node).
    assert "ov2" not in [n["node-name"] for n in g.mon("query-named-block-nodes")]
    g.wait_writes(2)
    g.stop_writer()
    at_pivot = guest_md5(g)  # ov1's content from here on: later writes go to the next overlay

    # A third snapshot whose stream is cancelled at a random point: the chain stays consistent.
    g.start_writer(HALF)
    snapshot(g, "ov1", ov3, "ov3")
    g.mon("block-stream", {"job-id": "s3", "device": "ov3", "speed": 4 * MiB})
    cancel_at_random_point(g, "s3", rng)
    g.wait_writes(3)
    g.stop_writer()
    final = guest_md5(g)
    g.power_off()

    for image in (disk, ov1, ov2, ov3):
        qemu_img_check(image)
    assert "backing-filename" not in info(ov1)
    assert info(ov3)["backing-filename"] == str(ov1)
    # Neither the base, nor the first top, nor the committed overlay are needed any more.
    gone = tmp_path / "gone"
    gone.mkdir()
    for image in (base, disk, ov2):
        image.rename(gone / image.name)
    assert host_md5(ov1, tmp_path) == at_pivot
    assert host_md5(ov3, tmp_path) == final
    assert at_pivot != final  # the guest really wrote between the two
    # Copy-on-read filled disk.qcow2: its own clusters cover the region, and with its backing file gone
    # (the link removed) it still reads the backing data.
    moved = gone / disk.name
    run("qemu-img", "rebase", "-u", "-b", "", str(moved))
    mapping = json.loads(run("qemu-img", "map", "--output=json", str(moved)).stdout)
    own = sum(max(0, min(e["start"] + e["length"], COR_OFFSET + COR_LENGTH) - max(e["start"], COR_OFFSET))
              for e in mapping if e["data"])
    assert own == COR_LENGTH
    run("qemu-io", "-f", "qcow2", "-c", f"read -P {PATTERN} {COR_OFFSET} {COR_LENGTH}", str(moved))
    assert hashlib.md5(bytes([PATTERN]) * COR_LENGTH).hexdigest() == cor_md5


def node_read_only(g: Guest, image: Path) -> bool:
    """query-named-block-nodes' ``ro`` of the qcow2 node over ``image``."""
    (entry,) = [n for n in g.mon("query-named-block-nodes") if n["file"] == str(image) and n["drv"] == "qcow2"]
    return bool(entry["ro"])


@pytest.mark.parametrize("kind", KINDS)
def test_commit_cancelled_at_random_points(guest, tmp_path, kind):  # type: ignore[no-untyped-def]
    """Commit jobs cancelled at random points into a base the chain opened read-only (reopened read-write
    for the job): an intermediate commit and an active commit cancelled before ready, and an active commit
    cancelled after ready (completes without a pivot: the base is a point-in-time copy of the disk). The
    guest keeps running on a consistent chain and its checksum matches the host's view."""
    rng = random.Random()
    base, disk, ov1 = tmp_path / "base.qcow2", tmp_path / "disk.qcow2", tmp_path / "ov1.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(DISK_SIZE))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN} 0 {DISK_SIZE}", str(base))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(disk), str(DISK_SIZE))
    # 24 MiB above the base: at 4 MiB/s a rate-limited commit needs 6 s to become ready, so a cancel in its
    # first 1.5 s always comes before ready.
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN + 1} 0 {24 * MiB}", str(disk))
    g = guest(kind, "qcow2")  # d0 = disk.qcow2; base.qcow2 opened read-only from its header
    assert node_read_only(g, base)
    g.start_writer(HALF)
    g.wait_writes(3)
    snapshot(g, "d0", ov1, "ov1")  # base <- disk (d0) <- ov1 (the guest's)
    g.wait_writes(2)

    # Intermediate commit (d0 into the base) cancelled at a random point: the base goes back read-only.
    g.mon("block-commit", {"job-id": "ci", "device": "ov1", "top-node": "d0", "base": str(base),
                           "speed": 4 * MiB})
    cancel_at_random_point(g, "ci", rng)
    assert node_read_only(g, base)
    assert backing_depth(g, "ov1") == 2
    g.wait_writes(2)

    # Active commit (ov1 into the base) cancelled at a random point before ready.
    g.mon("block-commit", {"job-id": "ca", "device": "ov1", "speed": 4 * MiB})
    cancel_at_random_point(g, "ca", rng)
    g.wait_writes(2)

    # Active commit cancelled after ready: completes without a pivot, the base equal to the disk then.
    g.mon("block-commit", {"job-id": "cr", "device": "ov1"})
    g.mon.wait_event("BLOCK_JOB_READY", "cr")
    g.wait_writes(2)  # in sync while the guest writes
    g.stop_writer()
    at_cancel = guest_md5(g)
    g.mon("block-job-cancel", {"device": "cr"})
    wait_job(g, "cr")
    (block,) = [b for b in g.mon("query-block") if b["qdev"].endswith("vblk0")]
    assert block["inserted"]["node-name"] == "ov1"  # no pivot
    assert backing_depth(g, "ov1") == 2
    g.start_writer(HALF)
    g.wait_writes(3)
    g.stop_writer()
    final = guest_md5(g)
    g.power_off()

    for image in (base, disk, ov1):
        qemu_img_check(image)
    assert info(ov1)["backing-filename"] == str(disk)
    assert info(disk)["backing-filename"] == str(base)
    assert host_md5(ov1, tmp_path) == final
    assert host_md5(disk, tmp_path) != final  # the guest's later writes went to ov1 only
    # The base (no backing file of its own) is the disk as the guest saw it when the ready commit was
    # cancelled.
    assert "backing-filename" not in info(base)
    assert host_md5(base, tmp_path) == at_cancel
    assert at_cancel != final


@pytest.mark.parametrize("kind", KINDS)
def test_mirror_cancel_and_switch(guest, tmp_path, kind):  # type: ignore[no-untyped-def]
    rng = random.Random()
    g = guest(kind)  # d0 = disk.raw
    g.start_writer(HALF)
    g.wait_writes(3)

    # A mirror cancelled at a random point leaves a consistent (partial) qcow2 copy and a running guest.
    partial = tmp_path / "partial.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(partial), str(DISK_SIZE))
    g.mon("blockdev-add", {"driver": "qcow2", "node-name": "tgt0",
                           "file": {"driver": "file", "filename": str(partial)}})
    g.mon("blockdev-mirror", {"job-id": "m0", "device": "d0", "target": "tgt0", "sync": "full",
                              "speed": 4 * MiB})
    cancel_at_random_point(g, "m0", rng)
    g.mon("blockdev-del", {"node-name": "tgt0"})
    qemu_img_check(partial)

    # Mirror -> ready -> complete, paused at the switch: source and target are equal there.
    target = tmp_path / "target.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(target), str(DISK_SIZE))
    g.mon("blockdev-add", {"driver": "raw", "node-name": "tgt",
                           "file": {"driver": "file", "filename": str(target)}})
    g.mon("blockdev-mirror", {"job-id": "m1", "device": "d0", "target": "tgt", "sync": "full"})
    g.mon.wait_event("BLOCK_JOB_READY", "m1")
    g.wait_writes(3)  # in sync while the guest writes
    g.mon("stop")
    g.mon("job-complete", {"id": "m1"})
    wait_job(g, "m1")
    assert g.disk.read_bytes() == target.read_bytes()
    g.mon("cont")
    (block,) = [b for b in g.mon("query-block") if b["qdev"].endswith("vblk0")]
    assert block["inserted"]["node-name"] == "tgt"
    g.wait_writes(3)  # the guest keeps running, on the target

    g.stop_writer()
    final = guest_md5(g)
    g.power_off()

    assert hashlib.md5(target.read_bytes()).hexdigest() == final
    assert g.disk.read_bytes() != target.read_bytes()  # writes after the switch went to the target


@pytest.mark.parametrize("kind", KINDS)
def test_block_resize_grows_the_running_disk(guest, tmp_path, kind):  # type: ignore[no-untyped-def]
    g = guest(kind)  # d0 = disk.raw
    g.start_writer(HALF)
    g.wait_writes(2)
    # block_resize grows the running disk: the guest sees it (config-change interrupt) and uses the space.
    new_size = DISK_SIZE + 16 * MiB
    g.mon("block_resize", {"node-name": "d0", "size": new_size})
    deadline = time.monotonic() + 60
    while int(g.sh("cat /sys/block/vda/size")) != new_size // 512:
        assert time.monotonic() < deadline, "the guest never saw the new size"
        g.sh("sleep 0.5")
    far = DISK_SIZE // BLOCK + 100
    g.sh(f"dd if=/dev/urandom of=/tmp/far bs=65536 count=4 2>/dev/null; "
         f"dd if=/tmp/far of=/dev/vda bs=65536 seek={far} oflag=direct conv=notrunc 2>/dev/null")
    assert guest_md5(g, skip=far, count=4) == g.sh("md5sum /tmp/far").split()[0]
    g.wait_writes(2)
    g.stop_writer()
    final = guest_md5(g)
    g.power_off()
    assert g.disk.stat().st_size == new_size
    assert hashlib.md5(g.disk.read_bytes()).hexdigest() == final
