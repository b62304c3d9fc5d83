"""Linux's own x86 selftests (``tools/testing/selftests/x86``), built once into the pyemu cache.

Why: a fidelity suite nobody here wrote. The kernel's x86 selftests poke exactly the corners a software CPU
gets wrong (SYSRET with odd RIPs, segment loads and the LDT, single-stepping over SYSCALL, MOV SS shadows,
x87 flags, FSGSBASE, sigreturn with strange selectors), and their verdicts are the kernel developers', not
ours. :mod:`pyemu.guest.selftest_suite` runs them in the Debian guest under pyemu and under QEMU.

How: ``apt-get download linux-source-6.1`` (Debian's kernel source, the same 6.1 series as the guest
kernel), unpack only the selftest directory and the few kernel headers it includes, and compile every
test 64-bit and static with the host's gcc (the guest initramfs has busybox but no C library). The Makefile
is read for the test lists, so a newer source package with another test in it is built too:

- its 64-bit targets (``TARGETS_C_BOTHBITS``, ``TARGETS_C_64BIT_ONLY``, and ``TARGETS_C_32BIT_NEEDED``,
  which upstream builds 64-bit only when a 32-bit toolchain exists: they exercise the 32-bit compat entry
  points, which Debian's kernel has);
- its 32-bit-only targets are tried 64-bit too: the x87 tests (``test_FCMOV`` ...) are plain x87 code and
  build and run 64-bit; the others fail to build (vm86, 32-bit register names) and are recorded with the
  compiler's first error, so the list of what does not build is part of the set.

The result goes to ``<cache>/guest/x86-selftests-6.1/``: ``bin/<test>_64``, ``logs/<test>.log`` for tests
that did not build, and ``manifest.json`` (source version, compiler, per-test status, file hashes). As for
the Debian asset set (:mod:`pyemu.guest.assets`) it is built in a scratch directory and swapped in whole
under a lock file, so a reader never sees half a set.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pyemu.guest.assets import (
    asset_lock,
    file_record,
    install_asset_set,
    read_manifest,
    scratch_directory,
    sha256_file,
    write_manifest,
)
from pyemu.guest.debs import obtain_deb, require_tool, run_tool
from pyemu.guest.errors import CacheError, PackageContentError
from pyemu.system.cache import cache_root

SOURCE_PACKAGE = "linux-source-6.1"
SELFTEST_SET = "x86-selftests-6.1"
SELFTEST_FORMAT = 1
SOURCE_TARBALL = "usr/src/linux-source-6.1.tar.xz"
SELFTEST_DIR = "tools/testing/selftests/x86"
# What the tests include from outside their directory: kselftest.h (``../kselftest.h``) and sigreturn.c's
# ``../../../../arch/x86/include/asm/desc_defs.h``; lib.mk only so the Makefile reads as upstream's.
SOURCE_MEMBERS = (
    f"{SELFTEST_DIR}/",
    "tools/testing/selftests/kselftest.h",
    "tools/testing/selftests/lib.mk",
    "arch/x86/include/asm/desc_defs.h",
)
BIN_DIR = "bin"
LOG_DIR = "logs"
# Upstream's flags for the 64-bit binaries (Makefile: CFLAGS, -no-pie, CAN_BUILD_64, -lrt -ldl), plus
# -static (no C library in the guest), -s (smaller initramfs) and -lm (the x87 tests, which upstream links
# 32-bit with -lm). No -DCAN_BUILD_32: there are no 32-bit binaries for a test to hand over to.
CFLAGS = ("-m64", "-static", "-s", "-O2", "-std=gnu99", "-pthread", "-Wall", "-no-pie", "-DCAN_BUILD_64")
LIBS = ("-lrt", "-ldl", "-lm")
# Makefile: check_initial_reg_state needs its own entry point (the libc start code would disturb the
# register state it checks); the build is static already.
EXTRA_LDFLAGS = {"check_initial_reg_state": ("-Wl,-ereal_start",)}
COMPILE_TIMEOUT = 300

Reporter = Callable[[str], None]

UPSTREAM_GROUPS = {
    "TARGETS_C_BOTHBITS": "64-bit and 32-bit",
    "TARGETS_C_64BIT_ONLY": "64-bit only",
    "TARGETS_C_32BIT_NEEDED": "64-bit, needs 32-bit support",
    "TARGETS_C_32BIT_ONLY": "32-bit only upstream",
}

__all__ = [
    "SELFTEST_SET", "SelftestSet", "SelftestTarget", "build_selftests", "find_selftests", "selftest_dir",
    "selftest_targets",
]


def _quiet(_: str) -> None:
    pass


def selftest_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """``<cache>/guest/x86-selftests-6.1`` (next to the Debian asset set)."""
    root = Path(cache) if cache is not None else cache_root()
    return root / "guest" / SELFTEST_SET


@dataclass(frozen=True)
class SelftestTarget:
    """One test of the Makefile: its name, which upstream list it is in, and the extra sources it links
    (``$(OUTPUT)/<name>_64: thunks.S``)."""

    name: str
    group: str
    extra_sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class SelftestSet:
    """A complete built set: where it is and what its manifest says."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def tests(self) -> dict[str, dict[str, Any]]:
        """Every test of the Makefile by name: ``built``, ``group``, and ``error`` when not built."""
        return dict(self.manifest.get("tests", {}))

    @property
    def built(self) -> dict[str, Path]:
        """The binaries, by test name, in the Makefile's order."""
        return {name: self.directory / info["binary"] for name, info in self.tests.items() if info.get("built")}

    @property
    def not_built(self) -> dict[str, str]:
        """The tests that do not build 64-bit, with the compiler's reason."""
        return {name: str(info.get("error", "")) for name, info in self.tests.items() if not info.get("built")}

    @property
    def source_version(self) -> str:
        return str(self.manifest.get("source_version", ""))


def _makefile_variables(text: str) -> dict[str, list[str]]:
    """``NAME := words \\`` assignments of a Makefile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    variables: dict[str, list[str]] = {}
    for match in re.finditer(r"^([A-Z0-9_]+)\s*:=\s*(.*)$", joined, re.MULTILINE):
        variables[match.group(1)] = match.group(2).split()
    return variables


def selftest_targets(makefile: str) -> list[SelftestTarget]:
    """Every C test the x86 Makefile names, in its order, with the group it comes from and the extra
    sources its 64-bit rule adds. Raises PackageContentError when the lists are missing (a Makefile this
    code does not understand must not yield an empty suite that passes)."""
    variables = _makefile_variables(makefile)
    extras: dict[str, list[str]] = {}
    for match in re.finditer(r"^\$\(OUTPUT\)/(\w+)_64:\s*([^=\n]*)$", makefile, re.MULTILINE):
        sources = [w for w in match.group(2).split() if w.endswith((".S", ".c"))]
        extras.setdefault(match.group(1), []).extend(sources)
    targets: list[SelftestTarget] = []
    seen: set[str] = set()
    for variable, group in UPSTREAM_GROUPS.items():
        if variable not in variables:
            raise PackageContentError(f"the x86 selftest Makefile has no {variable}; cannot list the tests")
        for name in variables[variable]:
            if name not in seen and re.fullmatch(r"\w+", name):
                seen.add(name)
                targets.append(SelftestTarget(name, group, tuple(extras.get(name, ()))))
    return targets


def _check_set(directory: Path) -> SelftestSet | None:
    """The set in ``directory`` if its manifest is current and its binaries have the recorded sizes."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("format") != SELFTEST_FORMAT or manifest.get("set") != SELFTEST_SET:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("tests"), dict):
        return None
    for name, record in files.items():
        try:
            if (directory / name).stat().st_size != record.get("size"):
                return None
        except OSError:
            return None
    return SelftestSet(directory, manifest)


def find_selftests(cache: str | os.PathLike[str] | None = None) -> SelftestSet | None:
    """The built selftests, or None when ``pyemu-guest selftests build`` has not completed (cheap check)."""
    return _check_set(selftest_dir(cache))


def build_selftests(
    cache: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    debs_dir: str | os.PathLike[str] | None = None,
    report: Reporter = _quiet,
) -> tuple[SelftestSet, bool]:
    """The built set in ``cache``, built first unless complete (or ``force``); also whether it was built.

    ``debs_dir`` names a directory holding ``linux-source-6.1_*.deb`` to use before ``apt-get download``.
    """
    target = selftest_dir(cache)
    with asset_lock(target):
        if not force:
            existing = _check_set(target)
            if existing is not None and all(
                sha256_file(target / name) == record.get("sha256")
                for name, record in existing.manifest["files"].items()
            ):
                report(f"x86 selftests already built in {target}")
                return existing, False
        with scratch_directory(target) as scratch:
            _build_set(scratch, Path(debs_dir) if debs_dir else None, report)
            install_asset_set(scratch / "out", target)
    built = _check_set(target)
    if built is None:
        raise CacheError(f"the x86 selftest set in {target} is incomplete right after building it")
    return built, True


def _extract_sources(deb: Path, scratch: Path) -> Path:
    """Unpack the selftest directory and the headers it includes from the package's source tarball;
    returns the source root (holding ``tools/`` and ``arch/``)."""
    package_root = scratch / "package"
    package_root.mkdir()
    run_tool(["dpkg-deb", "-x", str(deb), str(package_root)], what=f"unpacking {deb.name}")
    tarball = package_root / SOURCE_TARBALL
    if not tarball.is_file():
        raise PackageContentError(f"{deb.name} has no {SOURCE_TARBALL}")
    source = scratch / "source"
    source.mkdir()
    require_tool("xz")
    top = tarball.name.removesuffix(".tar.xz")  # linux-source-6.1/...
    members = [f"{top}/{member}" for member in SOURCE_MEMBERS]
    run_tool(["tar", "-xJf", str(tarball), "-C", str(source), "--strip-components=1", *members],
             what=f"extracting the x86 selftests from {tarball.name}")
    tarball.unlink()  # 130 MB the build does not need any more
    if not (source / SELFTEST_DIR / "Makefile").is_file():
        raise PackageContentError(f"{tarball.name} has no {SELFTEST_DIR}/Makefile")
    return source


def _compile(source: Path, target: SelftestTarget, output: Path) -> tuple[bool, str]:
    """Compile one test as upstream's 64-bit rule does (plus -static); returns (built, compiler output)."""
    directory = source / SELFTEST_DIR
    binary = output / BIN_DIR / f"{target.name}_64"
    command = ["gcc", *CFLAGS, *EXTRA_LDFLAGS.get(target.name, ()), "-o", str(binary),
               f"{target.name}.c", *target.extra_sources, *LIBS]
    try:
        completed = subprocess.run(command, cwd=directory, capture_output=True, text=True,
                                   timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, f"gcc timed out after {COMPILE_TIMEOUT} s"
    text = completed.stdout + completed.stderr
    return completed.returncode == 0 and binary.is_file(), text


def _first_error(log: str) -> str:
    """The line a reader needs from a failed compile: the first ``error:`` (else the last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line
    return lines[-1] if lines else "no output"


def _gcc_version() -> str:
    return run_tool(["gcc", "-dumpfullversion"], what="asking gcc its version").strip()


def _build_set(scratch: Path, debs_dir: Path | None, report: Reporter) -> None:
    require_tool("gcc")
    downloads = scratch / "debs"
    downloads.mkdir()
    output = scratch / "out"
    (output / BIN_DIR).mkdir(parents=True)
    (output / LOG_DIR).mkdir()

    report(f"getting {SOURCE_PACKAGE}")
    deb = obtain_deb(SOURCE_PACKAGE, downloads, local_dir=debs_dir)
    report(f"extracting {SELFTEST_DIR} from {deb.path.name}")
    source = _extract_sources(deb.path, scratch)
    targets = selftest_targets((source / SELFTEST_DIR / "Makefile").read_text(encoding="utf-8"))

    report(f"compiling {len(targets)} tests (64-bit, static)")
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        outcomes = list(pool.map(lambda t: _compile(source, t, output), targets))
    tests: dict[str, dict[str, Any]] = {}
    for target, (built, log) in zip(targets, outcomes):
        entry: dict[str, Any] = {"group": target.group, "built": built}
        if built:
            entry["binary"] = f"{BIN_DIR}/{target.name}_64"
        else:
            (output / LOG_DIR / f"{target.name}.log").write_text(log, encoding="utf-8")
            entry["error"] = _first_error(log)
            report(f"{target.name} does not build 64-bit: {entry['error']}")
        tests[target.name] = entry
    if not any(entry["built"] for entry in tests.values()):
        raise PackageContentError(f"no x86 selftest built; see the logs in {output / LOG_DIR}")

    files = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    manifest = {
        "format": SELFTEST_FORMAT,
        "set": SELFTEST_SET,
        "source_package": deb.name,
        "source_version": deb.version,
        "compiler": f"gcc {_gcc_version()}",
        "cflags": [*CFLAGS, *LIBS],
        "tests": tests,
        "files": {name: file_record(output / name) for name in files},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(output, manifest)

