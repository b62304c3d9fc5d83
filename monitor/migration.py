"""QMP ``migrate``, ``migrate-incoming`` and ``query-migrate`` over the VM's
:class:`~pyemu.migration.job.MigrationManager` (held by the control API).

QEMU's wording where it has one: a blocker is reported when ``migrate`` is issued (the command fails, the
VM is untouched); a transport or device problem during the save shows in ``query-migrate`` as ``failed``
with ``error-desc``. The ``blk``/``inc`` (block migration) flags are refused: disks are shared.
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.migration.errors import MigrationError
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


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "migrate": _migrate,
    "migrate-incoming": _migrate_incoming,
    "query-migrate": _query_migrate,
}
