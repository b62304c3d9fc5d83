"""Software-CPU dirty-page log (accel/tcg/dirty_log.py): what it costs the guest, what it buys migration.

Two measurements, both with the guest of tests/migration (fills 20 MiB, then keeps storing a rising count
into the first word of each page of a 1 MiB window, 256 pages, one store per page per pass):

* ``stores``: the guest's store rate (M stores/s, from the count's rise over a wall-clock interval) with
  logging off, with logging on and no sync, and with logging on and a sync every 100 ms (each sync makes
  the next store to every page come back to the TLB-fill hook, as pre-copy rounds do);
* ``migration``: a live migration of the same guest to a ``file:`` with ``-m`` RAM_MB, once with the RAM
  comparison (``ShadowTracker``, the pre-copy of before) and once with the log (``LogTracker``): total
  time, rounds (dirty-sync-count), downtime and the bytes sent while stopped.

Usage: python benchmarks/tcg_dirty_log.py [--seconds 3] [--ram-mb 512] [--repeat 3]
Writes benchmarks/results/tcg_dirty_log.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyemu
from pyemu.migration import precopy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "migration"))
from migration_programs import BUFFER_ADDR, BUFFER_SIZE, FILL, write_dirty_kernel  # noqa: E402

RESULTS = Path(__file__).with_name("results") / "tcg_dirty_log.json"


def _start(kernel: Path, ram_mb: int) -> tuple[pyemu.VM, Any]:
    vm = pyemu.VM("-kernel", str(kernel), "-m", str(ram_mb), "-accel", "tcg", "-serial", "none")
    vm.start()
    machine = vm._instance.machine
    memory = machine.memory
    deadline = time.monotonic() + 120
    while memory.read_u32(BUFFER_ADDR + BUFFER_SIZE - 4) != FILL or memory.read_u32(BUFFER_ADDR) < 1000:
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not fill its buffer")
        time.sleep(0.02)
    return vm, machine


def _stop(vm: pyemu.VM) -> None:
    vm.quit()
    vm.wait(60)
    vm.close()


def _rate(machine: Any, seconds: float, sync_every: float | None) -> float:
    """Guest stores per second (the count is incremented once per store)."""
    memory = machine.memory
    start_count, start = memory.read_u32(BUFFER_ADDR), time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        time.sleep(sync_every if sync_every is not None else 0.05)
        if sync_every is not None:
            machine.accel.fetch_dirty_pages()
    # The first word of the window's first page holds the latest count of a finished pass.
    return (memory.read_u32(BUFFER_ADDR) - start_count) / (time.monotonic() - start)


def stores(kernel: Path, seconds: float, repeat: int) -> dict[str, float]:
    vm, machine = _start(kernel, 64)
    try:
        accel = machine.accel
        out: dict[str, list[float]] = {"off": [], "on_no_sync": [], "on_sync_100ms": []}
        for _ in range(repeat):
            out["off"].append(_rate(machine, seconds, None))
            accel.start_dirty_log()
            try:
                out["on_no_sync"].append(_rate(machine, seconds, None))
                out["on_sync_100ms"].append(_rate(machine, seconds, 0.1))
            finally:
                accel.stop_dirty_log()
        return {key: statistics.median(values) / 1e6 for key, values in out.items()}
    finally:
        _stop(vm)


def migration(kernel: Path, ram_mb: int, tracker: str, directory: Path) -> dict[str, Any]:
    original = precopy.make_tracker
    if tracker == "shadow":
        precopy.make_tracker = lambda machine: precopy.ShadowTracker(machine.memory)  # type: ignore[assignment]
    try:
        vm, _machine = _start(kernel, ram_mb)
        try:
            started = time.monotonic()
            vm.execute("migrate", {"uri": f"file:{directory / f'{tracker}.state'}"})
            while (info := vm.execute("query-migrate"))["status"] not in ("completed", "failed"):
                time.sleep(0.01)
            total = time.monotonic() - started
            if info["status"] != "completed":
                raise RuntimeError(f"migration failed: {info}")
            ram = info["ram"]
            return {"total_s": round(total, 3), "rounds": ram["dirty-sync-count"],
                    "downtime_ms": info.get("downtime"), "downtime_bytes": ram["downtime-bytes"],
                    "precopy_bytes": ram["precopy-bytes"]}
        finally:
            _stop(vm)
    finally:
        precopy.make_tracker = original  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--ram-mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyemu-dirtylog-") as tmp:
        directory = Path(tmp)
        kernel = write_dirty_kernel(directory)
        store_rates = stores(kernel, args.seconds, args.repeat)
        print("guest stores (M/s): " + ", ".join(f"{k} {v:.1f}" for k, v in store_rates.items()))
        runs: dict[str, list[dict[str, Any]]] = {"shadow": [], "log": []}
        for _ in range(args.repeat):
            for tracker in ("shadow", "log"):
                runs[tracker].append(migration(kernel, args.ram_mb, tracker, directory))
        for tracker, results in runs.items():
            for result in results:
                print(f"migration {args.ram_mb} MiB, {tracker:6}: {result}")
    summary = {tracker: {key: statistics.median(r[key] for r in results if r[key] is not None)
                         for key in results[0]} for tracker, results in runs.items()}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"host": platform.node(), "stores_m_per_s": store_rates,
                                   "ram_mb": args.ram_mb, "migration_median": summary,
                                   "migration_runs": runs}, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
