"""``pyemu-img map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] [-U] filename``.

Shows where every guest range comes from, walking the backing chain: JSON lists merged runs
``{"start", "length", "depth", "present", "zero", "data", "offset"?}`` exactly as qemu-img 7.2 prints them
(7.2 has no "compressed" key: compressed data simply has no "offset"); the human form lists only the ranges
with stored data, per file, and refuses images whose data is not stored plainly (compressed clusters), as
qemu-img does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pyemu.block.driver import BlockDriver
from pyemu.img.chain import Extent, extents
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import check_format, opened
from pyemu.img.info import output_format
from pyemu.img.sizes import SizeRangeError, SizeSyntaxError, SUFFIX_HINT, parse_size

SPEC = OptionSpec("f:hU", ("output=", "start-offset=", "max-length=", "force-share"))


@dataclass
class Run:
    """A merged run of extents with the same properties (and contiguous host offsets)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str

    def mergeable(self, ext: Extent) -> bool:
        if (ext.depth, ext.present, ext.zero, ext.data) != (self.depth, self.present, self.zero, self.data):
            return False
        if (self.offset is None) != (ext.offset is None):
            return False
        return self.offset is None or self.offset + self.length == ext.offset

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"start": self.start, "length": self.length, "depth": self.depth,
                                  "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def _json_line(run: Run) -> str:
    # qemu-img prints these by hand, in this field order, with a space after the opening brace.
    text = (f'{{ "start": {run.start}, "length": {run.length}, "depth": {run.depth}, '
            f'"present": {_b(run.present)}, "zero": {_b(run.zero)}, "data": {_b(run.data)}')
    if run.offset is not None:
        text += f', "offset": {run.offset}'
    return text + "}"


def _b(value: bool) -> str:
    return "true" if value else "false"


def _hex(value: int) -> str:
    """C's ``%#x``: no 0x prefix for zero."""
    return "0" if value == 0 else f"{value:#x}"


def merged_runs(node: BlockDriver, start: int, end: int) -> list[Run]:
    runs: list[Run] = []
    for ext in extents(node, start, end):
        if runs and runs[-1].mergeable(ext):
            runs[-1].length += ext.length
            continue
        runs.append(Run(ext.start, ext.length, ext.depth, ext.present, ext.zero, ext.data, ext.offset,
                        ext.node.filename))
    return runs


def _offset_arg(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except (SizeSyntaxError, SizeRangeError):
        raise ImgError(f"Invalid {what} specified. {SUFFIX_HINT}") from None


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    ofmt = output_format(p.last("--output"))
    fmt = check_format(p.last("-f"))
    start = _offset_arg(p.last("--start-offset"), "start offset") or 0
    max_length = _offset_arg(p.last("--max-length"), "max length")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    filename = p.args[0]
    with opened(filename, fmt=fmt, force_share=p.has("-U", "--force-share")) as node:
        size = node.size()
        end = size if max_length is None else min(size, start + max_length)
        runs = merged_runs(node, start, end) if start < end else []
    if ofmt == "json":
        if not runs:
            runs = [Run(start, 0, 0, False, False, False, None, filename)]
        sys.stdout.write("[" + ",\n".join(_json_line(r) for r in runs) + "]\n")
        return 0
    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for r in runs:
        if r.data and r.offset is None:
            print("\n".join(out))
            out = []
            raise ImgError("File contains external, encrypted or compressed clusters.")
        if r.data and not r.zero:
            out.append(f"{_hex(r.start):<16}{_hex(r.length):<16}{_hex(r.offset or 0):<16}{r.filename}")
    print("\n".join(out))
    return 0

