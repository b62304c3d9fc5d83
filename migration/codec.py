"""State dataclasses as checked JSON values, and back: the stream's encoding of device and vCPU state.

Why not pickle: a stream comes from a file or another host, so it is untrusted input, and unpickling runs
whatever the stream names. Here the stream can only name classes of an allow-list (every
:class:`~pyemu.hw.core.state.DeviceState` subclass and :class:`~pyemu.target.x86.cpu_state.X86CpuState`),
and every field is decoded against the type annotation of the class it belongs to: an int must be a JSON
integer (not a bool), bytes a hex string, a tuple a list, an enum one of its values, a nested dataclass an
object with exactly its fields. Anything else is a :class:`~pyemu.migration.errors.StreamCorrupt` naming
the field path. Ranges stay the device's business (``from_state`` validates them before applying).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any

from pyemu.hw.core.state import DeviceState
from pyemu.migration.errors import StreamCorrupt
from pyemu.target.x86.cpu_state import X86CpuState

MAX_DEPTH = 16
"""Nesting the state classes never exceed (X86CpuState -> Segment is 2); deeper input is refused."""


def state_classes() -> dict[str, type]:
    """The classes a stream may name, by qualified name (module + class): every DeviceState subclass
    imported so far (the board imports its devices' modules before it builds them) and X86CpuState."""
    found: dict[str, type] = {qualified_name(X86CpuState): X86CpuState}
    pending: list[type] = [DeviceState]
    while pending:
        cls = pending.pop()
        found[qualified_name(cls)] = cls
        pending.extend(cls.__subclasses__())
    return found


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- encoding ------------------------------------------------------------------------------------------------
def encode(value: Any) -> Any:
    """A dataclass (or any value inside one) as a JSON-able value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (tuple, list)):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return [[encode(k), encode(v)] for k, v in value.items()]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TypeError(f"cannot encode a {type(value).__name__} in VM state")


def dumps(state: Any) -> bytes:
    """One state object as the payload of a section: ``{"class": ..., "fields": ...}`` in UTF-8 JSON."""
    return json.dumps({"class": qualified_name(type(state)), "fields": encode(state)},
                      separators=(",", ":")).encode()


# -- decoding ------------------------------------------------------------------------------------------------
def loads(payload: bytes, where: str, allowed: dict[str, type] | None = None) -> Any:
    """Decode a section payload written by :func:`dumps`. The class must be in ``allowed`` (default:
    :func:`state_classes`); every field is checked against its annotation."""
    try:
        document = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StreamCorrupt(f"not a valid state encoding ({type(exc).__name__}: {str(exc)[:80]})", where) from None
    if not isinstance(document, dict) or set(document) != {"class", "fields"}:
        raise StreamCorrupt("a state must be an object with 'class' and 'fields'", where)
    name = document["class"]
    classes = allowed if allowed is not None else state_classes()
    if not isinstance(name, str) or name not in classes:
        raise StreamCorrupt(f"unknown state class {str(name)[:100]!r}", where)
    return decode(classes[name], document["fields"], where, "", 0)


def decode(hint: Any, value: Any, where: str, path: str, depth: int) -> Any:
    """``value`` (parsed JSON) as an instance of the type ``hint``; StreamCorrupt naming ``path`` else."""
    if depth > MAX_DEPTH:
        raise StreamCorrupt(f"{path or 'state'}: nested too deeply", where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    label = path or "state"
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) != 1:
            raise StreamCorrupt(f"{label}: unsupported field type {hint}", where)
        return decode(options[0], value, where, path, depth)
    if origin is tuple:
        if not isinstance(value, list):
            raise StreamCorrupt(f"{label}: expected a list", where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], item, where, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        if len(value) != len(args):
            raise StreamCorrupt(f"{label}: expected {len(args)} items, got {len(value)}", where)
        return tuple(decode(a, item, where, f"{path}[{i}]", depth + 1) for i, (a, item) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, list):
            raise StreamCorrupt(f"{label}: expected a list of pairs", where)
        result: dict[Any, Any] = {}
        for i, pair in enumerate(value):
            if not isinstance(pair, list) or len(pair) != 2:
                raise StreamCorrupt(f"{label}[{i}]: expected a [key, value] pair", where)
            key = decode(args[0], pair[0], where, f"{path}[{i}].key", depth + 1)
            if key in result:
                raise StreamCorrupt(f"{label}: duplicate key {key!r}", where)
            result[key] = decode(args[1], pair[1], where, f"{path}[{key}]", depth + 1)
        return result
    if hint is bool:
        if not isinstance(value, bool):
            raise StreamCorrupt(f"{label}: expected a boolean", where)
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise StreamCorrupt(f"{label}: expected an integer", where)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise StreamCorrupt(f"{label}: expected a string", where)
        return value
    if hint is bytes:
        if not isinstance(value, str):
            raise StreamCorrupt(f"{label}: expected hex bytes", where)
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise StreamCorrupt(f"{label}: invalid hex bytes", where) from None
    if hint is type(None):
        if value is not None:
            raise StreamCorrupt(f"{label}: expected null", where)
        return None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        for member in hint:
            if member.value == value and type(member.value) is type(value):
                return member
        raise StreamCorrupt(f"{label}: {str(value)[:40]!r} is not a {hint.__name__}", where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, value, where, path, depth)
    raise StreamCorrupt(f"{label}: unsupported field type {hint}", where)


def _decode_dataclass(cls: type, value: Any, where: str, path: str, depth: int) -> Any:
    if not isinstance(value, dict):
        raise StreamCorrupt(f"{path or 'state'}: expected an object ({cls.__name__})", where)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    extra = set(value) - names
    missing = names - set(value)
    if extra or missing:
        detail = (f"unknown fields {sorted(extra)[:5]}" if extra else "") + \
                 (f"missing fields {sorted(missing)[:5]}" if missing else "")
        raise StreamCorrupt(f"{path or 'state'} ({cls.__name__}): {detail}", where)
    hints = typing.get_type_hints(cls)
    kwargs = {f.name: decode(hints[f.name], value[f.name], where, f"{path}.{f.name}" if path else f.name, depth + 1)
              for f in fields}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise StreamCorrupt(f"{path or 'state'} ({cls.__name__}): {exc}", where) from None
