"""``pyemu-guest selftests``: build Linux's x86 selftests into the cache, show them, run them in a guest.

    pyemu-guest selftests build [--cache DIR] [--force] [--debs DIR] [--quiet]
    pyemu-guest selftests path [--cache DIR] [--json]
    pyemu-guest selftests run [--cache DIR] [--emulator pyemu|qemu] [--accel tcg|kvm] [--timeout S]
                              [--test NAME]... [--echo]

``run`` boots the Debian guest once with the suite's initramfs and prints a line per test; it exits 0
when the suite ran to its end (whatever the tests said), 1 when it could not run or did not finish, 2 when
the guest assets or the selftests are missing. A module of its own so ``pyemu-guest``'s parser only
registers it (:func:`add_parser`) and hands over (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pyemu.guest.assets import find_assets
from pyemu.guest.selftest_suite import DEFAULT_TEST_TIMEOUT, build_selftest_initramfs, run_suite
from pyemu.guest.selftests import SelftestSet, build_selftests, find_selftests, selftest_dir

EXIT_ERROR = 1
EXIT_MISSING = 2


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``selftests`` and its actions on ``pyemu-guest``'s subcommand list."""
    parser = commands.add_parser("selftests", help="Linux's x86 selftests: build them (once), run them in the guest")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="download linux-source-6.1 and compile the tests (64-bit, static)")
    build.add_argument("--cache", metavar="DIR", help="cache directory (as for fetch)")
    build.add_argument("--force", action="store_true", help="rebuild even if the tests are built")
    build.add_argument("--debs", metavar="DIR", help="use linux-source-6.1_*.deb from DIR before downloading")
    build.add_argument("--quiet", "-q", action="store_true", help="print only the result")
    path = actions.add_parser("path", help="print where the built tests are, and which did not build")
    path.add_argument("--cache", metavar="DIR", help="cache directory (as for fetch)")
    path.add_argument("--json", action="store_true", help="print a JSON object instead of lines")
    run = actions.add_parser("run", help="boot the guest once and run the tests in it")
    run.add_argument("--cache", metavar="DIR", help="cache directory (as for fetch)")
    run.add_argument("--emulator", choices=("pyemu", "qemu"), default="pyemu",
                     help="pyemu, or qemu-system-x86_64 -M microvm for the reference (default: pyemu)")
    run.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="accelerator (default: tcg)")
    run.add_argument("--timeout", type=int, default=DEFAULT_TEST_TIMEOUT, metavar="SECONDS",
                     help=f"limit per test inside the guest (default: {DEFAULT_TEST_TIMEOUT})")
    run.add_argument("--test", action="append", metavar="NAME", help="run only this test (repeatable)")
    run.add_argument("--echo", action="store_true", help="copy the guest console to stderr as it runs")


def _describe(selftests: SelftestSet) -> dict[str, object]:
    return {
        "directory": str(selftests.directory),
        "source": f"{selftests.manifest.get('source_package', '')} {selftests.source_version}",
        "built": {name: str(path) for name, path in selftests.built.items()},
        "not_built": selftests.not_built,
    }


def _print(selftests: SelftestSet, as_json: bool) -> None:
    description = _describe(selftests)
    if as_json:
        print(json.dumps(description, indent=2))
        return
    print(f"directory   {description['directory']}")
    print(f"source      {description['source']}")
    for name, path in selftests.built.items():
        print(f"built       {name:<24} {path}")
    for name, reason in selftests.not_built.items():
        print(f"not built   {name:<24} {reason}")


def main(args: argparse.Namespace) -> int:
    """Run one ``selftests`` action; PyemuError propagates to ``pyemu-guest``'s one-line error report."""
    if args.action == "build":
        report = (lambda _m: None) if args.quiet else (lambda m: print(f"pyemu-guest: {m}", file=sys.stderr))
        selftests, built = build_selftests(args.cache, force=args.force, debs_dir=args.debs, report=report)
        if not args.quiet:
            print(f"pyemu-guest: x86 selftests {'built' if built else 'already present'}", file=sys.stderr)
        _print(selftests, False)
        return 0
    found = find_selftests(args.cache)
    if found is None:
        print(f"pyemu-guest: no built x86 selftests in {selftest_dir(args.cache)}: "
              "run 'pyemu-guest selftests build'", file=sys.stderr)
        return EXIT_MISSING
    selftests = found
    if args.action == "path":
        _print(selftests, args.json)
        return 0
    assets = find_assets(args.cache)
    if assets is None:
        print("pyemu-guest: no guest assets: run 'pyemu-guest fetch'", file=sys.stderr)
        return EXIT_MISSING
    with tempfile.TemporaryDirectory(prefix="pyemu-selftests.") as scratch:
        initrd = Path(scratch) / "initramfs.cpio.gz"
        tests = build_selftest_initramfs(assets, selftests, initrd, tests=args.test, timeout=args.timeout)
        run = run_suite(args.emulator, args.accel, assets.kernel, initrd, test_timeout=args.timeout, echo=args.echo)
    for name in tests:
        status, rc, seconds = run.results.get(name, ("MISSING", -1, 0.0))
        print(f"{name:<26} {status:<8} rc={rc:<4} {seconds:8.2f} s")
    print(f"# {args.emulator} -accel {args.accel}: {'completed' if run.completed else 'DID NOT FINISH'} "
          f"in {run.seconds:.0f} s")
    return 0 if run.completed else EXIT_ERROR
