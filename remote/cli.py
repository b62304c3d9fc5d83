"""``pyemu-remote --qmp PATH COMMAND``: a small command line for a running VM, in the spirit of ch-remote.

It is :class:`~pyemu.api.remote.RemoteVM` with words for methods, so it drives any QMP server (pyemu's or
QEMU's). Exit status says what happened, for scripts:

====  ==========================================================================================
0     done (``events``: the count or event asked for arrived, or the VM closed the connection)
1     the VM refused the command (its QMP error is printed)
2     usage error (unknown command, malformed JSON)
3     the VM cannot be reached, or the connection broke
4     timed out (no reply, or ``events --count/--until`` unsatisfied after ``--timeout``)
====  ==========================================================================================
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Sequence

from pyemu.api.errors import CommandError, RemoteError, VmTimeout
from pyemu.api.remote import RemoteVM

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4

SIMPLE_COMMANDS: dict[str, tuple[Callable[[RemoteVM], None], str]] = {
    "pause": (RemoteVM.pause, "stop every vCPU and the guest's clock (QMP stop)"),
    "resume": (RemoteVM.resume, "run again after pause or -S (QMP cont)"),
    "reset": (RemoteVM.reset, "press the reset button (QMP system_reset)"),
    "powerdown": (RemoteVM.powerdown, "press the ACPI power button (QMP system_powerdown)"),
    "quit": (RemoteVM.quit, "end the VM now (QMP quit)"),
}


class UsageError(Exception):
    """A well-formed command line whose argument is unusable (e.g. ``raw`` with bad JSON)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyemu-remote", description="Control a running pyemu (or QEMU) VM through its QMP socket.",
        epilog="exit status: 0 done, 1 refused by the VM, 2 usage error, 3 VM unreachable, 4 timed out")
    parser.add_argument("--qmp", required=True, metavar="PATH|HOST:PORT",
                        help="the VM's QMP socket (-qmp unix:PATH,server=on,wait=off or tcp:HOST:PORT,...)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for a reply or for events (default 60)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser("status", help="print the run state (running, paused, prelaunch, shutdown...)")
    status.add_argument("--json", action="store_true", help="print query-status's whole reply as JSON")
    for name, (_, text) in SIMPLE_COMMANDS.items():
        commands.add_parser(name, help=text)
    events = commands.add_parser("events", help="print events as JSON lines, as QMP sends them")
    events.add_argument("--count", type=int, metavar="N", help="stop after N events")
    events.add_argument("--until", metavar="EVENT", help="stop after the first EVENT (e.g. SHUTDOWN)")
    raw = commands.add_parser("raw", help="send one QMP command and print the reply as JSON")
    raw.add_argument("json", metavar="JSON", help='e.g. \'{"execute": "query-status"}\'')
    return parser


def _print_json(value: Any) -> None:
    print(json.dumps(value), flush=True)


def _raw_request(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except ValueError as error:
        raise UsageError(f"raw: not valid JSON: {error}") from error
    if not isinstance(message, dict) or not isinstance(message.get("execute"), str):
        raise UsageError('raw: expected a JSON object with "execute", e.g. {"execute": "query-status"}')
    return message


def _follow_events(vm: RemoteVM, count: int | None, until: str | None, timeout: float) -> int:
    """Print events until the condition holds. Without --count/--until: until the VM closes the
    connection or ``timeout`` passes (both fine); with one, a timeout is a failure."""
    conditional = count is not None or until is not None
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise VmTimeout("timed out")
            event = vm.events.get(remaining)
        except VmTimeout:
            if not conditional or vm.qmp.closed:
                return EXIT_OK if not conditional else EXIT_TIMEOUT
            print(f"pyemu-remote: events: timed out after {timeout} s", file=sys.stderr)
            return EXIT_TIMEOUT
        _print_json(event.to_qmp())
        seen += 1
        if (count is not None and seen >= count) or (until is not None and event.name == until):
            return EXIT_OK


def run(args: argparse.Namespace) -> int:
    with RemoteVM(args.qmp, timeout=args.timeout) as vm:
        if args.command == "status":
            status = vm.status()
            _print_json(status) if args.json else print(status.get("status"))
        elif args.command in SIMPLE_COMMANDS:
            SIMPLE_COMMANDS[args.command][0](vm)
        elif args.command == "events":
            return _follow_events(vm, args.count, args.until, args.timeout)
        elif args.command == "raw":
            reply = vm.qmp.request(_raw_request(args.json))
            _print_json(reply)
            return EXIT_REFUSED if "error" in reply else EXIT_OK
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.command == "events" and args.count is not None and args.count < 1:
        parser.error("events --count must be at least 1")
    try:
        return run(args)
    except UsageError as error:
        print(f"pyemu-remote: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as error:
        print(f"pyemu-remote: {args.command}: {error.desc} ({error.error_class})", file=sys.stderr)
        return EXIT_REFUSED
    except VmTimeout as error:
        print(f"pyemu-remote: {args.command}: {error}", file=sys.stderr)
        return EXIT_TIMEOUT
    except RemoteError as error:
        print(f"pyemu-remote: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
