#!/usr/bin/env python3
"""Block-layer benchmark: pyemu-img and pyemu's qcow2 driver against qemu-img and QEMU 7.2, side by side.

Three parts; the two tools take turns on the same files in the same run (which goes first alternates by
repetition), ``--reps`` times (default 3, ``--quick`` 1); figures are medians, timed with the host's
monotonic clock; the load average is recorded with every sample (the machine is shared):

* ``convert``: ``pyemu-img convert`` vs ``qemu-img convert`` of a 1 GiB raw image (``--quick``: 256 MiB)
  that is half data and half holes: 1 MiB of seeded pseudo-random data, then a 1 MiB hole (a real hole in
  the host file), and so on. raw->qcow2, and qcow2->raw from a qcow2 made by qemu-img of that raw, so both
  tools read the same file. Each tool runs with its default cache modes; the figure is the wall time of the
  whole command (process start-up included: ``startup`` in the JSON is what ``--version`` costs each tool;
  ``convert_without_startup`` takes it off, a secondary figure) and MB/s of virtual size (MB = 10^6 bytes).
  The sources are synced before the first run. Every output is checked with ``qemu-img compare`` against
  the source, outside the timed part.
* ``bench``: ``pyemu-img bench`` vs ``qemu-img bench``, identical arguments, 4 KiB requests on a fully
  allocated qcow2 (1 GiB, made by qemu-img from a patterned raw image, read once so it sits in the host page
  cache; default cache mode, as both tools default). qemu-img bench walks the image from ``-o`` in steps of
  ``-S`` modulo its size; a step of about 0.618 of the image (golden-ratio stride, 4 KiB aligned, odd number
  of 4 KiB blocks so it visits every block before repeating) scatters consecutive requests over the whole
  image. Reads and writes (``-w --pattern=0xa5``: overwrites, the image stays fully allocated), queue
  depth 1 and 16. IOPS = requests / the "Run completed in" time the tool reports.
* ``guest``: sequential read inside the Debian guest of a 256 MiB fully written qcow2 (made by qemu-img) on
  ``-drive format=qcow2,if=none,cache=none`` + virtio-blk-device, pyemu TCG vs QEMU 7.2 TCG. This reuses
  ``benchmarks/virtio.py`` whole: its guest helper and initramfs, its boot/console/retry loop and its
  host-clock timing of the helper's ``O_DIRECT`` 1 MiB sequential read (see that file's docstring; QEMU
  gets ``tsc_early_khz=`` there too).

Results: a table (pyemu, QEMU, ratio pyemu/QEMU; for seconds a ratio above 1 means pyemu is slower) and
``benchmarks/results/block.json``. Parts not run (``--only``) keep their figures from the previous results
file; ``carried_over`` gives the date they were measured.

Usage: python benchmarks/block.py [--quick] [--reps 3] [--only convert,bench,guest] [--count N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import virtio as vb  # noqa: E402  (benchmarks/virtio.py: guest helper, boot and console machinery)
from host_memory import read_through  # noqa: E402  (benchmarks/host_memory.py)

from pyemu.guest.assets import find_assets  # noqa: E402

HERE = vb.HERE
RESULTS = HERE / "results" / "block.json"
MiB = vb.MiB
PYEMU_IMG = [sys.executable, "-m", "pyemu.img.cli"]  # not the console script: a pyenv shim adds ~0.1 s
PARTS = ("convert", "bench", "guest")

CONVERT_MIB, CONVERT_MIB_QUICK = 1024, 256
BENCH_MIB, BENCH_MIB_QUICK = 1024, 256
BENCH_COUNT, BENCH_COUNT_QUICK = 100_000, 20_000
GUEST_MIB = 256
DATA_SEED = 20261203
IMG_TIMEOUT = 600  # one convert or bench command
COMPARE_TIMEOUT = 300
BENCH_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")

# rows of the table: (figure, title, unit, key of the value in that figure's samples)
ROWS = [
    ("convert_raw_to_qcow2", "convert raw->qcow2", "MB/s", "mbps"),
    ("convert_raw_to_qcow2", "convert raw->qcow2", "s", "secs"),
    ("convert_qcow2_to_raw", "convert qcow2->raw", "MB/s", "mbps"),
    ("convert_qcow2_to_raw", "convert qcow2->raw", "s", "secs"),
    ("bench_read_qd1", "bench 4 KiB read, QD1", "IOPS", "iops"),
    ("bench_write_qd1", "bench 4 KiB write, QD1", "IOPS", "iops"),
    ("bench_read_qd16", "bench 4 KiB read, QD16", "IOPS", "iops"),
    ("bench_write_qd16", "bench 4 KiB write, QD16", "IOPS", "iops"),
    ("guest_seqread", "guest seq read qcow2, O_DIRECT 1 MiB", "MB/s", "mbps"),
]


class CommandFailed(Exception):
    pass


def run(argv: list[str], timeout: float) -> tuple[float, str]:
    """Run ``argv``; its wall time by the host clock and its stdout. Non-zero exit or timeout: CommandFailed."""
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{' '.join(argv)}: no exit within {timeout:.0f} s") from None
    secs = time.monotonic() - started
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout)[-400:]}")
    return secs, proc.stdout


def prepare_pyemu(workdir: Path) -> None:
    """Leave pyemu as an installed package is after its first use, so the timed commands do not pay for a
    first run: modules byte-compiled (with PYTHONDONTWRITEBYTECODE set, modules changed since their cached
    bytecode would otherwise be compiled again in every timed command), and the table of compiled dataclass
    methods (:mod:`pyemu.system.dataclass_code`, which is written only where Python writes bytecode) filled
    by one small run of each timed subcommand without that variable."""
    import compileall

    compileall.compile_dir(str(HERE.parent), quiet=2, workers=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    small = workdir / "warm-up.raw"
    with open(small, "wb") as handle:
        handle.write(b"\1" * MiB)
    for argv in (["convert", "-f", "raw", "-O", "qcow2", str(small), str(workdir / "warm-up.qcow2")],
                 ["convert", "-f", "qcow2", "-O", "raw", str(workdir / "warm-up.qcow2"), str(workdir / "warm-up.out")],
                 ["bench", "-f", "qcow2", "-c", "10", str(workdir / "warm-up.qcow2")]):
        subprocess.run([*PYEMU_IMG, *argv], env=env, capture_output=True, timeout=60, check=True)
    for name in ("warm-up.raw", "warm-up.qcow2", "warm-up.out"):
        (workdir / name).unlink(missing_ok=True)


def first_line(argv: list[str]) -> str:
    try:
        return run(argv, 30)[1].splitlines()[0]
    except (CommandFailed, OSError, IndexError) as error:
        return f"unknown ({error})"


class Figures:
    """Samples per figure and tool (each a dict with the row keys), errors, and their medians."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.errors: dict[str, list[str]] = {}
        self.extra: dict[str, dict[str, Any]] = {}

    def measure(self, figure: str, tool: str, attempt_fn: Callable[[], dict[str, Any]], attempts: int = 2
                ) -> None:
        """Call ``attempt_fn()`` (returns a sample dict) until it succeeds, at most ``attempts`` times."""
        for _ in range(attempts):
            before = vb.load1()
            try:
                sample = attempt_fn()
            except CommandFailed as failed:
                self.errors.setdefault(figure, []).append(f"{tool}: {failed}")
                print(f"  {tool:5} {figure:22} failed: {failed}", file=sys.stderr, flush=True)
                continue
            sample["load1"] = [before, vb.load1()]
            self.samples.setdefault(figure, {}).setdefault(tool, []).append(sample)
            shown = ", ".join(f"{k} {sample[k]:.2f}" for k in ("secs", "mbps", "iops") if k in sample)
            print(f"  {tool:5} {figure:22} {shown}  (load {before})", flush=True)
            return

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for figure, title, unit, key in ROWS:
            if figure not in self.samples and figure not in self.errors:
                continue
            entry = out.setdefault(figure, {"what": title, **self.extra.get(figure, {})})
            for tool, samples in self.samples.get(figure, {}).items():
                values = [s[key] for s in samples]
                tool_entry = entry.setdefault(tool, {"samples": samples})
                tool_entry[f"median_{key}"] = round(statistics.median(values), 3)
                tool_entry[f"values_{key}"] = [round(v, 3) for v in values]
            if figure in self.errors:
                entry["errors"] = self.errors[figure]
        return out


# -- images ---------------------------------------------------------------------------------------------------
def make_half_sparse(path: Path, mib: int) -> None:
    """``mib`` MiB raw: even MiBs hold seeded pseudo-random data, odd MiBs are holes (never written)."""
    rng = random.Random(DATA_SEED)
    with open(path, "wb") as handle:
        handle.truncate(mib * MiB)
        for index in range(0, mib, 2):
            handle.seek(index * MiB)
            handle.write(rng.randbytes(MiB))
        handle.flush()
        os.fsync(handle.fileno())


def qemu_qcow2_of(qemu_img: str, raw: Path, qcow2: Path) -> None:
    """``qcow2`` made by qemu-img from ``raw``, synced: the host writing it back must not compete with the
    first timed runs (which would be whichever tool goes first in repetition 0)."""
    run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], IMG_TIMEOUT)
    fd = os.open(qcow2, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def turns(tools: dict[str, list[str]], rep: int) -> list[tuple[str, list[str]]]:
    """The tools in the order they run in repetition ``rep``: alternated, so neither always goes first
    (the first run after a file is deleted, or into memory the VM has not touched yet, is often slower)."""
    items = list(tools.items())
    return items if rep % 2 == 0 else items[::-1]


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


# -- parts ----------------------------------------------------------------------------------------------------
def part_convert(figs: Figures, tools: dict[str, list[str]], qemu_img: str, workdir: Path, mib: int,
                 reps: int) -> None:
    raw = workdir / "convert-src.raw"
    qcow2 = workdir / "convert-src.qcow2"
    print(f"convert: {mib} MiB raw, 1 MiB data / 1 MiB hole, and its qcow2 made by qemu-img", flush=True)
    make_half_sparse(raw, mib)
    qemu_qcow2_of(qemu_img, raw, qcow2)
    size = mib * MiB
    cases = [("convert_raw_to_qcow2", raw, "raw", "qcow2"), ("convert_qcow2_to_raw", qcow2, "qcow2", "raw")]
    for figure, src, src_fmt, dst_fmt in cases:
        figs.extra[figure] = {"virtual_bytes": size, "source_allocated_bytes": allocated_bytes(src)}
    for rep in range(reps):
        for figure, src, src_fmt, dst_fmt in cases:
            for tool, cmd in turns(tools, rep):
                dst = workdir / f"out-{tool}.{dst_fmt}"

                def attempt() -> dict[str, Any]:
                    dst.unlink(missing_ok=True)
                    # Start from written-back page cache: the last run's 512 MiB of dirty pages would
                    # otherwise throttle this one's writes at random (samples of ~1 s for either tool).
                    os.sync()
                    argv = [*cmd, "convert", "-f", src_fmt, "-O", dst_fmt, str(src), str(dst)]
                    secs, _ = run(argv, IMG_TIMEOUT)
                    sample: dict[str, Any] = {"secs": secs, "mbps": size / secs / 1e6,
                                              "output_allocated_bytes": allocated_bytes(dst)}
                    _, verdict = run([qemu_img, "compare", "-f", dst_fmt, "-F", src_fmt, str(dst), str(src)],
                                     COMPARE_TIMEOUT)  # exit 1 (different) fails the sample
                    sample["compare"] = verdict.strip()
                    return sample

                figs.measure(figure, tool, attempt)
                dst.unlink(missing_ok=True)
    raw.unlink()
    qcow2.unlink()


def golden_step(size: int, block: int = 4096) -> int:
    """A step of about 0.618 of the image, in whole blocks, coprime with the block count (a full cycle)."""
    blocks = size // block
    k = max(1, round(blocks * (math.sqrt(5) - 1) / 2))
    while math.gcd(k, blocks) != 1:
        k += 1
    return k * block


def part_bench(figs: Figures, tools: dict[str, list[str]], qemu_img: str, workdir: Path, mib: int, count: int,
               reps: int) -> dict[str, Any]:
    raw = workdir / "bench.raw"
    image = workdir / "bench.qcow2"
    print(f"bench: {mib} MiB fully allocated qcow2 made by qemu-img, {count} requests", flush=True)
    vb.make_image(raw, mib)
    qemu_qcow2_of(qemu_img, raw, image)
    raw.unlink()
    read_through(image)
    step = golden_step(mib * MiB)
    common = ["-f", "qcow2", "-c", str(count), "-s", "4096", "-S", str(step), "-o", "0"]
    variants = {f"bench_{op}_qd{depth}": common + ["-d", str(depth)] + (["-w", "--pattern=0xa5"] if op == "write"
                                                                         else [])
                for depth in (1, 16) for op in ("read", "write")}
    for figure, args in variants.items():
        figs.extra[figure] = {"args": args, "image_allocated_bytes": allocated_bytes(image)}
    for rep in range(reps):
        for figure, args in variants.items():
            for tool, cmd in turns(tools, rep):
                def attempt() -> dict[str, Any]:
                    wall, out = run([*cmd, "bench", *args, str(image)], IMG_TIMEOUT)
                    found = BENCH_COMPLETED.search(out)
                    if not found or float(found.group(1)) <= 0:
                        raise CommandFailed(f"no 'Run completed in' line: {out[-300:]!r}")
                    secs = float(found.group(1))
                    return {"secs": secs, "iops": count / secs, "wall_s": round(wall, 3)}

                figs.measure(figure, tool, attempt)
    _, check = run([qemu_img, "check", str(image)], COMPARE_TIMEOUT)
    image.unlink()
    return {"image_mib": mib, "count": count, "step": step, "qemu_img_check_after": check.strip()}


def part_guest(figs: Figures, qemu_img: str, qemu: str | None, workdir: Path, reps: int,
               tsc_khz: int | None) -> dict[str, Any]:
    """virtio.py's seqread on a qcow2 drive, both VMs up in one round taking turns (retried as there)."""
    assets = find_assets()
    if assets is None:
        return {"skipped": "guest assets missing: run 'pyemu-guest fetch'"}
    if shutil.which("gcc") is None:
        return {"skipped": "gcc is needed to build the guest helper (benchmarks/guest_io.c)"}
    helper = vb.build_helper(workdir)
    initrd = vb.build_initrd(assets.initrd, helper, workdir)
    raw, image = workdir / "guest.raw", workdir / "guest.qcow2"
    vb.make_image(raw, GUEST_MIB)
    qemu_qcow2_of(qemu_img, raw, image)
    raw.unlink()
    vms = {"pyemu": vb.pyemu_argv(assets.vmlinux, initrd)}
    if qemu is None:
        print("qemu-system-x86_64 not installed: the guest part's QEMU column is skipped", file=sys.stderr)
    else:
        vms["qemu"] = vb.qemu_argv(qemu, assets.vmlinux, initrd, tsc_khz)
    out: dict[str, Any] = {"image_mib": GUEST_MIB, "tsc_early_khz_for_qemu": tsc_khz}
    figs.extra["guest_seqread"] = {"timed": "host clock between the guest helper's GIO-START and result lines "
                                            "(benchmarks/virtio.py); the two VMs take turns sample by sample"}
    contenders = []
    for label, argv in vms.items():
        own = workdir / f"guest-{label}.qcow2"  # both VMs are up at once: each locks its own copy
        shutil.copyfile(image, own)
        with open(own, "rb+") as handle:  # an O_DIRECT read of a range still dirty waits for its writeback
            os.fsync(handle.fileno())
        drive = [a.replace("format=raw", "format=qcow2") for a in vb.disk_args(own)]
        argv = argv + drive
        print(f"guest {label}: {' '.join(argv)}", flush=True)
        plan = vb.Plan(reps=reps, image_mib=GUEST_MIB, net_mib=0, helper=helper, netns=None, net=False)
        contenders.append(vb.Contender(label, argv, plan, vb.VmResult()))
    vb.run_round(contenders, ["seqread"], workdir)
    for c in contenders:
        result = c.result
        out[c.label] = {"argv": c.argv, "sessions": result.sessions}
        for sample in result.samples["seqread"]:
            sample["mbps"] = sample["value"]
        if result.samples["seqread"]:
            figs.samples.setdefault("guest_seqread", {})[c.label] = result.samples["seqread"]
        for error in result.errors["seqread"] + [s["failure"] for s in result.sessions if "failure" in s]:
            figs.errors.setdefault("guest_seqread", []).append(f"{c.label}: {error}")
    pairs = vb.paired_ratios({c.label: c.result for c in contenders}, "seqread")
    if pairs:
        out["paired_ratios"] = [round(r, 3) for r in pairs]
        out["paired_ratio_median"] = round(statistics.median(pairs), 3)
    return out


# -- main -----------------------------------------------------------------------------------------------------
def comparison(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for figure, title, unit, key in ROWS:
        if figure not in summary:
            continue
        values = {tool: summary[figure].get(tool, {}).get(f"median_{key}") for tool in ("pyemu", "qemu")}
        ratio = round(values["pyemu"] / values["qemu"], 3) if values["pyemu"] and values["qemu"] else None
        rows.append({"figure": figure, "what": title, "unit": unit, **values, "ratio_pyemu_over_qemu": ratio})
    return rows


def carry_over(report: dict[str, Any], previous_path: Path, skipped: list[str]) -> None:
    """Keep the figures of the parts not run this time (``--only``) from the previous results file, marked
    with that file's date, so a convert/bench run does not drop the guest figures measured earlier."""
    if not skipped or not previous_path.exists():
        return
    try:
        previous = json.loads(previous_path.read_text())
    except (OSError, ValueError):
        return
    kept = {}
    for part in skipped:
        names = [figure for figure, *_ in ROWS if figure.startswith(part)]
        found = {name: previous["figures"][name] for name in names if name in previous.get("figures", {})}
        if not found:
            continue
        report["figures"].update(found)
        if part in previous:
            report[part] = previous[part]
        kept[part] = previous.get("carried_over", {}).get(part, previous.get("date"))
    if kept:
        report["carried_over"] = kept


def copy_only(summary: dict[str, Any], startup: dict[str, float]) -> dict[str, Any]:
    """convert's MB/s with each tool's own start-up (its ``--version`` time) taken off the median wall time:
    how the copies themselves compare, apart from Python's start-up, which the whole-command figure
    includes. A secondary figure; the whole command is the one compared."""
    out: dict[str, Any] = {}
    for figure in ("convert_raw_to_qcow2", "convert_qcow2_to_raw"):
        entry = summary.get(figure, {})
        secs = {tool: entry.get(tool, {}).get("median_secs") for tool in ("pyemu", "qemu")}
        if not secs["pyemu"] or not secs["qemu"]:
            continue
        mbps = {tool: round(entry["virtual_bytes"] / max(1e-3, secs[tool] - startup[tool]) / 1e6, 1)
                for tool in secs}
        out[figure] = {**{f"{tool}_mbps": v for tool, v in mbps.items()},
                       "ratio_pyemu_over_qemu": round(mbps["pyemu"] / mbps["qemu"], 3)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (median taken)")
    parser.add_argument("--quick", action="store_true", help="one repetition, smaller images, fewer requests")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: convert,bench,guest")
    parser.add_argument("--count", type=int, help=f"bench requests per run (default {BENCH_COUNT}, quick "
                                                  f"{BENCH_COUNT_QUICK})")
    parser.add_argument("--tsc-khz", type=int, help="host TSC kHz for QEMU's tsc_early_khz (default: from dmesg)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        parser.error(f"--only takes parts from {','.join(PARTS)}; not {','.join(sorted(unknown)) or 'empty'}")
    reps = 1 if args.quick else max(1, args.reps)
    convert_mib = CONVERT_MIB_QUICK if args.quick else CONVERT_MIB
    bench_mib = BENCH_MIB_QUICK if args.quick else BENCH_MIB
    count = args.count or (BENCH_COUNT_QUICK if args.quick else BENCH_COUNT)
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        print("qemu-img not found (Debian package qemu-utils): it is the reference, makes the qcow2 sources and "
              "checks every output, so nothing can be measured without it", file=sys.stderr)
        return 2
    qemu = shutil.which("qemu-system-x86_64")
    tsc_khz, tsc_source = (args.tsc_khz, "--tsc-khz") if args.tsc_khz else vb.host_tsc_khz()
    tools = {"pyemu": PYEMU_IMG, "qemu": [qemu_img]}
    workdir = Path(tempfile.mkdtemp(prefix="pyemu-block-bench-", dir="/var/tmp"))
    try:
        prepare_pyemu(workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    startup, _ = run([*PYEMU_IMG, "--version"], 60)
    qemu_startup, _ = run([qemu_img, "--version"], 60)
    git = subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, timeout=30).stdout.strip()
    report: dict[str, Any] = {
        "benchmark": "block layer: pyemu-img convert/bench vs qemu-img 7.2, guest qcow2 read pyemu TCG vs QEMU TCG",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": {**vb.host_info(qemu, tsc_khz, tsc_source), "qemu_img": first_line([qemu_img, "--version"]),
                 "pyemu_img": first_line([*PYEMU_IMG, "--version"]), "pyemu_git": git},
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {"reps": reps, "parts": parts, "convert_mib": convert_mib, "bench_mib": bench_mib,
                     "bench_count": count, "guest_mib": GUEST_MIB, "data_seed": DATA_SEED,
                     "pyemu_img": " ".join(PYEMU_IMG), "units": "MB = 10^6 bytes; IOPS = requests / reported s"},
        "startup": {"pyemu_img_version_s": round(startup, 3), "qemu_img_version_s": round(qemu_startup, 3)},
        "notes": ["Shared 2-core host: other jobs may run at the same time; see load1 per sample.",
                  "convert and bench use each tool's default cache modes (qemu-img convert: source writeback, "
                  "target unsafe); convert times include process start-up.",
                  "pyemu's modules are byte-compiled and its table of compiled dataclass methods is filled before "
                  "the runs (as an installed package is after its first use), so a stale __pycache__ under "
                  "PYTHONDONTWRITEBYTECODE is not recompiled in every timed command."],
    }
    figs = Figures()
    try:
        if "convert" in parts:
            part_convert(figs, tools, qemu_img, workdir, convert_mib, reps)
        if "bench" in parts:
            report["bench"] = part_bench(figs, tools, qemu_img, workdir, bench_mib, count, reps)
        if "guest" in parts:
            report["guest"] = part_guest(figs, qemu_img, qemu, workdir, reps, tsc_khz)
            if "skipped" in report["guest"]:
                print(f"guest part skipped: {report['guest']['skipped']}", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    report["figures"] = figs.summary()
    carry_over(report, args.output, [part for part in PARTS if part not in parts])
    report["comparison"] = rows = comparison(report["figures"])
    report["convert_without_startup"] = copy_only(report["figures"], {"pyemu": startup, "qemu": qemu_startup})
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(f"{'figure':40} {'unit':5} {'pyemu':>11} {'QEMU 7.2':>11} {'pyemu/QEMU':>11}")

    def cell(v: float | None) -> str:
        return f"{v:>11.2f}" if v is not None else f"{'-':>11}"

    for row in rows:
        ratio = row["ratio_pyemu_over_qemu"]
        print(f"{row['what']:40} {row['unit']:5} {cell(row['pyemu'])} {cell(row['qemu'])} "
              f"{(f'{ratio:.3f}' if ratio is not None else '-'):>11}")
    for figure, entry in report["convert_without_startup"].items():
        print(f"{figure} without each tool's start-up: {entry['pyemu_mbps']:.0f} vs {entry['qemu_mbps']:.0f} MB/s "
              f"({entry['ratio_pyemu_over_qemu']:.3f})")
    paired = (report.get("guest") or {}).get("paired_ratio_median")
    if paired is not None:
        print(f"guest seq read qcow2: median of the paired ratios (samples taken back to back) {paired:.3f}")
    for figure, errors in figs.errors.items():
        print(f"{figure}: {len(errors)} failure(s), first: {errors[0][:300]}")
    print(f"(medians of {reps}; start-up: pyemu-img {startup:.2f} s, qemu-img {qemu_startup:.2f} s; load average "
          f"now {report['load_avg_end']})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the work directory is removed on SIGTERM too
    sys.exit(main())
