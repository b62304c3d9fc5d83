"""``-object secret`` and ``-object throttle-group``: validated, kept, ready for the code that uses them.

libvirt passes every password and key as ``-object secret,id=...,data=|file=...`` and puts disk limits in
``-object throttle-group``. The throttle groups feed :mod:`pyemu.block.throttle` (NBD/TLS will take the
secrets), but a VM must start from such a command line, and a mistake in them must
fail at start-up with QEMU's message, not later. (``iothread`` and ``rng-random`` are validated by the
board, which creates them.)
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, Union

from pyemu.errors import ConfigError

OPTION = "-object"
_THROTTLE_KINDS = tuple(f"{unit}-{kind}" for unit in ("bps", "iops") for kind in ("total", "read", "write"))
#: Every throttle-group limit, by QEMU's ``limits.`` name (``x-`` + name is the legacy spelling).
THROTTLE_LIMITS = tuple(name for kind in _THROTTLE_KINDS
                        for name in (kind, f"{kind}-max", f"{kind}-max-length")) + ("iops-size",)


@dataclass(frozen=True)
class Secret:
    """``-object secret,id=ID,data=...|file=...[,format=raw|base64]``: the secret's bytes."""

    id: str
    data: bytes

    def __repr__(self) -> str:  # never print a secret
        return f"Secret(id={self.id!r}, {len(self.data)} bytes)"


@dataclass(frozen=True)
class ThrottleGroup:
    """``-object throttle-group,id=ID,x-iops-total=N,...``: limits by QEMU's ``limits.`` names."""

    id: str
    limits: tuple[tuple[str, int], ...] = ()

    def limit(self, name: str) -> int:
        return dict(self.limits).get(name, 0)


BackendObject = Union[Secret, ThrottleGroup]


def parse_secret(ident: str, props: tuple[tuple[str, str], ...]) -> Secret:
    values = dict(props)
    unknown = [key for key in values if key not in ("data", "file", "format", "keyid", "iv", "loaded")]
    if unknown:
        raise ConfigError(f"{OPTION} secret,id={ident}: Property 'secret.{unknown[0]}' not found", option=OPTION)
    if "keyid" in values or "iv" in values:
        raise ConfigError(f"{OPTION} secret,id={ident}: encrypted secrets (keyid=, iv=) are not supported by "
                          "pyemu", option=OPTION)
    data, path = values.get("data"), values.get("file")
    if data is not None and path is not None:
        raise ConfigError(f"{OPTION} secret,id={ident}: 'file' and 'data' are mutually exclusive", option=OPTION)
    if data is None and path is None:
        raise ConfigError(f"{OPTION} secret,id={ident}: Either 'file' or 'data' must be provided", option=OPTION)
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise ConfigError(f"{OPTION} secret,id={ident}: Unable to read {path}: "
                              f"{os.strerror(exc.errno or 0)}", option=OPTION) from exc
    else:
        assert data is not None
        raw = data.encode()
    fmt = values.get("format", "raw")
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{OPTION} secret,id={ident}: the secret is not valid base64", option=OPTION) from None
    elif fmt != "raw":
        raise ConfigError(f"{OPTION} secret,id={ident}: Parameter 'format' does not accept value '{fmt}'",
                          option=OPTION)
    return Secret(ident, raw)


INT64_MAX = (1 << 63) - 1
IOTHREAD_PROPERTIES = ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch")


@dataclass(frozen=True)
class IoThreadOptions:
    """``-object iothread,id=ID[,poll-max-ns=N][,poll-grow=N][,poll-shrink=N][,aio-max-batch=N]``
    (:class:`pyemu.system.iothread.IoThread`; ``poll_max_ns`` None: pyemu's default)."""

    id: str
    poll_max_ns: int | None = None
    poll_grow: int = 0
    poll_shrink: int = 0
    aio_max_batch: int = 0


def parse_iothread(ident: str, props: Sequence[tuple[str, str]]) -> IoThreadOptions:
    """QEMU 7.2's checks and messages: unknown properties, int64 syntax, negative values."""
    values: dict[str, int] = {}
    for key, text in props:
        if key not in IOTHREAD_PROPERTIES:
            raise ConfigError(f"{OPTION} iothread: Property 'iothread.{key}' not found", option=OPTION)
        try:
            value = int(text, 0)
        except ValueError:
            value = None
        if value is None or not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ConfigError(f"{OPTION} iothread,id={ident},{key}={text}: Parameter '{key}' expects an int64 value",
                              option=OPTION)
        if value < 0:
            raise ConfigError(f"{key} value must be in range [0, {INT64_MAX}]", option=OPTION)
        values[key] = value
    return IoThreadOptions(ident, values.get("poll-max-ns"), values.get("poll-grow", 0),
                           values.get("poll-shrink", 0), values.get("aio-max-batch", 0))


def parse_throttle_group(ident: str, props: tuple[tuple[str, str], ...]) -> ThrottleGroup:
    where = f"{OPTION} throttle-group,id={ident}"
    limits: dict[str, int] = {}
    for key, text in props:
        name = key[2:] if key.startswith("x-") else key[7:] if key.startswith("limits.") else ""
        if name not in THROTTLE_LIMITS:
            raise ConfigError(f"{where}: Invalid parameter '{key}'", option=OPTION)
        try:
            value = int(text, 10)
        except ValueError:
            raise ConfigError(f"{where}: Parameter '{key}' expects an integer", option=OPTION) from None
        if value < 0:
            raise ConfigError(f"{where}: Property values cannot be negative", option=OPTION)
        limits[name] = value
    _check_limits(where, limits)
    return ThrottleGroup(ident, tuple(sorted(limits.items())))


#: QEMU's THROTTLE_VALUE_MAX: the largest limit (and ``max * max-length``) QEMU accepts.
THROTTLE_VALUE_MAX = 1_000_000_000_000_000


def throttle_limits_error(limits: dict[str, int] | Mapping[str, int]) -> str | None:
    """QEMU 7.2's ``throttle_is_valid`` rules, in its order: the message of the first broken one, or None.
    Shared by ``-object throttle-group``, ``-drive throttling.*`` and QMP ``block_set_io_throttle``."""
    get = limits.get
    if any(get(f"{unit}-total") and (get(f"{unit}-read") or get(f"{unit}-write")) for unit in ("bps", "iops")):
        return "bps/iops/max total values and read/write values cannot be used at the same time"
    if get("iops-size") and not any(get(f"iops-{kind}") for kind in ("total", "read", "write")):
        return "iops size requires an iops value to be set"
    for kind in _THROTTLE_KINDS:
        base, peak, length = get(kind, 0), get(f"{kind}-max", 0), get(f"{kind}-max-length", 1)
        if base > THROTTLE_VALUE_MAX or peak > THROTTLE_VALUE_MAX:
            return f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
        if not length:
            return "the burst length cannot be 0"
        if length > 1 and not peak:
            return "burst length set without burst rate"
        if peak and length > THROTTLE_VALUE_MAX // peak:
            return "burst length too high for this burst rate"
        if peak and not base:
            return "bps_max/iops_max require corresponding bps/iops values"
        if peak and peak < base:
            return "bps_max/iops_max cannot be lower than bps/iops"
    return None


def _check_limits(where: str, limits: dict[str, int]) -> None:
    message = throttle_limits_error(limits)
    if message is not None:
        raise ConfigError(f"{where}: {message}", option=OPTION)


class ObjectLike(Protocol):
    """The shape of :class:`~pyemu.system.config.ObjectOptions` (config imports this module)."""

    @property
    def type(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def props(self) -> tuple[tuple[str, str], ...]: ...


PARSERS: dict[str, Callable[[str, tuple[tuple[str, str], ...]], BackendObject]] = {"secret": parse_secret, "throttle-group": parse_throttle_group}


def parse_objects(entries: Sequence[ObjectLike]) -> dict[str, BackendObject]:
    """The secrets and throttle groups among ``-object`` entries, by id (other types are the board's)."""
    found: dict[str, BackendObject] = {}
    for entry in entries:
        parser = PARSERS.get(entry.type)
        if parser is not None:
            found[entry.id] = parser(entry.id, entry.props)
    return found


