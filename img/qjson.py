"""JSON output exactly as qemu-img prints it: its key order, indentation and string escapes.

qemu-img builds its JSON from QEMU dictionaries, whose iteration order is the order of their hash buckets
(a 512-bucket table hashed with the TDB string hash; within one bucket the key inserted last comes first),
not the order the keys were added. Tools and tests that compare our output with qemu-img's byte for byte
(or humans diffing them) need that same order, so :func:`dumps` sorts every object's keys the same way.
Strings escape ``"``, ``\\``, the control characters and everything outside printable ASCII as ``\\uXXXX``
(upper-case hex, surrogate pairs above U+FFFF), indentation is four spaces and ``key: value`` pairs use
``": "``.
"""

from __future__ import annotations

from typing import Any

_BUCKETS = 512
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def bucket(key: str) -> int:
    """The hash bucket QEMU's dictionary puts ``key`` in (TDB hash of the UTF-8 bytes, modulo 512)."""
    data = key.encode("utf-8")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _BUCKETS


def ordered_items(obj: dict[str, Any]) -> list[tuple[str, Any]]:
    """``obj``'s items in QEMU's iteration order (dict insertion order stands for QEMU's insertion order)."""
    items = list(obj.items())
    order = sorted(range(len(items)), key=lambda i: (bucket(items[i][0]), -i))
    return [items[i] for i in order]


def quote(text: str) -> str:
    """A JSON string literal as QEMU writes it."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= code <= 0x7E:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 | (code >> 10):04X}\\u{0xDC00 | (code & 0x3FF):04X}")
        else:
            out.append(f"\\u{code:04X}")
    out.append('"')
    return "".join(out)


def _scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _pretty(value: Any, level: int, out: list[str]) -> None:
    pad = "    " * (level + 1)
    if isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        out.append("{\n")
        items = ordered_items(value)
        for i, (key, item) in enumerate(items):
            out.append(f"{pad}{quote(key)}: ")
            _pretty(item, level + 1, out)
            out.append(",\n" if i + 1 < len(items) else "\n")
        out.append("    " * level + "}")
    elif isinstance(value, (list, tuple)):
        if not value:  # QEMU's formatter still breaks the line: "[", newline, indented "]"
            out.append("[\n" + "    " * level + "]")
            return
        out.append("[\n")
        for i, item in enumerate(value):
            out.append(pad)
            _pretty(item, level + 1, out)
            out.append(",\n" if i + 1 < len(value) else "\n")
        out.append("    " * level + "]")
    else:
        out.append(_scalar(value))


def dumps(value: Any) -> str:
    """Pretty JSON for ``value`` (dicts, lists, str, int, bool, None) as qemu-img prints it, no newline."""
    out: list[str] = []
    _pretty(value, 0, out)
    return "".join(out)


def dumps_compact(value: Any) -> str:
    """One-line JSON in QEMU's key order with ``", "`` separators (the style of ``map --output=json``)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{quote(k)}: {dumps_compact(v)}" for k, v in ordered_items(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps_compact(v) for v in value) + "]"
    return _scalar(value)
