#!/usr/bin/env python3
"""Live image operations benchmark (issue 12): mirror and stream jobs in pyemu against QEMU on the same images.

Both run in a VM started ``-S`` (the guest never runs: the job alone moves data) with the disk as node ``d0``
under a virtio-blk device -- pyemu (``python -m pyemu.system.main`` with a spinning stub kernel) against
``qemu-system-x86_64 -M microvm -S`` -- driven over one QMP session (the VM plumbing is
:func:`nbd.stopped_vm`, shared with the backup benchmark). Cases:

* ``mirror``: ``blockdev-mirror sync=full`` of a dense ``--size`` MiB raw disk (default 512) to an empty
  qcow2 target of the same size added with ``blockdev-add``; the time is from the command to
  ``BLOCK_JOB_READY`` (every byte copied, source and target in sync). The job is then cancelled (after ready:
  the target stays a consistent copy) and the target compared with the source (``qemu-img compare``).
* ``stream``: ``block-stream`` into an empty qcow2 overlay whose backing file is the dense raw image; the time
  is from the command to ``BLOCK_JOB_COMPLETED`` (every byte copied up and the backing link dropped). The
  overlay must then have no backing file and equal the raw image.

VM start-up and image creation are outside the timed part. The kinds take turns (which goes first alternates
by repetition), ``--reps`` times (default 5, ``--quick`` 1); medians of wall time, MB = 10^6 bytes of disk
size. The load average goes with every sample (the machine is shared).

Results: a table (pyemu MB/s, QEMU MB/s, ratio pyemu/QEMU: above 1 means pyemu is faster) and
``benchmarks/results/image_ops.json`` (a run of some cases keeps the other cases' figures).

Usage: python benchmarks/image_ops.py [--quick] [--reps 5] [--size MiB] [--only mirror,stream]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbd as nb  # noqa: E402  (benchmarks/nbd.py: dense images, the -S VM with a QMP session)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "image_ops.json"
MiB = 1 << 20
CASES = ("mirror", "stream")


def command(qmp: Any, kind: str, name: str, args: dict[str, Any]) -> None:
    reply = qmp.cmd_raw(name, args)
    if "error" in reply:
        raise RuntimeError(f"{kind}: {name}: {reply['error']}")


def wait_event(qmp: Any, kind: str, wanted: str) -> dict[str, Any]:
    """The next job event; it must be ``wanted`` (a job that ended otherwise is an error)."""
    ends = {"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"}
    while True:
        event = qmp.pull_event(wait=600.0)
        if event is not None and event["event"] in ends:
            if event["event"] != wanted or "error" in event.get("data", {}):
                raise RuntimeError(f"{kind}: waiting for {wanted}, got {event}")
            return event


def compare(kind: str, first: Path, first_fmt: str, second: Path, second_fmt: str) -> None:
    result = subprocess.run(["qemu-img", "compare", "-q", "-f", first_fmt, "-F", second_fmt, str(first),
                             str(second)])
    if result.returncode != 0:
        raise RuntimeError(f"{kind}: {second.name} differs from {first.name}")


def run_mirror(kind: str, work: Path, size: int) -> float:
    source, target = work / "dense.img", work / "mirror.qcow2"
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)], check=True)
    with nb.stopped_vm(kind, work, source) as qmp:
        command(qmp, kind, "blockdev-add", {"driver": "qcow2", "node-name": "t0",
                                            "file": {"driver": "file", "filename": str(target)}})
        start = time.monotonic()
        command(qmp, kind, "blockdev-mirror", {"job-id": "bench", "device": "d0", "target": "t0", "sync": "full"})
        wait_event(qmp, kind, "BLOCK_JOB_READY")
        seconds = time.monotonic() - start
        command(qmp, kind, "block-job-cancel", {"device": "bench"})  # after ready: ends as completed
        wait_event(qmp, kind, "BLOCK_JOB_COMPLETED")
        command(qmp, kind, "blockdev-del", {"node-name": "t0"})
    compare(kind, source, "raw", target, "qcow2")
    target.unlink()
    return seconds


def run_stream(kind: str, work: Path, size: int) -> float:
    backing, overlay = work / "dense.img", work / "overlay.qcow2"
    with contextlib.suppress(FileNotFoundError):
        overlay.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(overlay),
                    str(size)], check=True)
    with nb.stopped_vm(kind, work, overlay, fmt="qcow2") as qmp:
        start = time.monotonic()
        command(qmp, kind, "block-stream", {"job-id": "bench", "device": "d0"})
        wait_event(qmp, kind, "BLOCK_JOB_COMPLETED")
        seconds = time.monotonic() - start
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], check=True,
                                     capture_output=True, text=True).stdout)
    if "backing-filename" in info:
        raise RuntimeError(f"{kind}: the streamed overlay still names its backing file")
    compare(kind, backing, "raw", overlay, "qcow2")
    overlay.unlink()
    return seconds


RUNNERS = {"mirror": run_mirror, "stream": run_stream}


def main() -> int:
    for tool in ("qemu-img", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (Debian: qemu-utils, qemu-system-x86)", file=sys.stderr)
            return 2
    reps, size, cases = nb.options(__doc__.split("\n")[0], CASES, reps=5, size_mib=512, quick_size_mib=128)
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="pyemu-imageops-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) \
            as tmp:
        work = Path(tmp)
        nb.make_image(work / "dense.img", size, sparse=False, seed=1)
        for case in cases:
            results[case] = nb.measure(lambda kind: RUNNERS[case](kind, work, size), reps, size,
                                       warm_files=[work / "dense.img"])
    nb.report(results, reps, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
