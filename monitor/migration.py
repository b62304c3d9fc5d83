"""QMP ``migrate``, ``migrate-incoming`` and ``query-migrate`` over the VM's
:class:`~pyemu.migration.job.MigrationManager` (held by the control API).

QEMU's wording where it has one: a blocker is reported when ``migrate`` is issued (the command fails, the
VM is untouched); a transport or device problem during the save shows in ``query-migrate`` as ``failed``
with ``error-desc``. The ``blk``/``inc`` (block migration) flags are refused: disks are shared.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from pyemu.migration.errors import MigrationError
from pyemu.migration.params import DEFAULTS
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError


def _migrate(api: ControlApi, args: dict[str, Any]) -> Any:
    if args.get("blk") or args.get("inc"):
        raise QmpError("block migration (blk/inc) is not supported: the destination uses the same images "
                       "(shared storage)")
    if args.get("resume"):
        raise QmpError("migrate resume is for postcopy, which pyemu does not do")
    try:
        api.migration.migrate(args["uri"])
    except MigrationError as error:
        raise QmpError(str(error)) from None
    return {}


def _migrate_incoming(api: ControlApi, args: dict[str, Any]) -> Any:
    try:
        api.migration.incoming(args["uri"], background=True)
    except MigrationError as error:
        raise QmpError(str(error)) from None
    return {}


def _query_migrate(api: ControlApi, args: dict[str, Any]) -> Any:
    return api.migration.query()


def _migrate_cancel(api: ControlApi, args: dict[str, Any]) -> Any:
    api.migration.cancel()
    return {}


def _migrate_set_parameters(api: ControlApi, args: dict[str, Any]) -> Any:
    try:
        api.migration.params.set(args)
    except MigrationError as error:
        raise QmpError(str(error)) from None
    return {}


def _query_migrate_parameters(api: ControlApi, args: dict[str, Any]) -> Any:
    return api.migration.params.query()


def _migrate_set_capabilities(api: ControlApi, args: dict[str, Any]) -> Any:
    if api.migration.active:
        raise QmpError("There's a migration process in progress")
    try:
        api.migration.params.set_capabilities(args["capabilities"])
    except MigrationError as error:
        raise QmpError(str(error)) from None
    return {}


def _query_migrate_capabilities(api: ControlApi, args: dict[str, Any]) -> Any:
    return api.migration.params.query_capabilities()


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "migrate": _migrate,
    "migrate-incoming": _migrate_incoming,
    "query-migrate": _query_migrate,
    "migrate_cancel": _migrate_cancel,
    "migrate-set-parameters": _migrate_set_parameters,
    "query-migrate-parameters": _query_migrate_parameters,
    "migrate-set-capabilities": _migrate_set_capabilities,
    "query-migrate-capabilities": _query_migrate_capabilities,
}


# -- HMP (QEMU 7.2's output) ------------------------------------------------------------------------------
_HMP_SHOWN = ("announce-initial", "announce-max", "announce-rounds", "announce-step", "compress-level",
              "compress-threads", "compress-wait-thread", "decompress-threads", "throttle-trigger-threshold",
              "cpu-throttle-initial", "cpu-throttle-increment", "cpu-throttle-tailslow", "max-cpu-throttle",
              "tls-creds", "tls-hostname", "max-bandwidth", "downtime-limit", "x-checkpoint-delay",
              "block-incremental", "multifd-channels", "multifd-compression", "xbzrle-cache-size",
              "max-postcopy-bandwidth", "tls-authz")
_HMP_UNITS = {"announce-initial": " ms", "announce-max": " ms", "announce-step": " ms",
              "max-bandwidth": " bytes/second", "downtime-limit": " ms", "x-checkpoint-delay": " ms",
              "xbzrle-cache-size": " bytes"}


class _Monitor(Protocol):
    """What the HMP handlers need of pyemu.monitor.hmp.HumanMonitor (not imported: it imports this)."""

    @property
    def api(self) -> ControlApi: ...


_SIZE_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def hmp_migrate_cancel(mon: _Monitor, args: str) -> str:
    api = mon.api
    api.migration.cancel()
    return ""


def hmp_info_migrate_parameters(mon: _Monitor, args: str) -> str:
    api = mon.api
    values = api.migration.params.query()
    lines = []
    for name in _HMP_SHOWN:
        value = values[name]
        text = ("on" if value else "off") if isinstance(value, bool) else (f"'{value}'" if name.startswith("tls-")
                                                                           else str(value))
        lines.append(f"{name}: {text}{_HMP_UNITS.get(name, '')}\n")
    return "".join(lines)


def hmp_migrate_set_parameter(mon: _Monitor, args: str) -> str:
    api = mon.api
    """``migrate_set_parameter NAME VALUE``: sizes take QEMU's suffixes (``max-bandwidth 10M``); a plain
    number is bytes. Errors are HMP's "Error: ..." lines, with QEMU's words."""
    words = args.split()
    if len(words) != 2:
        return "Error: migrate_set_parameter takes a parameter name and a value\n"
    name, raw = words
    default = DEFAULTS.get(name)
    if default is None:
        return f"Error: invalid parameter value: {name}\n"
    value: Any
    if isinstance(default, bool):
        if raw not in ("on", "off", "true", "false"):
            return f"Error: Parameter '{name}' expects 'on' or 'off'\n"
        value = raw in ("on", "true")
    elif isinstance(default, int):
        suffix = raw[-1:].lower() if raw[-1:].isalpha() else ""
        number = raw[:-1] if suffix else raw
        if not number.isdigit() or suffix not in _SIZE_SUFFIX or (suffix and name not in _SIZED):
            return f"Error: Parameter '{name}' expects {'a size' if name in _SIZED else 'an integer'}\n"
        value = int(number) * _SIZE_SUFFIX[suffix]
    else:
        value = raw
    try:
        api.migration.params.set({name: value})
    except MigrationError as error:
        return f"Error: {error}\n"
    return ""


_SIZED = frozenset({"max-bandwidth", "max-postcopy-bandwidth", "xbzrle-cache-size"})

