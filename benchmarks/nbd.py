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

The backup half (issue 11's second figure):

* ``backup``: a full backup job (``blockdev-backup sync=full``) of the dense raw image (``-blockdev`` file +
  raw nodes under a virtio-blk device) to an empty qcow2 target of the same size added with
  ``blockdev-add``, in a VM started ``-S`` (the guest never runs: the job alone moves data): pyemu
  (``python -m pyemu.system.main`` with a spinning stub kernel) against ``qemu-system-x86_64 -M microvm -S``.
  The time is from sending ``blockdev-backup`` to its ``BLOCK_JOB_COMPLETED`` event on the same QMP session;
  VM start-up and the target's creation are outside it. The target is compared with the source
  (``qemu-img compare``) afterwards.

Results: a table (pyemu MB/s, QEMU MB/s, ratio pyemu/QEMU: above 1 means pyemu is faster) and
``benchmarks/results/nbd.json``.

Usage: python benchmarks/nbd.py [--quick] [--reps 3] [--size MiB] [--only read,read-sparse,write,backup]
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
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "nbd.json"
MiB = 1 << 20
PYEMU_NBD = [sys.executable, "-m", "pyemu.block.nbd.cli"]
CASES = ("read", "read-sparse", "write", "backup")


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


def stub_kernel(work: Path) -> Path:
    """A multiboot kernel that only spins: pyemu needs a kernel to build its VM, which never runs (-S)."""
    from pyemu.target.x86.boot.synthetic import make_multiboot_binary

    kernel = work / "spin.bin"
    if not kernel.exists():
        kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    return kernel


@contextlib.contextmanager
def stopped_vm(kind: str, work: Path, source: Path, fmt: str = "raw") -> Iterator["QEMUMonitorProtocol"]:
    """A VM started -S with ``source`` as node d0 (format ``fmt``) under a virtio-blk device; its QMP
    session."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    sock = work / f"{kind}-qmp.sock"
    common = ["-S", "-qmp", f"unix:{sock},server=on,wait=off",
              "-blockdev", f"driver=file,node-name=f0,filename={source}",
              "-blockdev", f"driver={fmt},node-name=d0,file=f0", "-device", "virtio-blk-device,drive=d0,id=vblk0"]
    if kind == "pyemu":
        argv = [sys.executable, "-m", "pyemu.system.main", "-kernel", str(stub_kernel(work)), "-m", "32",
                "-serial", "none", "-display", "none", *common]
    else:
        argv = ["qemu-system-x86_64", "-M", "microvm", "-nodefaults", "-display", "none", "-m", "32", *common]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    qmp = None
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: VM did not start ({proc.poll()})")
            time.sleep(0.05)
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect(negotiate=True)
        yield qmp
    finally:
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.cmd_raw("quit", {})  # a clean exit: the images are flushed and closed
                proc.wait(timeout=60)
            with contextlib.suppress(Exception):
                qmp.close()
        proc.kill()
        proc.wait()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def run_backup(kind: str, work: Path, size: int) -> float:
    source = work / "dense.img"
    target = work / "backup.qcow2"
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)], check=True)
    with stopped_vm(kind, work, source) as qmp:
        reply = qmp.cmd_raw("blockdev-add", {"driver": "qcow2", "node-name": "t0",
                                             "file": {"driver": "file", "filename": str(target)}})
        if "error" in reply:
            raise RuntimeError(f"{kind}: blockdev-add: {reply['error']}")
        start = time.monotonic()
        reply = qmp.cmd_raw("blockdev-backup", {"job-id": "bench", "device": "d0", "target": "t0",
                                                "sync": "full"})
        if "error" in reply:
            raise RuntimeError(f"{kind}: blockdev-backup: {reply['error']}")
        while True:
            event = qmp.pull_event(wait=600.0)
            if event is not None and event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                break
        seconds = time.monotonic() - start
        if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
            raise RuntimeError(f"{kind}: backup job ended with {event}")
        qmp.cmd_raw("blockdev-del", {"node-name": "t0"})
    compare = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(source), str(target)])
    if compare.returncode != 0:
        raise RuntimeError(f"{kind}: the backup differs from its source")
    target.unlink()
    return seconds


def run_case(case: str, kind: str, work: Path, size: int) -> float:
    if case == "backup":
        return run_backup(kind, work, size)
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


def options(description: str, cases: tuple[str, ...], *, reps: int, size_mib: int,
            quick_size_mib: int) -> tuple[int, int, list[str]]:
    """The benchmarks' common command line (--quick, --reps, --size MiB, --only): reps, size in bytes and
    the cases chosen."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--size", type=int, help="image size in MiB")
    parser.add_argument("--only", default=",".join(cases))
    args = parser.parse_args()
    chosen = [c for c in args.only.split(",") if c]
    for case in chosen:
        if case not in cases:
            parser.error(f"unknown case {case!r} (choose from {', '.join(cases)})")
    return args.reps or (1 if args.quick else reps), (args.size or (quick_size_mib if args.quick else size_mib)) \
        * MiB, chosen


def main() -> int:
    for tool in ("nbdcopy", "qemu-nbd", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (Debian: libnbd-bin, qemu-utils, qemu-system-x86)", file=sys.stderr)
            return 2
    reps, size, cases = options(__doc__.split("\n")[0], CASES, reps=3, size_mib=1024, quick_size_mib=256)
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="pyemu-nbd-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        work = Path(tmp)
        make_image(work / "dense.img", size, sparse=False, seed=1)
        make_image(work / "sparse.img", size, sparse=True, seed=2)
        for case in cases:
            results[case] = measure(lambda kind: run_case(case, kind, work, size), reps, size,
                                    warm_files=[work / "dense.img", work / "sparse.img"])
    report(results, reps, RESULTS)
    return 0


def measure(run_one: Callable[[str], float], reps: int, size: int, *, warm_files: list[Path]) -> dict[str, object]:
    """``reps`` samples of ``run_one(kind)`` for pyemu and QEMU taking turns (which goes first alternates),
    ``warm_files`` read into the page cache before each; medians, MB/s of ``size`` bytes, ratio and loads."""
    samples: dict[str, list[float]] = {"pyemu": [], "qemu": []}
    loads: list[float] = []
    for rep in range(reps):
        order = ("pyemu", "qemu") if rep % 2 == 0 else ("qemu", "pyemu")
        for kind in order:
            for path in warm_files:
                warm(path)
            loads.append(os.getloadavg()[0])
            samples[kind].append(run_one(kind))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    mbs = {k: size / 1e6 / s for k, s in medians.items()}
    return {"size_bytes": size, "seconds": samples, "median_seconds": medians, "mb_per_s": mbs,
            "ratio_pyemu_over_qemu": mbs["pyemu"] / mbs["qemu"], "load_average": loads}


def report(results: dict[str, dict[str, object]], reps: int, path: Path) -> None:
    """Print the table and write ``path``; a run of some cases (--only) keeps the other cases' last figures."""
    print(f"{'case':<12} {'pyemu MB/s':>11} {'QEMU MB/s':>10} {'ratio':>7}")
    for case, r in results.items():
        rates = r["mb_per_s"]
        assert isinstance(rates, dict)
        print(f"{case:<12} {rates['pyemu']:>11.1f} {rates['qemu']:>10.1f} {r['ratio_pyemu_over_qemu']:>7.2f}")
    path.parent.mkdir(exist_ok=True)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for r in results.values():
        r["reps"] = reps
        r["when"] = when
    previous: dict[str, object] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        old = json.loads(path.read_text())
        if isinstance(old.get("cases"), dict):
            previous = old["cases"]
    path.write_text(json.dumps({"reps": reps, "cases": {**previous, **results}, "cpus": os.cpu_count(),
                                "when": when}, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main())
