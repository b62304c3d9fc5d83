"""qemu-img's command-line syntax: GNU getopt, short options bundled or with attached values (``-fqcow2``),
long options with ``=value`` or a separate value, options and file names in any order, ``--`` ending the
options.

Each command names its options once in :class:`OptionSpec`; :func:`parse` returns them in command-line
order (later ones override earlier ones, and ``-o`` accumulates, as in qemu-img) plus the positional
arguments, or raises :class:`~pyemu.img.errors.UsageError` with the message GNU getopt would print.
"""

from __future__ import annotations

import getopt
from dataclasses import dataclass

from pyemu.img.errors import UsageError


@dataclass(frozen=True)
class OptionSpec:
    """``short``: getopt letters (``"f:hq"``); ``long``: names, ending in ``=`` when they take a value."""

    short: str = ""
    long: tuple[str, ...] = ()


@dataclass(frozen=True)
class Parsed:
    options: list[tuple[str, str]]
    args: list[str]

    def has(self, *names: str) -> bool:
        return any(name in names for name, _ in self.options)

    def last(self, *names: str, default: str | None = None) -> str | None:
        """The value of the last occurrence of any of ``names``."""
        value = default
        for name, arg in self.options:
            if name in names:
                value = arg
        return value

    def value(self, *names: str, default: str) -> str:
        """Like :meth:`last`, with a default (so never None)."""
        value = self.last(*names)
        return default if value is None else value

    def all(self, *names: str) -> list[str]:
        return [arg for name, arg in self.options if name in names]


def parse(argv: list[str], spec: OptionSpec) -> Parsed:
    """Split ``argv`` (the words after the command name) into options and positional arguments."""
    short = spec.short if "h" in spec.short else spec.short + "h"
    long = list(spec.long) if "help" in spec.long else [*spec.long, "help"]
    try:
        options, args = getopt.gnu_getopt(argv, short, long)
    except getopt.GetoptError as exc:
        raise UsageError(_message(exc, argv)) from None
    return Parsed(options, args)


def _message(exc: getopt.GetoptError, argv: list[str]) -> str:
    opt = exc.opt
    text = exc.msg
    if len(opt) == 1:
        if "requires argument" in text:
            return f"option requires an argument -- '{opt}'"
        return f"invalid option -- '{opt}'"
    if "requires argument" in text:
        return f"option '--{opt}' requires an argument"
    if "must not have an argument" in text:
        return f"option '--{opt}' doesn't allow an argument"
    if "not a unique prefix" in text:
        return f"option '--{opt}' is ambiguous"
    word = next((a for a in argv if a.startswith(f"--{opt}")), f"--{opt}")
    return f"unrecognized option '{word}'"
