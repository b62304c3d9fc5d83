"""``pyemu-engine``: build pyemu's libunicorn (Unicorn's source + :mod:`pyemu.accel.tcg.engine_patches`).

    pyemu-engine build [--sdist FILE] [--force] [--quiet]   download, patch, compile, check, install
    pyemu-engine status [--json]                            which library a pyemu process would load

Why a build step: PyPI ships Unicorn compiled, with helper calls pyemu does not need after every guest
memory access; the patched build runs the software CPU faster (figures in ``engine_patches``). It is
optional: without it pyemu uses PyPI's library (:mod:`pyemu.accel.tcg.engine_library`).

Steps: ``pip download`` the ``unicorn`` sdist of the release the installed binding is (or ``--sdist``),
unpack it into a scratch directory, patch ``src/``, configure with CMake for x86 only (Ninja when
installed), compile the shared library, load it in a child process and run a few instructions (the
binding refuses a library of another release), then move it into the cache and write the stamp last.
A failed step raises :class:`EngineBuildError` naming the step and leaves the cache as it was.
Needs: cmake, a C compiler, and network access to PyPI (or ``--sdist``). Takes ~30 s on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TextIO

from pyemu.accel.tcg.engine_library import LIBRARY_NAME, binding_is_built_release, build_dir, built_library
from pyemu.accel.tcg.engine_patches import UNICORN_VERSION, apply_patches, patch_digest
from pyemu.accel.tcg.errors import EngineBuildError

EXIT_ERROR = 1
STEP_TIMEOUT_S = 1800.0

# Runs in a child process with LIBUNICORN_PATH set: the binding checks the library's release on load;
# a dec/jnz loop of 1000 iterations must leave RCX at 0 and RIP at the end of the code (0x100d).
_SELF_CHECK = """
from unicorn import Uc, UC_ARCH_X86, UC_MODE_64, uc_version
from unicorn.unicorn_py3 import unicorn as binding
from unicorn.x86_const import UC_X86_REG_RCX, UC_X86_REG_RIP
uc = Uc(UC_ARCH_X86, UC_MODE_64)
uc.mem_map(0x1000, 0x1000)
code = bytes.fromhex("48c7c1e8030000" "48ffc9" "75fb" "90")  # mov rcx,1000; dec rcx; jnz -5; nop
uc.mem_write(0x1000, code)
uc.emu_start(0x1000, 0x1000 + len(code))
combined = uc_version()[2]  # 0xMMmmpp..: major, minor, patch level
release = "%d.%d.%d" % (combined >> 24, (combined >> 16) & 0xFF, (combined >> 8) & 0xFF)
print(binding.uclib._name, release, uc.reg_read(UC_X86_REG_RCX), hex(uc.reg_read(UC_X86_REG_RIP)))
"""


def _run(command: list[str], *, step: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                                   timeout=STEP_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise EngineBuildError(f"{command[0]} not found (needed to {step})", step=step) from exc
    except subprocess.TimeoutExpired as exc:
        raise EngineBuildError(f"{' '.join(command[:3])} took longer than {STEP_TIMEOUT_S:.0f} s",
                               step=step) from exc
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-15:])
        raise EngineBuildError(f"{' '.join(command[:4])} failed with status {completed.returncode}:\n{tail}",
                               step=step)
    return completed.stdout


def installed_binding_version() -> str:
    """The release of the installed ``unicorn`` Python package (without importing it), for messages."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unicorn")
    except PackageNotFoundError:
        return "not installed"


def download_sdist(directory: Path) -> Path:
    """``pip download`` Unicorn's source distribution into ``directory``."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          "--disable-pip-version-check", f"unicorn=={UNICORN_VERSION}", "-d", str(directory)], step="download")
    found = sorted(directory.glob(f"unicorn-{UNICORN_VERSION}.tar.gz"))
    if not found:
        raise EngineBuildError(f"pip download left no unicorn-{UNICORN_VERSION}.tar.gz", step="download")
    return found[0]


def unpack_source(sdist: Path, directory: Path) -> Path:
    """Unpack the sdist and return its ``src`` directory (Unicorn's CMake project)."""
    try:
        with tarfile.open(sdist) as archive:
            archive.extractall(directory, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise EngineBuildError(f"cannot unpack {sdist}: {exc}", step="unpack") from exc
    roots = [path for path in directory.iterdir() if (path / "src" / "CMakeLists.txt").is_file()]
    if len(roots) != 1:
        raise EngineBuildError(f"{sdist.name} does not hold one unicorn source tree", step="unpack")
    return roots[0] / "src"


def compile_library(source: Path, build: Path) -> Path:
    """Configure (x86 only, Release, no tests) and build the shared library; returns its path."""
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(source), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
          "-DUNICORN_ARCH=x86", "-DUNICORN_BUILD_TESTS=OFF", "-DUNICORN_INSTALL=OFF", "-DBUILD_SHARED_LIBS=ON"],
         step="configure")
    jobs = str(max(1, os.cpu_count() or 1))
    _run(["cmake", "--build", str(build), "--target", "unicorn", "--parallel", jobs], step="compile")
    library = build / LIBRARY_NAME
    if not library.is_file():
        raise EngineBuildError(f"the build produced no {LIBRARY_NAME} in {build}", step="compile")
    return library


def check_library(directory: Path) -> str:
    """Load the library from ``directory`` in a child process and run a loop on it; returns its report."""
    env = dict(os.environ, LIBUNICORN_PATH=str(directory), PYEMU_UNICORN="auto")
    report = _run([sys.executable, "-c", _SELF_CHECK], step="check", env=env).strip()
    parts = report.split()
    if len(parts) != 4 or Path(parts[0]).parent != directory or parts[1] != UNICORN_VERSION \
            or parts[2] != "0" or parts[3] != "0x100d":
        raise EngineBuildError(f"the built library failed its check: {report!r}", step="check")
    return report


def kept_sdist() -> Path:
    """Where the build keeps the Unicorn source archive it was made from."""
    return build_dir().parent / "sdist" / f"unicorn-{UNICORN_VERSION}.tar.gz"


def build_engine(*, sdist: Path | None = None, force: bool = False, log: TextIO | None = None) -> Path:
    """Build and install pyemu's libunicorn unless a complete build is cached; returns the library."""
    say = (lambda message: print(message, file=log)) if log is not None else (lambda message: None)
    existing = built_library()
    if existing is not None and not force:
        say(f"pyemu-engine: already built: {existing}")
        return existing
    if not binding_is_built_release():  # the test the selection makes: a build it would not load is useless
        raise EngineBuildError(f"the installed unicorn binding is {installed_binding_version()}; the patches are "
                               f"for {UNICORN_VERSION}", step="download")
    if sdist is not None and not sdist.is_file():
        raise EngineBuildError(f"--sdist {sdist}: no such file", step="download")
    target = build_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="unicorn-build-", dir=target.parent) as scratch_name:
        scratch = Path(scratch_name)
        if sdist is None:
            say(f"pyemu-engine: downloading unicorn {UNICORN_VERSION} source")
            sdist = download_sdist(scratch)
        kept = kept_sdist()
        if sdist != kept:  # kept beside the build: tests check the patches against the real source
            try:
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(sdist, kept)
            except OSError as exc:
                raise EngineBuildError(f"cannot keep {sdist.name} in {kept.parent}: {exc.strerror}",
                                       step="download") from exc
        source = unpack_source(sdist, scratch / "source")
        apply_patches(source)
        say(f"pyemu-engine: compiling (patch set {patch_digest()})")
        library = compile_library(source, scratch / "build")
        staged = scratch / "install"
        staged.mkdir()
        shutil.copy2(library, staged / LIBRARY_NAME)
        report = check_library(staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)  # a rename: the checked file itself
        stamp = {"unicorn": UNICORN_VERSION, "patches": patch_digest(), "sdist": sdist.name,
                 "seconds": round(time.monotonic() - started, 1), "check": report.split(maxsplit=1)[1]}
        (target / "stamp").write_text(json.dumps(stamp, indent=1) + "\n")
    for stale in target.parent.glob(f"{UNICORN_VERSION}-*"):  # builds of older patch sets: never selected again
        if stale != target and (stale / "stamp").is_file():
            shutil.rmtree(stale, ignore_errors=True)
    say(f"pyemu-engine: built {target / LIBRARY_NAME} in {time.monotonic() - started:.0f} s")
    return target / LIBRARY_NAME


def status() -> dict[str, object]:
    """What this process chose and loaded (a pyemu process started the same way chooses the same)."""
    from pyemu.accel import tcg
    from pyemu.accel.tcg.engine_library import CHOICE_VARIABLE, loaded_library

    return {"unicorn": UNICORN_VERSION, "patches": patch_digest(), "build_dir": str(build_dir()),
            "built": built_library() is not None, "choice": os.environ.get(CHOICE_VARIABLE, "auto"),
            "selected": tcg.ENGINE_LIBRARY, "loaded": loaded_library(),
            "error": None if tcg.ENGINE_LIBRARY_ERROR is None else str(tcg.ENGINE_LIBRARY_ERROR)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyemu-engine",
                                     description="Build pyemu's patched Unicorn library for the software CPU.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="download, patch, compile and install (once)")
    build.add_argument("--sdist", metavar="FILE", type=Path, help="use this unicorn sdist instead of pip download")
    build.add_argument("--force", action="store_true", help="rebuild even if a build is cached")
    build.add_argument("--quiet", "-q", action="store_true", help="print only the library path")
    info = commands.add_parser("status", help="print whether the build is there and what would load")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            library = build_engine(sdist=args.sdist, force=args.force, log=None if args.quiet else sys.stderr)
            print(library)
            return 0
        facts = status()
        if args.json:
            print(json.dumps(facts, indent=1))
        else:
            for key, value in facts.items():
                print(f"{key}: {value}")
        return 0
    except EngineBuildError as exc:
        print(f"pyemu-engine: error ({exc.step}): {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
