"""Software-CPU store speed: guest stores per second to pages the guest's page tables leave executable.

Why this exists: Unicorn 2.1.4 keeps every store to a page whose TLB entry is executable on its slow path
(``notdirty_write``), and with the engine's own MMU an entry is executable whenever the guest's page
tables allow execution -- every page of a kernel image before its data is marked NX, every page with
paging off, the whole of the bzImage decompressor's identity map. pyemu's TLB-fill hook
(accel/tcg/tlb_fill.c) withholds EXEC from pages no code was fetched from. This benchmark runs the same
guest loop of 4 stores per iteration:

* ``data_page``: to a data page that is executable in the page tables (no NX), no code on it;
* ``nx_page``: to a page marked NX in the page tables (the engine's fast case even without the hook);
* ``code_page``: to the page holding the loop itself (self-modifying-code checks on every store: slow in
  both modes, as in QEMU);

each with pyemu's hook and with the engine filling its TLB itself (``PYEMU_TCG_ENGINE_TLB=1``). Timed
inside the guest run (``ProgramResult.elapsed``). Prints M stores/s and writes
``benchmarks/results/tcg_stores.json``.

Usage: python benchmarks/tcg_stores.py [--iterations 5000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from pyemu.testing import GuestProgram, describe, pte_address, run_program
from pyemu.testing.handlers import exit_with

RESULTS = Path(__file__).with_name("results") / "tcg_stores.json"
DATA_PAGE = 0x4C000
NX_PAGE = 0x4D000
STORES_PER_ITERATION = 4


def program(target: str, iterations: int) -> GuestProgram:
    setup = ""
    if target == "nx_page":
        setup = f"""
            mov rbx, {pte_address(NX_PAGE)}
            mov rax, {NX_PAGE | 0x67 | (1 << 63)}
            mov [rbx], rax
            mov rdi, {NX_PAGE}
            invlpg [rdi]
        """
    elif target == "data_page":
        setup = f"mov rdi, {DATA_PAGE}"
    else:
        setup = "mov rdi, spin\nadd rdi, 0x800"
    return GuestProgram(f"""
        {setup}
        mov rcx, {iterations}
    spin:
        mov [rdi], rax
        mov [rdi + 8], rcx
        mov [rdi + 16], rax
        mov [rdi + 24], rcx
        add rax, 1
        dec rcx
        jnz spin
        {exit_with(0x600d)}
    """)


def measure(target: str, iterations: int, engine_tlb: bool) -> float:
    previous = os.environ.get("PYEMU_TCG_ENGINE_TLB")
    os.environ["PYEMU_TCG_ENGINE_TLB"] = "1" if engine_tlb else "0"
    try:
        result = run_program(program(target, iterations), "tcg", timeout=120)
    finally:
        if previous is None:
            del os.environ["PYEMU_TCG_ENGINE_TLB"]
        else:
            os.environ["PYEMU_TCG_ENGINE_TLB"] = previous
    if result.exit_value != 0x600D:
        raise SystemExit(f"{target}: guest did not finish\n{describe(result)}")
    return iterations * STORES_PER_ITERATION / result.elapsed / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5_000_000)
    args = parser.parse_args()
    figures: dict[str, object] = {
        "benchmark": "guest stores per second (M/s), 4 stores per loop iteration",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "iterations": args.iterations,
        "results": {},
    }
    results: dict[str, dict[str, float]] = {}
    for target in ("data_page", "nx_page", "code_page"):
        iterations = args.iterations if target != "code_page" else max(1, args.iterations // 10)
        row = {"pyemu_tlb_hook": round(measure(target, iterations, False), 1),
               "engine_tlb": round(measure(target, iterations, True), 1)}
        results[target] = row
        print(f"{target:10s} hook {row['pyemu_tlb_hook']:7.1f} M stores/s   engine TLB {row['engine_tlb']:7.1f} M stores/s")
    figures["results"] = results
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
