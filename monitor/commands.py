"""The QMP command implementations, one function per entry of :data:`pyemu.monitor.schema.COMMANDS`.

Each function takes the :class:`~pyemu.monitor.control.ControlApi` and the validated arguments and returns
the JSON value of the reply, or a :class:`Reply` when something must happen only after the client has its
answer (``quit``: the process may be gone a moment later). ``qmp_capabilities`` is not here: it changes
the session, so :mod:`pyemu.monitor.qmp` serves it.
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.monitor import schema
from pyemu.monitor.bitmap_commands import HANDLERS as BITMAP_HANDLERS
from pyemu.monitor.throttle_commands import HANDLERS as THROTTLE_HANDLERS
from pyemu.monitor.migration import HANDLERS as MIGRATION_HANDLERS
from pyemu.monitor.nbd_commands import HANDLERS as NBD_HANDLERS
from pyemu.monitor.job_commands import HANDLERS as JOB_HANDLERS
from pyemu.monitor.mirror_commands import HANDLERS as MIRROR_HANDLERS
from pyemu.monitor.block_info import block_info
from pyemu.monitor.blockdev import HANDLERS as BLOCKDEV_HANDLERS
from pyemu.monitor.qom import HANDLERS as QOM_HANDLERS
from pyemu.monitor.resize_commands import HANDLERS as RESIZE_HANDLERS
from pyemu.monitor.snapshot_commands import HANDLERS as SNAPSHOT_HANDLERS
from pyemu.monitor.transaction import HANDLERS as TRANSACTION_HANDLERS
from pyemu.monitor.vm_snapshot_commands import HANDLERS as VM_SNAPSHOT_HANDLERS
from pyemu.monitor.control import ControlApi, ControlError
from pyemu.monitor.protocol import PACKAGE, QEMU_VERSION, Reply
from pyemu.monitor.schema import QmpError

Handler = Callable[[ControlApi, dict[str, Any]], Any]


def version_info() -> dict[str, Any]:
    return {"qemu": dict(QEMU_VERSION), "package": PACKAGE}


def _query_status(api: ControlApi, args: dict[str, Any]) -> Any:
    return api.status()


def _query_version(api: ControlApi, args: dict[str, Any]) -> Any:
    return version_info()


def _query_commands(api: ControlApi, args: dict[str, Any]) -> Any:
    return schema.query_commands()


def _query_qmp_schema(api: ControlApi, args: dict[str, Any]) -> Any:
    return schema.query_qmp_schema()


def _query_name(api: ControlApi, args: dict[str, Any]) -> Any:
    return {"name": api.name} if api.name is not None else {}


def _query_uuid(api: ControlApi, args: dict[str, Any]) -> Any:
    return {"UUID": api.uuid}


def _query_kvm(api: ControlApi, args: dict[str, Any]) -> Any:
    return {"enabled": api.accelerator == "kvm", "present": api.kvm_present()}


def _query_cpus_fast(api: ControlApi, args: dict[str, Any]) -> Any:
    return [{"cpu-index": cpu.index, "qom-path": cpu.qom_path, "thread-id": cpu.thread_id,
             "props": {"core-id": 0, "thread-id": 0, "socket-id": cpu.index}, "target": "x86_64"}
            for cpu in api.cpus()]


def _query_iothreads(api: ControlApi, args: dict[str, Any]) -> Any:
    # aio-max-batch is accepted and not used: pyemu submits no asynchronous I/O batches.
    return [{"id": thread.name, "thread-id": thread.thread_id, "poll-max-ns": thread.poll.max_ns,
             "poll-grow": thread.poll.grow, "poll-shrink": thread.poll.shrink, "aio-max-batch": 0}
            for thread in api.machine.iothreads()]


def _query_machines(api: ControlApi, args: dict[str, Any]) -> Any:
    from pyemu.system.config import MAX_VCPUS
    return [{"name": "microvm", "is-default": True, "cpu-max": MAX_VCPUS, "hotpluggable-cpus": False,
             "numa-mem-supported": False, "deprecated": False, "default-ram-id": "microvm.ram"}]


def _query_block(api: ControlApi, args: dict[str, Any]) -> Any:
    from pyemu.monitor.blockdev import add_node_names
    uses = api.machine.drives()
    return add_node_names(api, uses, [block_info(use.device_id, use.drive_id, use.backend) for use in uses])


def _query_chardev(api: ControlApi, args: dict[str, Any]) -> Any:
    from pyemu.monitor.chardev_info import query_chardev
    return query_chardev(api.machine.chardevs)


def _inject_nmi(api: ControlApi, args: dict[str, Any]) -> Any:
    api.inject_nmi()
    return {}


def _human_monitor_command(api: ControlApi, args: dict[str, Any]) -> Any:
    from pyemu.monitor.hmp import HumanMonitor  # hmp imports this module's constants
    monitor = HumanMonitor(api)
    if "cpu-index" in args:
        index = args["cpu-index"]
        if not 0 <= index < api.machine.vcpu_count:
            raise QmpError("Parameter 'cpu-index' expects a CPU number")
        monitor.current_cpu = index
    output = monitor.execute(args["command-line"])
    return Reply(output.text, after=output.after) if output.after is not None else output.text


def _stop(api: ControlApi, args: dict[str, Any]) -> Any:
    api.stop()
    return {}


def _cont(api: ControlApi, args: dict[str, Any]) -> Any:
    try:
        api.cont()
    except ControlError as error:
        raise QmpError(str(error)) from None
    return {}


def _system_reset(api: ControlApi, args: dict[str, Any]) -> Any:
    api.reset()
    return {}


def _system_powerdown(api: ControlApi, args: dict[str, Any]) -> Any:
    try:
        api.powerdown()
    except ControlError as error:
        raise QmpError(str(error)) from None
    return {}


def _quit(api: ControlApi, args: dict[str, Any]) -> Any:
    return Reply({}, after=api.quit)


HANDLERS: dict[str, Handler] = {
    "query-status": _query_status,
    "query-version": _query_version,
    "query-commands": _query_commands,
    "query-qmp-schema": _query_qmp_schema,
    "query-name": _query_name,
    "query-uuid": _query_uuid,
    "query-kvm": _query_kvm,
    "query-cpus-fast": _query_cpus_fast,
    "query-block": _query_block,
    "query-iothreads": _query_iothreads,
    "query-machines": _query_machines,
    "query-chardev": _query_chardev,
    "inject-nmi": _inject_nmi,
    "human-monitor-command": _human_monitor_command,
    "stop": _stop,
    "cont": _cont,
    "system_reset": _system_reset,
    "system_powerdown": _system_powerdown,
    "quit": _quit,
}
HANDLERS.update(BITMAP_HANDLERS)
HANDLERS.update(THROTTLE_HANDLERS)
HANDLERS.update(BLOCKDEV_HANDLERS)
HANDLERS.update(QOM_HANDLERS)
HANDLERS.update(TRANSACTION_HANDLERS)
HANDLERS.update(MIGRATION_HANDLERS)
HANDLERS.update(NBD_HANDLERS)
HANDLERS.update(JOB_HANDLERS)
HANDLERS.update(MIRROR_HANDLERS)
HANDLERS.update(RESIZE_HANDLERS)
HANDLERS.update(VM_SNAPSHOT_HANDLERS)
HANDLERS.update(SNAPSHOT_HANDLERS)
SESSION_COMMANDS = frozenset({"qmp_capabilities"})
"""Commands the session itself serves."""


def make_executor(api: ControlApi) -> Callable[[str, dict[str, Any]], Any]:
    """The ``execute`` callable a :class:`~pyemu.monitor.qmp.QmpSession` runs validated commands with."""

    def execute(name: str, args: dict[str, Any]) -> Any:
        handler = HANDLERS.get(name)
        if handler is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return handler(api, args)

    return execute
