"""QEMU's "keyval" command-line syntax (``util/keyval.c``): dotted keys into a nested dictionary.

``-blockdev driver=qcow2,node-name=disk,file.driver=file,file.filename=a.qcow2`` is the same definition as
the JSON ``{"driver": "qcow2", "node-name": "disk", "file": {"driver": "file", "filename": "a.qcow2"}}``,
except that every value is a string: the option schema converts them later (``on``/``off`` to booleans,
numbers, sizes), which is why :func:`parse_keyval` does no typing at all. The rules kept from QEMU: ``,,``
is a literal comma inside a value, a later key overrides an earlier one, a key used both as a value and as
a prefix of other keys (``file=f0,file.driver=file``) is refused, and key fragments are QAPI names.
"""

from __future__ import annotations

import re
from typing import Any

from pyemu.errors import ConfigError

_FRAGMENT_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
MAX_KEY_DEPTH = 16
"""Deeper nesting than any real definition (a qcow2 over a qcow2 over ... inline) is refused."""


class KeyvalError(ConfigError):
    """The option string does not follow the keyval syntax."""


def split_pairs(text: str, *, option: str) -> list[tuple[str, str]]:
    """``k=v,k2=v2`` into pairs, with ``,,`` as an escaped comma in values."""
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        eq = text.find("=", pos)
        comma = text.find(",", pos)
        if eq < 0 or (0 <= comma < eq):
            key = text[pos:comma if comma >= 0 else len(text)]
            raise KeyvalError(f"{option}: Expected '=' after parameter '{key}'", option=option)
        key = text[pos:eq]
        value: list[str] = []
        pos = eq + 1
        while pos < len(text):
            if text[pos] == ",":
                if text.startswith(",,", pos):
                    value.append(",")
                    pos += 2
                    continue
                pos += 1
                break
            value.append(text[pos])
            pos += 1
        pairs.append((key, "".join(value)))
    return pairs


def parse_keyval(text: str, *, option: str = "-blockdev") -> dict[str, Any]:
    """The nested dictionary of string values that ``text`` describes."""
    root: dict[str, Any] = {}
    for key, value in split_pairs(text, option=option):
        fragments = key.split(".")
        if len(fragments) > MAX_KEY_DEPTH:
            raise KeyvalError(f"{option}: Parameter '{key}' is nested too deeply", option=option)
        for fragment in fragments:
            if not _FRAGMENT_RE.match(fragment):
                raise KeyvalError(f"{option}: Invalid parameter '{key}'", option=option)
        node = root
        for depth, fragment in enumerate(fragments[:-1]):
            child = node.setdefault(fragment, {})
            if not isinstance(child, dict):
                prefix = ".".join(fragments[:depth + 1])
                raise KeyvalError(f"{option}: Parameters '{prefix}.*' used inconsistently", option=option)
            node = child
        last = fragments[-1]
        if isinstance(node.get(last), dict):
            raise KeyvalError(f"{option}: Parameter '{key}' used inconsistently", option=option)
        node[last] = value
    return root
