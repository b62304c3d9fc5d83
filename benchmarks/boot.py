#!/usr/bin/env python3
"""Boot benchmark: Debian's kernel from start to guest power-off, pyemu against QEMU 7.2, same guest.

For each configuration it runs the VM ``--runs`` times with ``pyemu.poweroff=1`` on the kernel command
line (the initramfs /init prints ``pyemu-guest: init reached (uptime X s)`` and powers off at once) and
records two figures: wall time from process start to exit, and the guest's own uptime when /init ran.
QEMU runs ``-M microvm,acpi=on -accel tcg`` with the same kernel, initramfs and memory size. The runs are
interleaved (each round boots pyemu, its variants and QEMU once, in turning order), so every ratio compares
boots of the same minutes on this drifting host. Medians and pyemu/QEMU ratios are printed and written to
``benchmarks/results/boot.json``.

``--profile`` additionally runs one pyemu boot under cProfile and stores the top functions by own time,
which is where to look when pyemu is slower.

``--guest-profile`` samples the guest RIP during one boot per image under both emulators and maps the
samples to the kernel's symbols (``benchmarks/guest_profile.py``): the top guest functions, the idle (HLT)
share, and which functions take longer under pyemu; written to ``benchmarks/results/boot_guest_profile.json``.

When pyemu's libunicorn is built (``pyemu-engine build``; pyemu then uses it), every row also times pyemu
on PyPI's library (``PYEMU_UNICORN=pypi``) in the same run.

The bzImage row also times pyemu with the kernel's own decompressor (``PYEMU_BZIMAGE_GUEST_DECOMPRESS=1``)
beside the default host-side decompression (``target/x86/boot/bzimage_host.py``), in the same run.

``--tsc-early-khz 0`` adds ``tsc_early_khz=<host TSC kHz>`` to both emulators' command lines: on a busy host
QEMU TCG's PIT calibration of the TSC fails and its boot never finishes (pyemu states the rate in CPUID).

The PVH vmlinux also boots with ``-smp 2`` (``--smp``): pyemu's vCPUs take turns on one host thread,
QEMU runs one host thread per vCPU (MTTCG), so this row compares against real parallelism.

Usage: python benchmarks/boot.py [--runs 3] [--profile] [--guest-profile] [--images bzimage,pvh] [--smp 1,2]
                                [--tsc-early-khz N]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import guest_profile  # benchmarks/guest_profile.py, beside this script
from host_memory import read_through, warm_free_memory  # benchmarks/host_memory.py
from pyemu.accel.tcg.engine_library import CHOICE_VARIABLE, built_library
from pyemu.guest.assets import find_assets
from pyemu.system.cache import cache_root

RESULTS = Path(__file__).resolve().parent / "results" / "boot.json"
GUEST_PROFILE_RESULTS = RESULTS.with_name("boot_guest_profile.json")
GUEST_DECOMPRESS_ENV = "PYEMU_BZIMAGE_GUEST_DECOMPRESS"
MARKER = re.compile(rb"pyemu-guest: init reached \(uptime ([0-9.]+) s\)")
POWER_DOWN = b"reboot: Power down"
CMDLINE = "console=ttyS0 pyemu.poweroff=1"
MEMORY = "512M"
TIMEOUT = 60  # a boot that has not powered off by then is counted as failed (seen once with QEMU TCG:
# under load its kernel failed to calibrate the TSC against the PIT and never got a working timer; that
# happened to QEMU microvm PVH boots several times in a row on 2026-11-22 -- pyemu boots take < 15 s)


class BootFailed(Exception):
    pass


Boot = tuple[float, float | None, int, float]  # wall s, guest uptime at /init, exit status, CPU s


def run_once(argv: list[str], env: dict[str, str] | None = None) -> Boot:
    """Run a VM until it powers off; wall seconds, guest uptime at /init, exit status, and the CPU time
    (user + system, all threads) the process used -- steadier than wall time on a busy host.

    The wall time ends when the process exits, or when the kernel prints its power-down line and the
    process has not exited 2 s later (QEMU 7.2's microvm with ``-smp 2`` under MTTCG stays up after the
    guest powered off; it is then killed and its status recorded as -9)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    output = b""
    powered_off_at: float | None = None
    while True:
        now = time.monotonic()
        if now - started > TIMEOUT:
            proc.kill()
            proc.wait()
            tail = output[-600:].decode(errors="replace")
            raise BootFailed(f"{Path(argv[0]).name}: no power-off within {TIMEOUT} s; output tail:\n{tail}")
        if powered_off_at is not None and now - powered_off_at > 2.0:
            proc.kill()
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            output += chunk
            if powered_off_at is None and POWER_DOWN in output:
                powered_off_at = time.monotonic()
    _, raw_status, usage = os.wait4(proc.pid, 0)
    status = proc.returncode = os.waitstatus_to_exitcode(raw_status)
    cpu = usage.ru_utime + usage.ru_stime
    wall = time.monotonic() - started if status != -9 or powered_off_at is None else powered_off_at - started
    proc.stdout.close()
    match = MARKER.search(output)
    if match is None:
        tail = output[-2000:].decode(errors="replace")
        raise BootFailed(f"no init marker from {argv[0]} (status {status}); output tail:\n{tail}")
    return wall, float(match.group(1)), status, cpu


def run_interleaved(commands: dict[str, tuple[list[str], dict[str, str] | None]], runs: int,
                    failures: list[str], rounds: list[dict[str, Boot]] | None = None,
                    inputs: tuple[Path, ...] = ()) -> dict[str, list[Boot]]:
    """``runs`` successful boots of every command, in rounds: each round boots each command once, the order
    turning by one from round to round. Why: this host's speed drifts by 10-30% over minutes (QEMU's own PVH
    boot measured 2.2 and 2.7 s half an hour apart), so blocks of one command's runs after the other's
    compared two different hosts. A failed boot is recorded in ``failures`` and retried in a later round
    (at most two extra rounds). ``rounds``, when given, gets each round's boots by command (for ratios of
    boots that ran minutes, not a whole run, apart: :func:`paired_ratio`). Before every boot, untimed, the
    ``inputs`` (kernel, initrd) are read into the page cache and free memory is warmed
    (:mod:`host_memory`): this host pages out cold page cache and hands freed memory back to its
    hypervisor within ~2 s, so without both a boot's time depended on what ran before it."""
    samples: dict[str, list[Boot]] = {key: [] for key in commands}
    keys = list(commands)
    for round_index in range(runs + 2):
        if all(len(got) >= runs for got in samples.values()):
            break
        shift = round_index % len(keys)
        this_round: dict[str, Boot] = {}
        if rounds is not None:
            rounds.append(this_round)
        for key in keys[shift:] + keys[:shift]:
            if len(samples[key]) >= runs:
                continue
            argv, env = commands[key]
            for path in inputs:
                read_through(path)
            warm_free_memory()
            try:
                boot = run_once(argv, env)
                samples[key].append(boot)
                this_round[key] = boot
            except BootFailed as failed:
                print(f"  failed boot (retrying): {failed}", file=sys.stderr)
                failures.append(str(failed).splitlines()[0])
    for key, got in samples.items():
        if not got:
            raise SystemExit(f"every boot of {key} failed")
    return samples


def paired_ratio(rounds: list[dict[str, Boot]], mine: str, theirs: str) -> tuple[float | None, list[float]]:
    """The median over rounds of ``mine``'s wall time over ``theirs`` in the same round, and the ratios.

    Why besides the ratio of medians: this host's speed moves by 10-20% between minutes (how warm the
    memory a new process gets is, see the README), and both boots of a round ran within seconds of each
    other."""
    ratios = [round(got[mine][0] / got[theirs][0], 3) for got in rounds if mine in got and theirs in got]
    return (round(statistics.median(ratios), 3) if ratios else None), ratios


def pyemu_env(bytecode: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a pyemu run. With ``bytecode``, Python keeps compiled modules (in pyemu's cache,
    not the source tree) even where ``PYTHONDONTWRITEBYTECODE`` is set, as an installed package has them:
    compiling pyemu's ~300 modules at every start costs ~0.5 s of wall time."""
    env = {**os.environ, **(extra or {})}
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.setdefault("PYTHONPYCACHEPREFIX", str(cache_root() / "pycache"))
    return env


def pyemu_variants(image: str, engine_built: bool) -> list[tuple[str, dict[str, str], str]]:
    """The extra pyemu rows of one image, each (key suffix, environment, label), timed in the same run:
    the bzImage with the kernel's own decompressor, and, when pyemu's libunicorn is built (the default
    then), every image on PyPI's library, which shows what the engine patches are worth."""
    variants = []
    if image == "bzimage":
        variants.append(("guest_decompressor", {GUEST_DECOMPRESS_ENV: "1"},
                          f"with the guest's own decompressor ({GUEST_DECOMPRESS_ENV}=1)"))
    if engine_built:
        variants.append(("pypi_engine", {CHOICE_VARIABLE: "pypi"}, f"on PyPI's libunicorn ({CHOICE_VARIABLE}=pypi)"))
    return variants


def pyemu_argv(kernel: Path, initrd: Path, smp: int = 1, cmdline: str = CMDLINE) -> list[str]:
    return [sys.executable, "-m", "pyemu.system.main", "-machine", "microvm", "-accel", "tcg", "-m", MEMORY,
            "-smp", str(smp), "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-nographic", "-no-reboot"]


def qemu_argv(qemu: str, kernel: Path, initrd: Path, smp: int = 1, cmdline: str = CMDLINE) -> list[str]:
    """QEMU's default TCG threading: one host thread per vCPU (MTTCG) for x86 guests on x86 hosts."""
    return [qemu, "-machine", "microvm,acpi=on", "-accel", "tcg", "-m", MEMORY, "-smp", str(smp),
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline, "-nographic", "-no-reboot",
            "-nodefaults", "-serial", "stdio"]


def summarise(samples: list[Boot]) -> dict[str, object]:
    walls = [s[0] for s in samples]
    uptimes = [s[1] for s in samples if s[1] is not None]
    cpus = [s[3] for s in samples]
    return {"wall_s": round(statistics.median(walls), 3), "init_uptime_s": round(statistics.median(uptimes), 3),
            "cpu_s": round(statistics.median(cpus), 3), "runs": len(samples),
            "wall_samples": [round(w, 3) for w in walls], "cpu_samples": [round(c, 3) for c in cpus],
            "exit_status": sorted({s[2] for s in samples})}


def profile_boot(kernel: Path, initrd: Path, top: int = 25) -> list[dict[str, object]]:
    """One pyemu boot in-process with cProfile on the vCPU thread, where guest time is spent; the
    functions with the most own time (time inside Unicorn shows as ``emu_start``)."""
    from pyemu.machines.base import Machine
    from pyemu.system.main import main

    profiler = cProfile.Profile()
    vcpu_loop = Machine._vcpu_loop

    def profiled_vcpu_loop(self: Machine, index: int, vcpu: object) -> None:
        profiler.enable()
        try:
            vcpu_loop(self, index, vcpu)  # type: ignore[arg-type]
        finally:
            profiler.disable()

    Machine._vcpu_loop = profiled_vcpu_loop  # type: ignore[method-assign]

    out = tempfile.NamedTemporaryFile(prefix="pyemu-boot-", suffix=".log", delete=False)
    out.close()
    argv = pyemu_argv(kernel, initrd)[3:]
    argv[argv.index("-nographic")] = "-serial"
    argv.insert(argv.index("-serial") + 1, f"file:{out.name}")
    try:
        main(argv)
    finally:
        Machine._vcpu_loop = vcpu_loop  # type: ignore[method-assign]
    os.unlink(out.name)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(filename).name}:{line}:{name}", "calls": nc,
                     "own_s": round(tt, 3), "cumulative_s": round(ct, 3)})
    rows.sort(key=lambda r: r["own_s"], reverse=True)  # type: ignore[arg-type, return-value]
    return rows[:top]


def write_guest_profile(names: list[str], images: dict[str, Path], bzimage: Path, initrd: Path,
                        qemu: str | None, tsc_khz: int | None) -> None:
    """Guest-level profiles of each image (the bzImage also with its own decompressor), both emulators."""
    if qemu is None:
        print("--guest-profile needs qemu-system-x86_64 (its boot lists the kernel's symbols)", file=sys.stderr)
        return
    symbols = guest_profile.kallsyms(qemu, bzimage, initrd)
    profiles: dict[str, object] = {
        "what": "guest RIP samples over wall time, mapped to /proc/kallsyms; pyemu sampled in-process at 1 kHz "
                "(block gate's current block), QEMU through its gdbstub at 250 Hz (VM paused per sample, "
                "pauses excluded from its wall time)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "images": {},
    }
    runs: list[tuple[str, str, dict[str, str] | None]] = [(name, name, None) for name in names]
    if "bzimage" in names:
        runs.append(("bzimage-guest-decompressor", "bzimage", {GUEST_DECOMPRESS_ENV: "1"}))
    for label, image, env in runs:
        for attempt in range(3):
            try:
                result = guest_profile.profile_image(image, images[image], initrd, CMDLINE, qemu=qemu, hz=1000.0,
                                                     qemu_hz=250.0, symbols=symbols, tsc_early_khz=tsc_khz,
                                                     pyemu_env=env, with_qemu=label != "bzimage-guest-decompressor")
                break
            except (guest_profile.ProfileError, subprocess.SubprocessError) as failed:
                print(f"  profiled boot failed (attempt {attempt + 1}): {str(failed).splitlines()[0]}",
                      file=sys.stderr)
        else:
            continue
        profiles["images"][label] = result  # type: ignore[index]
        guest_profile.print_profile(label, result)
    GUEST_PROFILE_RESULTS.write_text(json.dumps(profiles, indent=2) + "\n")
    print(f"written to {GUEST_PROFILE_RESULTS}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", default="bzimage,pvh")
    parser.add_argument("--smp", default="1,2", help="vCPU counts to boot the PVH vmlinux with (bzImage: 1)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--guest-profile", action="store_true",
                        help="sample the guest RIP under both emulators (benchmarks/guest_profile.py)")
    parser.add_argument("--tsc-early-khz", type=int, default=None,
                        help="add tsc_early_khz=N to both command lines (0: the host's TSC rate)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="let PYTHONDONTWRITEBYTECODE stand: pyemu compiles its modules at every start")
    args = parser.parse_args()
    bytecode = not args.no_bytecode_cache
    assets = find_assets()
    if assets is None:
        print("guest assets missing: run 'pyemu-guest fetch'", file=sys.stderr)
        return 2
    qemu = shutil.which("qemu-system-x86_64")
    images = {"bzimage": assets.kernel, "pvh": assets.vmlinux}
    tsc_khz = guest_profile.tsc_khz(args.tsc_early_khz)
    cmdline = CMDLINE + (f" tsc_early_khz={tsc_khz}" if tsc_khz else "")
    report: dict[str, object] = {
        "benchmark": "boot to /init and power-off, Debian 6.1 + busybox initramfs",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory": MEMORY, "cmdline": cmdline, "results": {},
        "pyemu_bytecode_cache": bytecode,
        "python_dont_write_bytecode_in_environment": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "engine_library": str(built_library() or "pypi"),
    }
    engine_built = built_library() is not None
    if bytecode:  # compile once, untimed, as an installation does
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1])],
                       env=pyemu_env(True), stdout=subprocess.DEVNULL, check=False)
    if args.guest_profile:
        write_guest_profile(args.images.split(","), images, assets.kernel, assets.initrd, qemu, tsc_khz)
    results: dict[str, dict[str, object]] = {}
    configs = [(image, 1) for image in args.images.split(",")]
    configs += [("pvh", int(n)) for n in args.smp.split(",") if int(n) > 1 and "pvh" in args.images]
    for image, smp in configs:
        kernel = images[image]
        name = image if smp == 1 else f"{image}-smp{smp}"
        row: dict[str, object] = {"vcpus": smp}
        failures: list[str] = []
        commands: dict[str, tuple[list[str], dict[str, str] | None]] = {
            "pyemu_tcg": (pyemu_argv(kernel, assets.initrd, smp, cmdline), pyemu_env(bytecode))}
        for suffix, extra_env, _label in pyemu_variants(image, engine_built):
            commands[f"pyemu_tcg_{suffix}"] = (pyemu_argv(kernel, assets.initrd, smp, cmdline),
                                               pyemu_env(bytecode, extra_env))
        if qemu:
            commands["qemu_tcg"] = (qemu_argv(qemu, kernel, assets.initrd, smp, cmdline), None)
        rounds: list[dict[str, Boot]] = []
        for key, boots in run_interleaved(commands, args.runs, failures, rounds, (kernel, assets.initrd)).items():
            row[key] = summarise(boots)
        if qemu:
            p, q = row["pyemu_tcg"], row["qemu_tcg"]
            row["ratio_wall"] = round(p["wall_s"] / q["wall_s"], 2)  # type: ignore[index, operator]
            row["ratio_wall_paired"], row["ratio_wall_per_round"] = paired_ratio(rounds, "pyemu_tcg", "qemu_tcg")
            row["ratio_init_uptime"] = round(p["init_uptime_s"] / q["init_uptime_s"], 2)  # type: ignore[index, operator]
            row["ratio_cpu"] = round(p["cpu_s"] / q["cpu_s"], 2)  # type: ignore[index, operator]
            for suffix, _env, _label in pyemu_variants(image, engine_built):
                g = row[f"pyemu_tcg_{suffix}"]
                row[f"ratio_wall_{suffix}"] = round(g["wall_s"] / q["wall_s"], 2)  # type: ignore[index, operator]
                row[f"ratio_cpu_{suffix}"] = round(g["cpu_s"] / q["cpu_s"], 2)  # type: ignore[index, operator]
        if failures:
            row["failed_boots"] = failures
        results[name] = row
        print(f"{name:10} pyemu wall {row['pyemu_tcg']['wall_s']:7.2f} s  init at {row['pyemu_tcg']['init_uptime_s']:6.2f} s"  # type: ignore[index]
              + (f" | qemu wall {row['qemu_tcg']['wall_s']:6.2f} s  init at {row['qemu_tcg']['init_uptime_s']:5.2f} s"  # type: ignore[index]
                 f" | ratio wall {row['ratio_wall']}x (paired {row['ratio_wall_paired']}x)  init {row['ratio_init_uptime']}x"
                 f"  cpu {row['ratio_cpu']}x"
                 if qemu else " | qemu not installed"))
        for suffix, _env, label in pyemu_variants(image, engine_built):
            g = row[f"pyemu_tcg_{suffix}"]
            print(f"{'':10} pyemu wall {g['wall_s']:7.2f} s  init at {g['init_uptime_s']:6.2f} s {label}"  # type: ignore[index]
                  + (f" | ratio wall {row[f'ratio_wall_{suffix}']}x  cpu {row[f'ratio_cpu_{suffix}']}x"
                     if qemu else ""))
    report["results"] = results
    if args.profile:
        report["profile_top_own_time"] = profile_boot(images["pvh"], assets.initrd)
        for entry in report["profile_top_own_time"][:12]:  # type: ignore[index]
            print(f"  {entry['own_s']:8.3f} s own  {entry['calls']:>10} calls  {entry['function']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
