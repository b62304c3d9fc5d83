"""The x86 selftest tooling without a guest: reading upstream's Makefile, the cached set, the initramfs,
the in-guest runner (executed here by the host's shell on stand-in tests) and the result lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyemu.guest import cli
from pyemu.guest.assets import GuestAssets, file_record
from pyemu.guest.cpio import read_archive
from pyemu.guest.errors import PackageContentError
from pyemu.guest.selftest_suite import (
    DONE_MARKER,
    HEARTBEAT,
    HEARTBEAT_SECONDS,
    LIST_PATH,
    RUNNER_PATH,
    SKIP_OPTION,
    SelftestRunError,
    build_selftest_initramfs,
    emulator_command,
    parse_results,
    render_runner,
)
from pyemu.guest.selftests import (
    SELFTEST_FORMAT,
    SELFTEST_SET,
    SelftestSet,
    find_selftests,
    selftest_dir,
    selftest_targets,
)

# The shape of tools/testing/selftests/x86/Makefile in Linux 6.1 (abridged).
MAKEFILE = """\
TARGETS_C_BOTHBITS := single_step_syscall sysret_ss_attrs \\
			check_initial_reg_state sigreturn
TARGETS_C_32BIT_ONLY := entry_from_vm86 test_FCMOV
TARGETS_C_64BIT_ONLY := fsgsbase sysret_rip
# Some selftests require 32bit support enabled also on 64bit systems
TARGETS_C_32BIT_NEEDED := ldt_gdt ptrace_syscall

$(OUTPUT)/sysret_ss_attrs_64: thunks.S
$(OUTPUT)/ptrace_syscall_32: raw_syscall_helper_32.S
$(OUTPUT)/check_initial_reg_state_64: CFLAGS += -Wl,-ereal_start -static
"""


def test_the_makefile_gives_every_test_its_group_and_extra_sources():
    targets = {t.name: t for t in selftest_targets(MAKEFILE)}
    assert list(targets) == ["single_step_syscall", "sysret_ss_attrs", "check_initial_reg_state", "sigreturn",
                             "fsgsbase", "sysret_rip", "ldt_gdt", "ptrace_syscall", "entry_from_vm86",
                             "test_FCMOV"]
    assert targets["sysret_ss_attrs"].extra_sources == ("thunks.S",)
    assert targets["ptrace_syscall"].extra_sources == ()  # that source is the 32-bit rule's
    assert targets["check_initial_reg_state"].extra_sources == ()  # flags, not a source
    assert targets["ldt_gdt"].group == "64-bit, needs 32-bit support"
    assert targets["test_FCMOV"].group == "32-bit only upstream"


def test_a_makefile_without_the_test_lists_is_an_error_not_an_empty_suite():
    with pytest.raises(PackageContentError, match="TARGETS_C_64BIT_ONLY"):
        selftest_targets(MAKEFILE.replace("TARGETS_C_64BIT_ONLY", "SOMETHING_ELSE"))


def fake_selftests(root: Path) -> SelftestSet:
    """A built set as build_selftests writes it: two binaries and one test that did not build."""
    directory = selftest_dir(root)
    (directory / "bin").mkdir(parents=True)
    tests: dict[str, dict[str, object]] = {}
    for name, code in (("passes", 0), ("skips", 4)):
        (directory / "bin" / f"{name}_64").write_text(f"#!/bin/sh\nexit {code}\n")
        tests[name] = {"group": "64-bit only", "built": True, "binary": f"bin/{name}_64"}
    tests["vm86"] = {"group": "32-bit only upstream", "built": False, "error": "vm86.h: error: unsupported"}
    files = {f"bin/{name}_64": file_record(directory / "bin" / f"{name}_64") for name in ("passes", "skips")}
    manifest = {"format": SELFTEST_FORMAT, "set": SELFTEST_SET, "source_package": "linux-source-6.1",
                "source_version": "6.1.0-test", "tests": tests, "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    found = find_selftests(root)
    assert found is not None
    return found


def test_the_cached_set_lists_built_and_unbuilt_tests_and_a_damaged_one_is_not_found(tmp_path):
    selftests = fake_selftests(tmp_path)
    assert list(selftests.built) == ["passes", "skips"]
    assert selftests.not_built == {"vm86": "vm86.h: error: unsupported"}
    (selftests.directory / "bin" / "passes_64").write_text("truncated")
    assert find_selftests(tmp_path) is None
    assert find_selftests(tmp_path / "empty") is None


def test_selftests_path_reports_a_missing_build_with_status_2(tmp_path, capsys):
    assert cli.main(["selftests", "path", "--cache", str(tmp_path)]) == 2
    assert "pyemu-guest selftests build" in capsys.readouterr().err
    fake_selftests(tmp_path)
    assert cli.main(["selftests", "path", "--cache", str(tmp_path), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert set(described["built"]) == {"passes", "skips"} and "vm86" in described["not_built"]


def fake_assets(root: Path) -> GuestAssets:
    directory = root / "assets"
    (directory / "modules").mkdir(parents=True)
    (directory / "busybox").write_text("#!/bin/sh\nexit 1\n")  # cannot list applets: /init installs them
    os.chmod(directory / "busybox", 0o755)
    (directory / "modules" / "virtio.ko").write_bytes(b"\x7fELF virtio")
    return GuestAssets(directory, {"modules": ["virtio"], "kernel_release": "9.9.9-test"})


def test_the_initramfs_holds_the_guest_the_tests_and_an_inittab_that_runs_them(tmp_path):
    selftests = fake_selftests(tmp_path)
    destination = tmp_path / "suite.cpio.gz"
    assets = fake_assets(tmp_path)
    assert build_selftest_initramfs(assets, selftests, destination, tests=["skips"]) == ["skips"]
    archive = read_archive(destination.read_bytes())
    assert archive["selftests/bin/skips"].data == b"#!/bin/sh\nexit 4\n"
    assert "selftests/bin/passes" not in archive
    assert archive[LIST_PATH].data == b"skips\n"
    assert f"::once:/{RUNNER_PATH}" in archive["etc/inittab"].data.decode()
    assert "cttyhack" not in archive["etc/inittab"].data.decode()  # no console shell waiting for input
    assert "lib/modules/9.9.9-test/virtio.ko" in archive and "init" in archive
    with pytest.raises(SelftestRunError, match="vm86"):
        build_selftest_initramfs(assets, selftests, destination, tests=["vm86"])


def _run_runner(tmp_path: Path, programs: dict[str, str], cmdline: str) -> str:
    """The runner script run by the host's shell, its guest paths pointed at a scratch tree; its output."""
    if shutil.which("timeout") is None:
        pytest.skip("no timeout command on this host")
    bin_dir = tmp_path / "selftests" / "bin"
    bin_dir.mkdir(parents=True)
    for name, body in programs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        os.chmod(bin_dir / name, 0o755)
    (tmp_path / "selftests" / "list").write_text("".join(f"{name}\n" for name in programs))
    (tmp_path / "cmdline").write_text(f"console=ttyS0 {cmdline}\n")
    script = (render_runner(120).replace("/selftests/", f"{tmp_path}/selftests/")
              .replace("/proc/cmdline", str(tmp_path / "cmdline")).replace("cd /tmp", f"cd {tmp_path}")
              .replace("/tmp/output", f"{tmp_path}/output").replace("\npoweroff\n", "\n")
              .replace(f"sleep {HEARTBEAT_SECONDS};", "sleep 0.5;"))
    completed = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.rstrip().endswith(DONE_MARKER)
    return completed.stdout


def test_the_runner_classifies_pass_skip_fail_timeout_and_trims_long_output(tmp_path):
    programs = {
        "ok": "echo fine; exit 0",
        "skip": "echo '[SKIP] no such feature'; exit 4",
        "bad": "echo '[FAIL] wrong'; exit 1",
        "crash": "kill -SEGV $$",
        "hang": "exec sleep 60",
        "chatty": "i=0; while [ $i -lt 4000 ]; do echo line-$i-xxxxxxxxxx; i=$((i+1)); done",
    }
    out = _run_runner(tmp_path, programs, "pyemu.selftest_timeout=2")
    assert "limit 2 s each" in out
    results = parse_results(out)
    assert {name: status for name, (status, _, _) in results.items()} == {
        "ok": "PASS", "skip": "SKIP", "bad": "FAIL", "crash": "FAIL", "hang": "TIMEOUT", "chatty": "PASS"}
    assert results["crash"][1] == 139 and results["hang"][1] == 137
    assert results["hang"][2] >= 2.0
    assert "line-0-" in out and "line-3999-" in out and "line-2000-" not in out
    assert "bytes of output left out" in out
    assert HEARTBEAT in out  # the hanging test ran silently for 2 s


def test_the_runner_reports_tests_the_host_skips_without_running_them(tmp_path):
    """``pyemu.selftest_skip=`` (how QEMU's reference boot leaves out the test its guest hangs in): those
    tests are reported SKIP and never start; a test whose name only contains a skipped one still runs."""
    marker = tmp_path / "ran"
    programs = {"first": "exit 0", "ldt_gdt": f"touch {marker}-ldt; exit 0", "ldt": "exit 1",
                "last": f"touch {marker}-last; exit 4"}
    out = _run_runner(tmp_path, programs, f"{SKIP_OPTION}=ldt_gdt,absent")
    results = parse_results(out)
    assert {name: status for name, (status, _, _) in results.items()} == {
        "first": "PASS", "ldt_gdt": "SKIP", "ldt": "FAIL", "last": "SKIP"}
    assert results["ldt_gdt"] == ("SKIP", 4, 0.0)
    assert not (tmp_path / "ran-ldt").exists() and (tmp_path / "ran-last").exists()
    assert "x86-selftest: begin ldt_gdt" not in out and f"ldt_gdt: not run ({SKIP_OPTION})" in out


def test_result_lines_are_read_through_carriage_returns_and_kernel_messages():
    console = ("x86-selftest: begin a\r\n[OK] a\r\n\r\nx86-selftest: result a PASS rc=0 time=0.05\r\n"
               "[   12.345] random: crng init done\r\n"
               "x86-selftest: result b TIMEOUT rc=137 time=120.01\r\n")
    assert parse_results(console) == {"a": ("PASS", 0, 0.05), "b": ("TIMEOUT", 137, 120.01)}


def test_both_emulators_boot_the_same_kernel_initramfs_and_memory(tmp_path):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    pyemu = emulator_command("pyemu", "tcg", kernel, initrd, append="x=1")
    qemu = emulator_command("qemu", "tcg", kernel, initrd, append="x=1")
    for command in (pyemu, qemu):
        assert command[command.index("-kernel") + 1] == str(kernel)
        assert command[command.index("-initrd") + 1] == str(initrd)
        assert ["-m", "512M"] in [command[i:i + 2] for i in range(len(command))]
        assert command[command.index("-append") + 1].startswith("console=ttyS0 x=1")
    with pytest.raises(SelftestRunError, match="unknown emulator"):
        emulator_command("bochs", "tcg", kernel, initrd)
