"""The ``pyemu-guest`` command: fetch the Debian guest assets, or print where they are.

    pyemu-guest fetch [--cache DIR] [--force] [--debs DIR]
    pyemu-guest path [--cache DIR] [--json]
    pyemu-guest selftests build|path|run ...   (Linux's x86 selftests: see pyemu.guest.selftests_cli)

Errors print one line (``pyemu-guest: error: ...``) and exit with status 1; ``path`` exits with 2 when
the assets have not been fetched, so scripts can test for them.
"""

from __future__ import annotations

import argparse
import json
import sys

from pyemu.errors import PyemuError
from pyemu.guest.assets import GuestAssets, asset_dir, find_assets
from pyemu.guest.fetch import run_fetch
from pyemu.guest import selftests_cli

EXIT_ERROR = 1
EXIT_NOT_FETCHED = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyemu-guest",
        description="Guest assets for pyemu: Debian's Linux 6.1 kernel and a busybox initramfs.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch = commands.add_parser("fetch", help="download the Debian packages and build the assets (once)")
    fetch.add_argument("--cache", metavar="DIR", help="cache directory (default: $PYEMU_CACHE, "
                       "$XDG_CACHE_HOME/pyemu or ~/.cache/pyemu)")
    fetch.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    fetch.add_argument("--debs", metavar="DIR", help="use .deb files from DIR before downloading")
    fetch.add_argument("--quiet", "-q", action="store_true", help="print only the asset paths")
    path = commands.add_parser("path", help="print the paths of the fetched assets")
    path.add_argument("--cache", metavar="DIR", help="cache directory (as for fetch)")
    path.add_argument("--json", action="store_true", help="print a JSON object instead of lines")
    selftests_cli.add_parser(commands)
    return parser


def _describe(assets: GuestAssets) -> dict[str, str]:
    return {
        "kernel": str(assets.kernel),
        "vmlinux": str(assets.vmlinux),
        "initrd": str(assets.initrd),
        "config": str(assets.config),
        "modules": str(assets.modules_dir),
        "manifest": str(assets.directory / "manifest.json"),
    }


def _print_paths(assets: GuestAssets, as_json: bool) -> None:
    paths = _describe(assets)
    if as_json:
        print(json.dumps(paths, indent=2))
        return
    for name, value in paths.items():
        print(f"{name:<11} {value}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "selftests":
            return selftests_cli.main(args)
        if args.command == "fetch":
            report = (lambda _m: None) if args.quiet else (lambda m: print(f"pyemu-guest: {m}", file=sys.stderr))
            result = run_fetch(args.cache, force=args.force, debs_dir=args.debs, report=report)
            if not args.quiet:
                action = ("built" if result.downloaded
                          else "present, initramfs rebuilt" if result.refreshed else "already present")
                print(f"pyemu-guest: assets {action} in {result.seconds:.1f} s", file=sys.stderr)
            _print_paths(result.assets, False)
            return 0
        assets = find_assets(args.cache)
        if assets is None:
            print(
                f"pyemu-guest: no complete guest assets in {asset_dir(args.cache)}: run 'pyemu-guest fetch'",
                file=sys.stderr,
            )
            return EXIT_NOT_FETCHED
        _print_paths(assets, args.json)
        return 0
    except PyemuError as exc:
        print(f"pyemu-guest: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pyemu-guest: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
