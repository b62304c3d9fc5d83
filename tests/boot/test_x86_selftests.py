"""Linux's own x86 selftests, in the Debian guest, under pyemu's software CPU and under QEMU TCG.

An external fidelity suite (issue 14): the kernel developers' tests of SYSRET, segment loads, the LDT,
single-stepping, MOV SS shadows, x87 flags, FSGSBASE, sigreturn... built from Debian's linux-source-6.1
(``pyemu-guest selftests build``, :mod:`pyemu.guest.selftests`) and run by one boot per emulator
(:mod:`pyemu.guest.selftest_suite`). QEMU's run is the reference: every test QEMU TCG passes must pass under
pyemu, except those in :data:`KNOWN_FAILURES`, each with its reason. A listed test that passes fails this
test too, so the table is always the truth and the README's table with it.

Both boots run at the same time (one core each on this two-core machine): the whole test takes as long
as pyemu's boot, a few minutes.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from pyemu.guest.selftest_suite import SuiteRun, build_selftest_initramfs, run_suite
from pyemu.guest.selftests import SelftestSet, find_selftests

# The suite's boots (both side by side, then up to RETRIES more of each after a hang, each hang waited out
# for SILENCE_LIMIT) share one budget, longer than the suite-wide per-test limit: pyemu's boot alone takes
# up to ~5 min on a loaded host, and three of them with their waits fit in 30.
pytestmark = [pytest.mark.slow, pytest.mark.assets, pytest.mark.timeout(1800)]

# Tests QEMU TCG passes and pyemu's software CPU does not yet, and why. Do not fix CPU bugs here: fix the
# CPU, then remove the entry (this test fails until you do).
KNOWN_FAILURES: dict[str, str] = {
    "test_FCOMI": "FCOMI/FCOMIP with a QNaN operand and FUCOMI with an SNaN do not raise the x87 invalid-operation "
                  "exception (FE_INVALID stays clear); QEMU 7.2's x87 does",
    "test_FISTTP": "FISTTP of pi (truncating 3.14 to 3) does not leave exactly the inexact flag (FE_INEXACT) set",
}

# Tests whose verdict under pyemu depends on timing, with the reason: they are compared in neither
# direction (a run that passes them says nothing, nor does one that fails them), and the README says so.
INTERMITTENT: dict[str, str] = {
    "fsgsbase": "most likely a race in the test that slow emulation widens (not proven: no Intel host here): "
                "after ARCH_SET_GS(1) and 'mov 0 to %gs' it reads the base through a SIGSEGV (0), then asks the "
                "kernel (ARCH_GET_GS); a context switch in between makes Linux restore its saved base 1 "
                "(save_base_legacy's Intel behaviour; pyemu's CPU is Intel, QEMU's qemu64 AMD). "
                "Failed in 2 of 4 pyemu runs",
    "ldt_gdt": "most likely the same race for FS: set_thread_area (int 0x80) invalidates FS, which loads a null "
               "selector (base 0); a context switch before ARCH_GET_FS (likely on the syscall's way out when a "
               "tick came during it) restores the saved glibc TLS base: '[FAIL] New FSBASE was 0x...'. "
               "Failed in 1 of 4 pyemu runs",
}


# Tests in which QEMU 7.2 TCG's guest can go silent for good, and pyemu's on PyPI's library. pyemu runs them, and
# a run that hangs there is booted again, up to RETRIES times. QEMU's reference run leaves them out (reported
# SKIP): they are INTERMITTENT, so its verdict is never compared, and its hangs there (4 of 10 full runs, two in
# a row in a CI run of 2026-12-06, each waited out for SILENCE_LIMIT) outran the test's time. The cause, found
# on 2026-12-06 under pyemu (QEMU 7.2's hang is most likely the same): on one CPU Linux takes spin locks with
# "ds cmpxchg" (its LOCK prefixes patched into DS), and QEMU 5.0's translator (Unicorn's) added the base DS still
# cached from the test's TLS descriptor to such 64-bit accesses; the hrtimer lock taken in a timer interrupt
# during set_thread_area then faulted and the guest hung. pyemu's engine ignores CS/DS/ES/SS overrides in 64-bit
# mode (tests/guest/test_tcg_segment_overrides.py).
HANG_UNDER_BOTH = frozenset({"ldt_gdt"})

RETRIES = 4
"""Boots after a first one silent in a test of HANG_UNDER_BOTH. Before the engine fix pyemu's guest hung in
ldt_gdt in 2 of 3 boots of one test run and 5 of 24 boots of iopl+ldt_gdt alone (2026-12-06); after it, 0 of 32.
Kept for PyPI's library, which has the bug. Each hang costs SILENCE_LIMIT plus the boot to ldt_gdt."""


@pytest.fixture(scope="module")
def selftests() -> SelftestSet:
    """The built selftests; skipped when not built, a failure in CI (``.ci/run`` builds them)."""
    found = find_selftests()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("x86 selftests missing in CI: .ci/run must run 'pyemu-guest selftests build'")
        pytest.skip("x86 selftests not built (run 'pyemu-guest selftests build')")
    return found


@pytest.fixture(scope="module")
def suite_initrd(guest_assets, selftests, tmp_path_factory) -> tuple[Path, list[str]]:  # type: ignore[no-untyped-def]
    initrd = tmp_path_factory.mktemp("x86-selftests") / "initramfs.cpio.gz"
    tests = build_selftest_initramfs(guest_assets, selftests, initrd)
    return initrd, tests


@pytest.fixture(scope="module")
def runs(guest_assets, suite_initrd, tmp_path_factory) -> dict[str, SuiteRun]:  # type: ignore[no-untyped-def]
    """One boot under pyemu TCG and one under QEMU TCG, side by side (their consoles are logged as they
    run, to follow them: ``<pytest tmp>/x86-selftest-logs*/{pyemu,qemu}.log``)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed: no reference run")
    initrd, _ = suite_initrd
    logs = tmp_path_factory.mktemp("x86-selftest-logs")
    results: dict[str, SuiteRun] = {}
    errors: dict[str, BaseException] = {}

    def suite(emulator: str, log: str) -> SuiteRun:
        skip = sorted(HANG_UNDER_BOTH) if emulator == "qemu" else []
        return run_suite(emulator, "tcg", guest_assets.kernel, initrd, skip=skip, log=logs / log)

    def boot(emulator: str) -> None:
        try:
            results[emulator] = suite(emulator, f"{emulator}.log")
        except BaseException as exc:  # re-raised in the test's thread below
            errors[emulator] = exc

    threads = [threading.Thread(target=boot, args=(emulator,)) for emulator in ("qemu", "pyemu")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for exc in errors.values():
        raise exc
    for retry in range(RETRIES):
        if not results["qemu"].completed:
            # The reference, not the system under test, without the tests it hangs in (HANG_UNDER_BOTH); a
            # boot that still did not finish gets another, alone; the test below fails if none finishes.
            results["qemu"] = suite("qemu", f"qemu-retry{retry}.log")
        if not results["pyemu"].completed and _silent_in(results["pyemu"]) in HANG_UNDER_BOTH:
            # The hang QEMU's guest has too (see HANG_UNDER_BOTH): another boot, alone; the test below fails
            # if none finishes, or if pyemu goes silent anywhere else.
            results["pyemu"] = suite("pyemu", f"pyemu-retry{retry}.log")
    return results


def _silent_in(run: SuiteRun) -> str | None:
    """The test a run that did not finish was in when its console went silent (None: between tests)."""
    started = [line.split("begin ", 1)[1].strip() for line in run.console.splitlines()
               if line.startswith("x86-selftest: begin ")]
    return started[-1] if started and run.status(started[-1]) == "MISSING" else None


def _tail(run: SuiteRun) -> str:
    return f"{run.emulator} console tail:\n{run.console[-3000:]}"


@pytest.mark.parametrize("emulator", ["qemu", "pyemu"])
def test_the_suite_runs_to_its_end_and_reports_every_test(runs, suite_initrd, emulator):
    run = runs[emulator]
    _, tests = suite_initrd
    assert run.completed, f"the suite did not finish in {run.seconds:.0f} s; " + _tail(run)
    assert run.exit_status == 0, f"{emulator} exited {run.exit_status} after the suite; " + _tail(run)
    assert sorted(run.results) == sorted(tests), _tail(run)


def test_pyemu_passes_every_selftest_qemu_tcg_passes(runs):
    qemu, pyemu = runs["qemu"], runs["pyemu"]
    assert qemu.completed, "QEMU's run did not finish: nothing to compare against (see the test above)"
    table = "\n".join(f"  {name:<26} pyemu {pyemu.status(name):<8} qemu {qemu.status(name)}"
                      for name in sorted(qemu.results))
    regressions = {name: pyemu.output_of(name)[-1500:] for name, (status, _, _) in qemu.results.items()
                   if status == "PASS" and pyemu.status(name) != "PASS"
                   and name not in KNOWN_FAILURES and name not in INTERMITTENT}
    assert not regressions, (
        f"QEMU TCG passes these x86 selftests and pyemu does not: {sorted(regressions)}\n{table}\n" +
        "\n".join(f"--- {name} under pyemu:\n{out}" for name, out in regressions.items()))


def test_the_known_failures_table_is_current(runs, suite_initrd):
    """A known failure that pyemu now passes (or that is no test of the suite) leaves the table: it must say
    what is true today. (QEMU's verdict is not checked here: under a loaded host its slowest test may time
    out, and that says nothing about pyemu.)"""
    pyemu, (_, tests) = runs["pyemu"], suite_initrd
    stale = {name: "not in the suite" if name not in tests else "pyemu passes it" for name in KNOWN_FAILURES
             if name not in tests or pyemu.status(name) == "PASS"}
    assert not stale, f"remove these from KNOWN_FAILURES (and the README's table): {stale}"
    assert not set(KNOWN_FAILURES) & set(INTERMITTENT)
    assert HANG_UNDER_BOTH <= set(INTERMITTENT), "QEMU's reference skips these: their verdict must not count"
    assert set(INTERMITTENT) <= set(tests), f"INTERMITTENT names tests not in the suite: {INTERMITTENT}"


@pytest.mark.kvm
def test_the_suite_under_kvm(guest_assets, suite_initrd, kvm_usable, request):
    """pyemu -accel kvm, where Linux boots under this host's KVM. DESIGN.md: here it gets only through early
    boot (QEMU too), so the run is opt-in: ``PYEMU_KVM_LINUX=1`` on a host where it boots. Same bar as TCG:
    what QEMU TCG passes passes."""
    if os.environ.get("PYEMU_KVM_LINUX") != "1":
        pytest.skip("Linux does not boot under this host's KVM (DESIGN.md); set PYEMU_KVM_LINUX=1 where it does")
    qemu = request.getfixturevalue("runs")["qemu"]
    initrd, _ = suite_initrd
    run = run_suite("pyemu", "kvm", guest_assets.kernel, initrd)
    assert run.completed, _tail(run)
    regressions = [name for name, (status, _, _) in qemu.results.items()
                   if status == "PASS" and run.status(name) != "PASS"]
    assert not regressions, f"pass under QEMU TCG, not under pyemu -accel kvm: {regressions}"
