"""``-o`` option lists (``cluster_size=4k,lazy_refcounts=on``): parsing, typing, ``-o help`` and the
"Formatting ..." line.

The option names, their value syntax and the order qemu-img prints them in are part of its interface:
scripts pass the same ``-o`` strings to both tools and some parse the "Formatting 'x', fmt=qcow2 ..." line.
Values are checked for their *type* here (a size, on/off, a number) before anything is created, as qemu-img
does; whether a value makes sense (a cluster size that is no power of two) is the format driver's call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyemu.img.errors import ImgError
from pyemu.img.sizes import SizeRangeError, SizeSyntaxError, parse_size

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


class OptType(enum.Enum):
    STRING = "str"
    SIZE = "size"
    BOOL = "bool (on/off)"
    NUMBER = "num"


@dataclass(frozen=True)
class OptDesc:
    name: str
    type: OptType
    help: str


_SIZE = OptDesc("size", OptType.SIZE, "Virtual disk size")
_BACKING_FILE = OptDesc("backing_file", OptType.STRING, "File name of the backing image")
_BACKING_FMT = OptDesc("backing_fmt", OptType.STRING, "Format of the backing image")
_COMPAT = OptDesc("compat", OptType.STRING, "Compatibility level: 0.10 (v2) or 1.1 (v3)")
_LAZY = OptDesc("lazy_refcounts", OptType.BOOL, "Defer refcount updates (needs compat 1.1)")
_REFCOUNT_BITS = OptDesc("refcount_bits", OptType.NUMBER, "Bits per reference count entry (1 to 64)")

QCOW2_CREATE = (
    _BACKING_FILE,
    _BACKING_FMT,
    OptDesc("cluster_size", OptType.SIZE, "Cluster size in bytes (512 to 2M, a power of two)"),
    _COMPAT,
    OptDesc("compression_type", OptType.STRING, "Compression method for compressed clusters (zlib)"),
    OptDesc("extended_l2", OptType.BOOL, "Use extended L2 entries (32 subclusters per cluster)"),
    _LAZY,
    OptDesc("preallocation", OptType.STRING, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    _REFCOUNT_BITS,
    _SIZE,
)
RAW_CREATE = (
    OptDesc("preallocation", OptType.STRING, "Preallocation mode (allowed values: off, falloc, full)"),
    _SIZE,
)
QCOW2_AMEND = (_BACKING_FILE, _BACKING_FMT, _COMPAT, _LAZY, _REFCOUNT_BITS, _SIZE)

CREATE_OPTIONS = {"qcow2": QCOW2_CREATE, "raw": RAW_CREATE}
AMEND_OPTIONS = {"qcow2": QCOW2_AMEND}

# The order (and defaults) of the "Formatting ..." line, as qemu-img 7.2 prints it.
_FORMAT_LINE = {
    "qcow2": (("cluster_size", "65536"), ("extended_l2", "off"), ("preallocation", None),
              ("compression_type", "zlib"), ("size", None), ("compat", None), ("backing_file", None),
              ("backing_fmt", None), ("lazy_refcounts", "off"), ("refcount_bits", "16")),
    "raw": (("size", None), ("preallocation", None)),
}


def split_options(text: str) -> list[tuple[str, str | None]]:
    """``a=1,b=x,,y,c`` -> [("a", "1"), ("b", "x,y"), ("c", None)] (``,,`` is a literal comma)."""
    items: list[tuple[str, str | None]] = []
    pos = 0
    n = len(text)
    while pos < n:
        key_end = pos
        while key_end < n and text[key_end] not in "=,":
            key_end += 1
        key = text[pos:key_end]
        if key_end < n and text[key_end] == "=":
            chars: list[str] = []
            i = key_end + 1
            while i < n:
                if text[i] == ",":
                    if i + 1 < n and text[i + 1] == ",":
                        chars.append(",")
                        i += 2
                        continue
                    break
                chars.append(text[i])
                i += 1
            items.append((key, "".join(chars)))
            pos = i + 1
        else:
            items.append((key, None))
            pos = key_end + 1
    return items


def wants_help(option_strings: list[str]) -> bool:
    """True when any ``-o`` asks for the option list (``help`` or ``?``)."""
    return any(key in ("help", "?") and value is None for text in option_strings for key, value in
               split_options(text))


def parse_bool(name: str, value: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImgError(f"Parameter '{name}' expects 'on' or 'off'")


class OptionSet:
    """The typed values of merged ``-o`` strings, plus their text as typed (for the Formatting line)."""

    def __init__(self, descs: tuple[OptDesc, ...], option_strings: list[str]) -> None:
        self.descs = {d.name: d for d in descs}
        self.text: dict[str, str] = {}
        self.values: dict[str, object] = {}
        for chunk in option_strings:
            for key, value in split_options(chunk):
                self.set(key, "on" if value is None else value)

    def set(self, key: str, value: str) -> None:
        desc = self.descs.get(key)
        if desc is None:
            raise ImgError(f"Invalid parameter '{key}'")
        self.text[key] = value
        self.values[key] = self._typed(desc, value)

    def setdefault(self, key: str, value: str) -> None:
        if key not in self.values:
            self.set(key, value)

    def _typed(self, desc: OptDesc, value: str) -> object:
        if desc.type is OptType.BOOL:
            return parse_bool(desc.name, value)
        if desc.type is OptType.SIZE:
            try:
                return parse_size(value, warn=False)
            except (SizeSyntaxError, SizeRangeError):
                raise ImgError(f"Parameter '{desc.name}' expects a non-negative number below 2^64 (optional "
                               "suffix k, M, G, T, P or E)") from None
        if desc.type is OptType.NUMBER:
            try:
                return int(value, 0)
            except ValueError:
                raise ImgError(f"Parameter '{desc.name}' expects a number") from None
        return value

    def get(self, key: str, default: object = None) -> object:
        return self.values.get(key, default)

    def get_int(self, key: str, default: int) -> int:
        value = self.values.get(key, default)
        assert isinstance(value, int)
        return value

    def get_str(self, key: str, default: str) -> str:
        return str(self.values.get(key, default))

    def __contains__(self, key: str) -> bool:
        return key in self.values


def help_text(fmt: str, descs: tuple[OptDesc, ...], *, title: str | None = None) -> str:
    """The ``-o help`` listing: ``  name=<type>  - description`` per option, sorted by name."""
    lines = [title if title is not None else f"Supported {fmt} options:"]
    for desc in sorted(descs, key=lambda d: d.name):
        left = f"{desc.name}=<{desc.type.value}>"
        lines.append(f"  {left:<22} - {desc.help}")
    return "\n".join(lines)


def formatting_line(filename: str, fmt: str, options: OptionSet, size: int) -> str:
    """``Formatting 'x', fmt=qcow2 cluster_size=65536 ... size=N ...`` in qemu-img's field order."""
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    for key, default in _FORMAT_LINE.get(fmt, (("size", None),)):
        if key == "size":
            parts.append(f"size={size}")
            continue
        if key in options.text:
            desc = options.descs[key]
            text = options.text[key]
            if desc.type is OptType.SIZE:
                text = str(options.values[key])
            parts.append(f"{key}={text.replace(',', ',,')}")
        elif default is not None:
            parts.append(f"{key}={default}")
    return " ".join(parts)
