#!/usr/bin/env python3
"""NBD benchmark: ``nbdcopy`` against a ``pyemu-nbd`` export and against a ``qemu-nbd`` export of the same file.

Both servers serve one raw image over a Unix socket with the same options (``-f raw -t -e 0``, read-only for
reads: multi-conn is then advertised by both, so nbdcopy uses its default 4 connections and 64 requests in
flight per connection). The image is ``--size`` MiB (default 1024, ``--quick`` 256) of seeded pseudo-random
data, fully allocated, read once beforehand so it sits in the host page cache: the figure is the server's
request path, not the disk. Cases:

* ``read``: ``nbdcopy URL null:`` -- every byte crosses the socket, nothing is written;
* ``read-sparse``: the same on an image that is 1 MiB data / 1 MiB hole: block status lets nbdcopy skip
  holes, so this measures base:allocation as well;
* ``write``: ``nbdcopy SRC URL`` into a writable export (``-e 0`` without ``-r``: pyemu advertises
  multi-conn for shared writable exports, qemu-nbd does not, so nbdcopy may use fewer connections there --
  the table shows what each server lets a client do). The target file is pre-allocated.

The servers take turns on the same files (which goes first alternates by repetition); ``--reps`` times
(default 3, ``--quick`` 1); medians of wall time of the nbdcopy command, MB = 10^6 bytes of image size. The
load average goes with every sample (the machines are shared). Each copy is checked against the source
(cmp of the written image for ``write``) outside the timed part.

Results: a table (pyemu MB/s, QEMU MB/s, ratio pyemu/QEMU: above 1 means pyemu is faster) and
``benchmarks/results/nbd.json``. The backup-job half of issue 11's benchmark belongs with the job code.

Usage: python benchmarks/nbd.py [--quick] [--reps 3] [--size MiB] [--only read,read-sparse,write]
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "nbd.json"
MiB = 1 << 20
PYEMU_NBD = [sys.executable, "-m", "pyemu.block.nbd.cli"]
CASES = ("read", "read-sparse", "write")


def make_image(path: Path, size: int, *, sparse: bool, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, MiB):
            if sparse and (offset // MiB) % 2:
                continue
            f.seek(offset)
            f.write(rng.randbytes(MiB))


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"no server on {path}")


@contextlib.contextmanager
def server(kind: str, image: Path, sock: Path, *, writable: bool) -> Iterator[None]:
    args = ["-f", "raw", "-t", "-e", "0", "-k", str(sock)] + ([] if writable else ["-r"]) + [str(image)]
    argv = (PYEMU_NBD if kind == "pyemu" else ["qemu-nbd"]) + args
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        yield
    finally:
        proc.kill()  # qemu-nbd waits for clients on SIGTERM; nbdcopy has finished anyway
        proc.wait()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.monotonic() - start


def run_case(case: str, kind: str, work: Path, size: int) -> float:
    sock = work / f"{kind}.sock"
    url = f"nbd+unix:///?socket={sock}"
    if case in ("read", "read-sparse"):
        image = work / ("dense.img" if case == "read" else "sparse.img")
        with server(kind, image, sock, writable=False):
            seconds = timed(["nbdcopy", url, "null:"])
            check = work / "check.img"
            subprocess.run(["nbdcopy", url, str(check)], check=True)
            if not filecmp.cmp(check, image, shallow=False):
                raise RuntimeError(f"{kind}: nbdcopy read different data")
            check.unlink()
        return seconds
    target = work / "target.img"
    with open(target, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    with server(kind, target, sock, writable=True):
        seconds = timed(["nbdcopy", str(work / "dense.img"), url])
    if not filecmp.cmp(target, work / "dense.img", shallow=False):
        raise RuntimeError(f"{kind}: nbdcopy wrote different data")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--size", type=int, help="image size in MiB")
    parser.add_argument("--only", default=",".join(CASES))
    args = parser.parse_args()
    for tool in ("nbdcopy", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (Debian: libnbd-bin, qemu-utils)", file=sys.stderr)
            return 2
    reps = args.reps or (1 if args.quick else 3)
    size = (args.size or (256 if args.quick else 1024)) * MiB
    cases = [c for c in args.only.split(",") if c]
    for case in cases:
        if case not in CASES:
            parser.error(f"unknown case {case!r} (choose from {', '.join(CASES)})")
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="pyemu-nbd-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        work = Path(tmp)
        make_image(work / "dense.img", size, sparse=False, seed=1)
        make_image(work / "sparse.img", size, sparse=True, seed=2)
        for case in cases:
            samples: dict[str, list[float]] = {"pyemu": [], "qemu": []}
            loads: list[float] = []
            for rep in range(reps):
                order = ("pyemu", "qemu") if rep % 2 == 0 else ("qemu", "pyemu")
                for kind in order:
                    warm(work / "dense.img")
                    warm(work / "sparse.img")
                    loads.append(os.getloadavg()[0])
                    samples[kind].append(run_case(case, kind, work, size))
            medians = {k: statistics.median(v) for k, v in samples.items()}
            mbs = {k: size / 1e6 / s for k, s in medians.items()}
            results[case] = {"size_bytes": size, "seconds": samples, "median_seconds": medians,
                             "mb_per_s": mbs, "ratio_pyemu_over_qemu": mbs["pyemu"] / mbs["qemu"],
                             "load_average": loads}
    print(f"{'case':<12} {'pyemu MB/s':>11} {'QEMU MB/s':>10} {'ratio':>7}")
    for case, r in results.items():
        mbs = r["mb_per_s"]
        assert isinstance(mbs, dict)
        print(f"{case:<12} {mbs['pyemu']:>11.1f} {mbs['qemu']:>10.1f} {r['ratio_pyemu_over_qemu']:>7.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"reps": reps, "cases": results, "cpus": os.cpu_count(),
                                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
