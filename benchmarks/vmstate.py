#!/usr/bin/env python3
"""VM-state benchmark (issue 13): restore to a shell against cold boot, and migration against QEMU 7.2.

The guest is the Debian kernel + busybox initramfs the boot tests use, ``-M microvm -accel tcg``, ``--ram``
MiB (default 512), the same kernel command line for both emulators. Two parts:

* ``restore``: wall time from starting a pyemu process to the guest's shell answering a command
  (``echo @@$((6*7))@@`` -> ``@@42@@``), (a) cold boot, (b) ``-incoming file:`` of a state saved at that
  shell, after the guest wrote ``--fill`` MiB (default 128) of data into its RAM-backed root, with the
  ``mapped-ram`` capability (RAM mapped from the file, faulted in lazily), (c) the same with an
  ordinary stream (all RAM read first). The command is sent every 50 ms until it is answered (a line typed
  before the restore would be lost with the console state it restores), so the figures have 50 ms
  granularity. Goal: (b) under 1 s. Also the load alone (``migrate-incoming`` in a VM already built, in
  this process), mapped and plain, which shows what the mapping saves without start-up costs.
* ``migrate``: a guest idle at its shell migrated over ``tcp:127.0.0.1`` to a second process started with
  ``-incoming``, pyemu against ``qemu-system-x86_64 -M microvm -accel tcg`` with the same kernel,
  initramfs and RAM; ``total-time`` and ``downtime`` as each source's ``query-migrate`` reports them
  (default parameters on both, so ``max-bandwidth`` is 128 MiB/s for both), then the destination's shell
  must answer. Ratios pyemu/QEMU (below 1: pyemu is faster). ``migrate_unlimited``: the same with
  ``max-bandwidth`` 0 (no limit) on both, which shows how fast each can move pages at all.

pyemu runs with a warm bytecode cache (``PYTHONPYCACHEPREFIX``, even where ``PYTHONDONTWRITEBYTECODE`` is
set, as it is in our sessions: an installed pyemu has its ``.pyc`` files; without them compiling pyemu's
modules adds about 1 s to every start). One untimed pyemu start warms it first.

Medians of ``--runs`` (default 3). The load average goes with the results (the machine is shared).
Results are printed and written to ``benchmarks/results/vmstate.json``.

Usage: python benchmarks/vmstate.py [--runs 3] [--ram 512] [--fill 128] [--only restore,migrate,migrate_unlimited]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pyemu.guest.assets import find_assets

RESULTS = Path(__file__).resolve().parent / "results" / "vmstate.json"
CMDLINE = "console=ttyS0 tsc_early_khz=2000000"
SHELL_READY = b"shell on the console"
PROBE = b"echo @@$((6*7))@@\n"
ANSWER = b"@@42@@"
PYCACHE = os.path.join(tempfile.gettempdir(), "pyemu-bench-pycache")
BOOT_TIMEOUT = 300.0
TIMEOUT = 120.0


class Vm:
    """One emulator process: console on its stdin/stdout, QMP on a Unix socket."""

    def __init__(self, kind: str, work: Path, name: str, ram: int, extra: list[str]) -> None:
        assets = find_assets()
        assert assets is not None
        self.kind = kind
        self.sock = work / f"{name}.qmp"
        common = ["-m", f"{ram}M", "-kernel", str(assets.kernel), "-initrd", str(assets.initrd),
                  "-append", CMDLINE, "-qmp", f"unix:{self.sock},server=on,wait=off", "-display", "none",
                  "-serial", "stdio", "-no-reboot", *extra]
        if kind == "pyemu":
            argv = [sys.executable, "-m", "pyemu.system.main", "-machine", "microvm", "-accel", "tcg", *common]
        else:
            argv = ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-nodefaults", "-no-user-config",
                    *common]
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env)
        self.output = b""
        self._qmp: Any = None

    def read(self, wait: float) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], wait)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"{self.kind} exited ({self.proc.wait()}); output tail:\n"
                                   f"{self.output[-1500:].decode(errors='replace')}")
            self.output += chunk

    def expect(self, needle: bytes, timeout: float, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output[after:]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: no {needle!r} within {timeout:g} s; output tail:\n"
                                   f"{self.output[-1500:].decode(errors='replace')}")
            self.read(0.2)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def shell_answers(self, timeout: float = TIMEOUT, every: float = 0.05) -> float:
        """Probe the shell until it answers; seconds since the process started."""
        start = len(self.output)
        deadline = time.monotonic() + timeout
        next_probe = 0.0
        while ANSWER not in self.output[start:]:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"{self.kind}: the shell did not answer within {timeout:g} s; output tail:\n"
                                   f"{self.output[-1500:].decode(errors='replace')}")
            if now >= next_probe:
                self.send(PROBE)
                next_probe = now + every
            self.read(min(every, max(0.0, next_probe - time.monotonic())))
        return time.monotonic() - self.started

    def qmp(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if self._qmp is None:
            from qemu.qmp.legacy import QEMUMonitorProtocol

            deadline = time.monotonic() + TIMEOUT
            while not self.sock.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind}: no QMP socket ({self.proc.poll()})")
                time.sleep(0.02)
            self._qmp = QEMUMonitorProtocol(str(self.sock))
            self._qmp.connect(negotiate=True)
        reply = self._qmp.cmd_raw(command, args or {})
        if "error" in reply:
            raise RuntimeError(f"{self.kind}: {command}: {reply['error']}")
        return reply["return"]

    def wait_migration(self) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            info = self.qmp("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                if info["status"] != "completed":
                    raise RuntimeError(f"{self.kind}: migration {info['status']}: {info.get('error-desc')}")
                return dict(info)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: migration did not finish: {info}")
            time.sleep(0.02)

    def close(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.cmd_raw("quit", {})
                self.proc.wait(timeout=30)
            with contextlib.suppress(Exception):
                self._qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


@contextlib.contextmanager
def vm(kind: str, work: Path, name: str, ram: int, extra: list[str] | None = None) -> Iterator[Vm]:
    machine = Vm(kind, work, name, ram, extra or [])
    try:
        yield machine
    finally:
        machine.close()


def boot_to_shell(machine: Vm) -> float:
    machine.expect(SHELL_READY, BOOT_TIMEOUT)
    return machine.shell_answers()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


# -- restore ------------------------------------------------------------------------------------------------
def fill_guest(machine: Vm, mib: int) -> None:
    """Write about ``mib`` MiB of non-zero data into the guest's RAM-backed root (a guest that has used its
    memory: its RAM is mostly data, not zero pages): copies of the busybox binary, as ``cat`` moves data
    far faster under TCG than a pipe from ``yes`` (measured: 1 MiB through ``yes | head`` took a minute)."""
    if mib <= 0:
        return
    start = len(machine.output)
    copies = max(1, int(mib / 1.89))  # /bin/busybox is 1.89 MiB
    machine.send(f"for i in $(seq {copies}); do cat /bin/busybox; done > /fill; echo @@$((40+1))@@\n".encode())
    machine.expect(b"@@41@@", BOOT_TIMEOUT, after=start)


def load_ms(path: Path, ram: int) -> float:
    """Milliseconds ``migrate-incoming file:`` takes in a VM already built (in this process, ``-S``): the
    load alone, without process start-up. The file was just written, so it is in the page cache: the best
    case for an ordinary load, which reads it all."""
    import pyemu

    assets = find_assets()
    assert assets is not None
    machine = pyemu.VM("-machine", "microvm", "-accel", "tcg", "-m", f"{ram}M", "-kernel", str(assets.kernel),
                       "-initrd", str(assets.initrd), "-append", CMDLINE, "-serial", "null", "-display", "none",
                       "-incoming", "defer", "-S")
    machine.start()
    try:
        started = time.monotonic()
        machine.execute("migrate-incoming", {"uri": f"file:{path}"})
        while (info := machine.execute("query-migrate")).get("status") not in ("completed", "failed"):
            time.sleep(0.001)
        elapsed = (time.monotonic() - started) * 1000
        if info["status"] != "completed":
            raise RuntimeError(f"in-process load of {path.name} failed: {info}")
    finally:
        machine.quit()
        machine.wait(60)
        machine.close()
    return elapsed


def restore_run(work: Path, ram: int, fill: int) -> dict[str, float]:
    """One cold boot to the shell (``fill`` MiB of data written then), saved there twice (mapped-ram and
    plain), and both restored."""
    mapped, plain = work / "mapped.state", work / "plain.state"
    with vm("pyemu", work, "cold", ram) as source:
        cold = boot_to_shell(source)
        fill_guest(source, fill)
        source.qmp("migrate-set-capabilities", {"capabilities": [{"capability": "mapped-ram", "state": True}]})
        source.qmp("migrate", {"uri": f"file:{mapped}"})
        source.wait_migration()
        source.qmp("cont")
        source.shell_answers()
        source.qmp("migrate-set-capabilities", {"capabilities": [{"capability": "mapped-ram", "state": False}]})
        source.qmp("migrate", {"uri": f"file:{plain}"})
        source.wait_migration()
    row = {"cold_boot_s": cold, "plain_stream_mib": plain.stat().st_size / (1 << 20), "mapped_file_mib": mapped.stat().st_size / (1 << 20),
           "mapped_allocated_mib": mapped.stat().st_blocks * 512 / (1 << 20),
           }
    for name, path in (("restore_mapped_s", mapped), ("restore_plain_s", plain)):
        with vm("pyemu", work, name, ram, ["-incoming", f"file:{path}"]) as restored:
            try:
                row[name] = restored.shell_answers()
            except RuntimeError as exc:
                raise RuntimeError(f"{name[:-2]}: {exc}") from None
    row["load_mapped_ms"] = load_ms(mapped, ram)
    row["load_plain_ms"] = load_ms(plain, ram)
    mapped.unlink()
    plain.unlink()
    return row


def retried(run: Callable[[], dict[str, float]], runs: int, failures: list[str]) -> list[dict[str, float]]:
    """``runs`` successful runs; a failed one (a guest that did not answer) is recorded and retried, at
    most twice in all, as boot.py does."""
    samples: list[dict[str, float]] = []
    attempts = 0
    while len(samples) < runs and attempts < runs + 2:
        attempts += 1
        try:
            samples.append(run())
        except RuntimeError as failed:
            print(f"  failed run (retrying): {str(failed)[:2000]}", file=sys.stderr)
            failures.append(str(failed).splitlines()[0])
    if not samples:
        raise SystemExit("every run failed")
    return samples


def restore_part(work: Path, ram: int, runs: int, fill: int) -> dict[str, Any]:
    failures: list[str] = []
    samples = retried(lambda: restore_run(work, ram, fill), runs, failures)
    result: dict[str, Any] = {key: median([s[key] for s in samples]) for key in samples[0]}
    result["samples"] = samples
    result["failed_runs"] = failures
    result["ratio_restore_mapped_to_cold"] = round(result["restore_mapped_s"] / result["cold_boot_s"], 3)
    result["ratio_restore_plain_to_cold"] = round(result["restore_plain_s"] / result["cold_boot_s"], 3)
    print(f"restore  cold boot to shell {result['cold_boot_s']:6.2f} s | mapped-ram restore to shell "
          f"{result['restore_mapped_s']:5.2f} s ({result['ratio_restore_mapped_to_cold']}x) | plain restore "
          f"{result['restore_plain_s']:5.2f} s ({result['ratio_restore_plain_to_cold']}x) | the load alone: "
          f"mapped {result['load_mapped_ms']:.0f} ms, plain {result['load_plain_ms']:.0f} ms")
    return result


# -- migration ----------------------------------------------------------------------------------------------
def migrate_run(kind: str, work: Path, ram: int, bandwidth: int | None) -> dict[str, float]:
    """One migration; ``bandwidth``: ``max-bandwidth`` to set first (0 = no limit on both emulators),
    None keeps the default (128 MiB/s)."""
    port = free_port()
    with vm(kind, work, f"{kind}-src", ram) as source, \
            vm(kind, work, f"{kind}-dst", ram, ["-incoming", f"tcp:127.0.0.1:{port}"]) as destination:
        boot_to_shell(source)
        destination.qmp("query-status")  # listening by now
        if bandwidth is not None:
            source.qmp("migrate-set-parameters", {"max-bandwidth": bandwidth})
        source.qmp("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = source.wait_migration()
        destination.shell_answers()
        ram_info = info.get("ram", {})
        return {"total_time_ms": float(info["total-time"]), "downtime_ms": float(info["downtime"]),
                "transferred_mib": round(ram_info.get("transferred", 0) / (1 << 20), 1)}


def migrate_part(work: Path, ram: int, runs: int, qemu: bool, bandwidth: int | None) -> dict[str, Any]:
    result: dict[str, Any] = {"max_bandwidth": "default (128 MiB/s)" if bandwidth is None else bandwidth or "no limit"}
    kinds = ["pyemu"] + (["qemu"] if qemu else [])
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    failures: list[str] = []
    for rep in range(runs):
        for kind in (kinds if rep % 2 == 0 else kinds[::-1]):  # take turns: neither always goes first
            samples[kind] += retried(lambda: migrate_run(kind, work, ram, bandwidth), 1, failures)
    result["failed_runs"] = failures
    for kind in kinds:
        result[f"{kind}_tcg"] = {key: median([s[key] for s in samples[kind]]) for key in samples[kind][0]}
        result[f"{kind}_tcg"]["samples"] = samples[kind]
    line = (f"migrate ({result['max_bandwidth']})  pyemu total {result['pyemu_tcg']['total_time_ms']:7.0f} ms "
            f"downtime {result['pyemu_tcg']['downtime_ms']:6.0f} ms")
    if qemu:
        p, q = result["pyemu_tcg"], result["qemu_tcg"]
        result["ratio_total_time"] = round(p["total_time_ms"] / max(1.0, q["total_time_ms"]), 2)
        result["ratio_downtime"] = round(p["downtime_ms"] / max(1.0, q["downtime_ms"]), 2)
        line += (f" | qemu total {q['total_time_ms']:7.0f} ms downtime {q['downtime_ms']:6.0f} ms | ratio total "
                 f"{result['ratio_total_time']}x downtime {result['ratio_downtime']}x")
    print(line)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ram", type=int, default=512, help="guest RAM in MiB")
    parser.add_argument("--fill", type=int, default=128,
                        help="MiB of data the guest writes into its RAM-backed root before it is saved (restore)")
    parser.add_argument("--only", default="restore,migrate,migrate_unlimited")
    args = parser.parse_args()
    if find_assets() is None:
        print("guest assets missing: run 'pyemu-guest fetch'", file=sys.stderr)
        return 2
    qemu = shutil.which("qemu-system-x86_64") is not None
    parts = args.only.split(",")
    report: dict[str, Any] = {
        "benchmark": "VM state: restore to shell vs cold boot (pyemu TCG); migration vs QEMU 7.2 TCG",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
        "ram_mib": args.ram, "cmdline": CMDLINE, "runs": args.runs, "loadavg_before": os.getloadavg()}
    if RESULTS.exists():  # a run of one part keeps the other part's figures
        with contextlib.suppress(ValueError):
            previous = json.loads(RESULTS.read_text())
            for part in ("restore", "migrate", "migrate_unlimited"):
                if part not in parts and part in previous:
                    report[part] = previous[part]
    with tempfile.TemporaryDirectory(prefix="pyemu-vmstate-", dir="/tmp") as tmp:
        work = Path(tmp)
        with vm("pyemu", work, "warm-up", args.ram, ["-S"]) as warm:  # fills the bytecode cache
            warm.qmp("query-status")
        if "restore" in parts:
            report["restore"] = restore_part(work, args.ram, args.runs, args.fill)
            report["restore"]["fill_mib"] = args.fill
        if "migrate" in parts:
            report["migrate"] = migrate_part(work, args.ram, args.runs, qemu, None)
        if "migrate_unlimited" in parts:
            report["migrate_unlimited"] = migrate_part(work, args.ram, args.runs, qemu, 0)
    report["loadavg_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"load average before {report['loadavg_before']}, after {report['loadavg_after']}")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
