"""The human monitor (HMP): QEMU's text commands over the same :class:`ControlApi` QMP uses.

One table of commands (name, aliases, argument synopsis, help line, handler) serves ``help``, dispatch and
the error messages; ``info`` has its own table of subcommands. A command line gives its output as text
with QEMU's wording and layout (``VM status: paused``, ``unknown command: 'foo'``, ``info registers``);
:class:`HumanMonitor` is used by QMP's ``human-monitor-command`` and by the interactive ``-monitor``
sessions (:mod:`pyemu.monitor.hmp_session`). Bad input is an answer, never an exception: a command that
fails prints ``Error: ...`` as QEMU's ``hmp_handle_error`` does, and the VM runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pyemu.errors import PyemuError
from pyemu.monitor.block_info import block_info
from pyemu.monitor.chardev_info import query_chardev
from pyemu.monitor.protocol import PACKAGE, QEMU_VERSION
from pyemu.monitor.control import ControlApi
from pyemu.monitor.cpu_dump import dump_registers
from pyemu.monitor.migration import hmp_info_migrate_parameters, hmp_migrate_cancel, hmp_migrate_set_parameter
from pyemu.monitor.qtree import qtree
from pyemu.monitor.vm_snapshot_commands import hmp_delvm, hmp_info_snapshots, hmp_loadvm, hmp_savevm
from pyemu.system.runstate import RunState


@dataclass(frozen=True)
class HmpOutput:
    """What a command line printed, plus an action for after the text went out (``quit``)."""

    text: str
    after: Callable[[], None] | None = None


class _Usage(Exception):
    """The arguments do not fit the command: QEMU prints the reason and points at ``help``."""


Handler = Callable[["HumanMonitor", str], "str | HmpOutput"]


@dataclass(frozen=True)
class HmpCommand:
    names: tuple[str, ...]
    params: str
    help: str
    handler: Handler

    @property
    def name(self) -> str:
        return self.names[0]

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{'|'.join(self.names)} {self.params} -- {self.help}"


def _no_args(name: str, args: str) -> None:
    if args.strip():
        raise _Usage(f"{name}: extraneous characters at the end of line")


# -- info subcommands ----------------------------------------------------------------------------------
def _info_status(mon: "HumanMonitor", args: str) -> str:
    state = mon.api.state
    running = state is RunState.RUNNING
    text = "VM status: " + ("running" if running else "paused")
    if not running and state is not RunState.PAUSED:
        text += f" ({state.value})"
    return text + "\n"


def _info_version(mon: "HumanMonitor", args: str) -> str:
    version = QEMU_VERSION
    return f"{version['major']}.{version['minor']}.{version['micro']} ({PACKAGE})\n"


def _info_name(mon: "HumanMonitor", args: str) -> str:
    return f"{mon.api.name}\n" if mon.api.name is not None else ""


def _info_uuid(mon: "HumanMonitor", args: str) -> str:
    return f"{mon.api.uuid}\n"


def _info_kvm(mon: "HumanMonitor", args: str) -> str:
    return f"kvm support: {'enabled' if mon.api.accelerator == 'kvm' else 'disabled'}\n"


def _info_cpus(mon: "HumanMonitor", args: str) -> str:
    return "".join(f"{'*' if cpu.index == mon.current_cpu else ' '} CPU #{cpu.index}: thread_id={cpu.thread_id}\n"
                   for cpu in mon.api.cpus())


def _info_iothreads(mon: "HumanMonitor", args: str) -> str:
    return "".join(f"{thread.name}:\n  thread_id={thread.thread_id}\n  poll-max-ns={thread.poll.max_ns}\n"
                   f"  poll-grow={thread.poll.grow}\n  poll-shrink={thread.poll.shrink}\n  aio-max-batch=0\n"
                   for thread in mon.api.machine.iothreads())


def _info_block(mon: "HumanMonitor", args: str) -> str:
    out: list[str] = []
    for use in mon.api.machine.drives():
        info = block_info(use.device_id, use.drive_id, use.backend)
        inserted = info["inserted"]
        out.append(f"{info['device']}: {inserted['file']} ({inserted['drv']}"
                   f"{', read-only' if inserted['ro'] else ''})\n")
        out.append(f"    Attached to:      {info['qdev']}\n")
        cache = inserted["cache"]
        out.append(f"    Cache mode:       {'writeback' if cache['writeback'] else 'writethrough'}"
                   f"{', direct' if cache['direct'] else ''}{', ignore flushes' if cache['no-flush'] else ''}\n")
        if "backing_file" in inserted:
            out.append(f"    Backing file:     {inserted['backing_file']} "
                       f"(chain depth: {inserted['backing_file_depth']})\n")
        out.append("\n")
    return "".join(out[:-1]) if out else ""


def _info_chardev(mon: "HumanMonitor", args: str) -> str:
    return "".join(f"{c['label']}: filename={c['filename']}\n" for c in query_chardev(mon.api.machine.chardevs))


def _info_registers(mon: "HumanMonitor", args: str) -> str:
    words = args.split()
    if len(words) > 1:
        raise _Usage("registers: extraneous characters at the end of line")
    count = mon.api.machine.vcpu_count
    if words and words[0] == "-a":
        indices = list(range(count))
    elif words:
        try:
            index = int(words[0], 0)
        except ValueError:
            raise _Usage(f"registers: invalid char '{words[0][0]}' in expression") from None
        if not 0 <= index < count:
            return f"CPU#{index} not available\n"
        indices = [index]
    else:
        indices = [mon.current_cpu]
    return "".join(dump_registers(index, mon.api.cpu_state(index)) for index in indices)


def _info_snapshots(mon: "HumanMonitor", args: str) -> str:
    return hmp_info_snapshots(mon.api, args)


def _info_qtree(mon: "HumanMonitor", args: str) -> str:
    return qtree(mon.api.machine.devices)


def _simple(handler: Callable[["HumanMonitor", str], str], name: str) -> Handler:
    def run(mon: "HumanMonitor", args: str) -> str:
        _no_args(name, args)
        return handler(mon, args)
    return run


INFO_COMMANDS: tuple[HmpCommand, ...] = (
    HmpCommand(("block",), "", "show info of one block device or all block devices",
               _simple(_info_block, "block")),
    HmpCommand(("chardev",), "", "show the character devices", _simple(_info_chardev, "chardev")),
    HmpCommand(("cpus",), "", "show infos for each CPU", _simple(_info_cpus, "cpus")),
    HmpCommand(("iothreads",), "", "show iothreads", _simple(_info_iothreads, "iothreads")),
    HmpCommand(("kvm",), "", "show KVM information", _simple(_info_kvm, "kvm")),
    HmpCommand(("migrate_parameters",), "", "show current migration parameters",
               _simple(hmp_info_migrate_parameters, "migrate_parameters")),
    HmpCommand(("name",), "", "show the current VM name", _simple(_info_name, "name")),
    HmpCommand(("qtree",), "", "show device tree", _simple(_info_qtree, "qtree")),
    HmpCommand(("registers",), "[-a|vcpu]", "show the cpu registers (-a: show register info for all cpus; "
               "vcpu: specific vCPU to query; show the current CPU's registers if no argument is specified)",
               _info_registers),
    HmpCommand(("snapshots",), "", "show the currently saved VM snapshots",
               _simple(_info_snapshots, "snapshots")),
    HmpCommand(("status",), "", "show the current VM status (running|paused)", _simple(_info_status, "status")),
    HmpCommand(("uuid",), "", "show the current VM UUID", _simple(_info_uuid, "uuid")),
    HmpCommand(("version",), "", "show the version of QEMU", _simple(_info_version, "version")),
)


# -- top-level commands --------------------------------------------------------------------------------
def _help(mon: "HumanMonitor", args: str) -> str:
    words = args.split()
    if not words:
        return "".join(c.help_line() + "\n" for c in COMMANDS)
    if words[0] == "info":
        if len(words) == 1:
            return "".join(c.help_line("info ") + "\n" for c in INFO_COMMANDS)
        sub = _find(INFO_COMMANDS, words[1])
        if sub is None:
            return f"unknown command: 'info {words[1]}'\n"
        return sub.help_line("info ") + "\n"
    command = _find(COMMANDS, words[0])
    if command is None:
        return f"unknown command: '{words[0]}'\n"
    return command.help_line() + "\n"


def _info(mon: "HumanMonitor", args: str) -> str | HmpOutput:
    name, _, rest = args.strip().partition(" ")
    if not name:
        return _help(mon, "info")
    sub = _find(INFO_COMMANDS, name)
    if sub is None:
        return f"unknown command: 'info {name}'\n"
    try:
        return sub.handler(mon, rest)
    except _Usage as usage:
        return f'{usage}\nTry "help info {sub.name}" for more information\n'


def _stop(mon: "HumanMonitor", args: str) -> str:
    mon.api.stop()
    return ""


def _cont(mon: "HumanMonitor", args: str) -> str:
    mon.api.cont()
    return ""


def _system_reset(mon: "HumanMonitor", args: str) -> str:
    mon.api.reset()
    return ""


def _system_powerdown(mon: "HumanMonitor", args: str) -> str:
    mon.api.powerdown()
    return ""


def _nmi(mon: "HumanMonitor", args: str) -> str:
    mon.api.inject_nmi()
    return ""


def _quit(mon: "HumanMonitor", args: str) -> HmpOutput:
    _no_args("quit", args)
    return HmpOutput("", after=mon.api.quit)


def _vm_snapshot(handler: Callable[[ControlApi, str], str], name: str, *, optional: bool = False) -> Handler:
    """savevm/loadvm/delvm take one word (QEMU's "s" argument; savevm's is optional)."""
    def run(mon: "HumanMonitor", args: str) -> str:
        words = args.split()
        if len(words) > 1:
            raise _Usage(f"{name}: extraneous characters at the end of line")
        if not words and not optional:
            raise _Usage(f"{name}: string expected")
        return handler(mon.api, words[0] if words else "")
    return run


COMMANDS: tuple[HmpCommand, ...] = (
    HmpCommand(("cont", "c"), "", "resume emulation", _simple(_cont, "cont")),
    HmpCommand(("delvm",), "tag", "delete a VM snapshot from its tag", _vm_snapshot(hmp_delvm, "delvm")),
    HmpCommand(("help", "?"), "[cmd]", "show the help", _help),
    HmpCommand(("info",), "[subcommand]", "show various information about the system state", _info),
    HmpCommand(("loadvm",), "tag", "restore a VM snapshot from its tag", _vm_snapshot(hmp_loadvm, "loadvm")),
    HmpCommand(("migrate_cancel",), "", "cancel the current VM migration",
               _simple(hmp_migrate_cancel, "migrate_cancel")),
    HmpCommand(("migrate_set_parameter",), "parameter value", "Set the parameter for migration",
               hmp_migrate_set_parameter),
    HmpCommand(("nmi",), "", "inject an NMI", _simple(_nmi, "nmi")),
    HmpCommand(("quit", "q"), "", "quit the emulator", _quit),
    HmpCommand(("savevm",), "[tag]", "save a VM snapshot. If no tag is provided, a new snapshot is created",
               _vm_snapshot(hmp_savevm, "savevm", optional=True)),
    HmpCommand(("stop", "s"), "", "stop emulation", _simple(_stop, "stop")),
    HmpCommand(("system_powerdown",), "", "send system power down event",
               _simple(_system_powerdown, "system_powerdown")),
    HmpCommand(("system_reset",), "", "reset the system", _simple(_system_reset, "system_reset")),
)


def _find(table: tuple[HmpCommand, ...], name: str) -> HmpCommand | None:
    for command in table:
        if name in command.names:
            return command
    return None


class HumanMonitor:
    """Runs HMP command lines against one VM. ``current_cpu`` is QEMU's monitor CPU (``cpu N``), 0 here."""

    def __init__(self, api: ControlApi) -> None:
        self.api = api
        self.current_cpu = 0

    def execute(self, line: str) -> HmpOutput:
        """Run one command line; the text uses ``\\r\\n`` line ends, as QEMU's monitor output does."""
        output = self._run(line)
        if isinstance(output, str):
            output = HmpOutput(output)
        return HmpOutput(output.text.replace("\r\n", "\n").replace("\n", "\r\n"), output.after)

    def _run(self, line: str) -> str | HmpOutput:
        name, _, args = line.strip().partition(" ")
        if not name:
            return ""
        command = _find(COMMANDS, name)
        if command is None:
            return f"unknown command: '{name}'\n"
        try:
            return command.handler(self, args)
        except _Usage as usage:
            return f'{usage}\nTry "help {command.name}" for more information\n'
        except PyemuError as error:
            return f"Error: {error}\n"
        except Exception as error:  # a bug must not end the monitor, nor the VM
            return f"Error: internal error in '{name}': {type(error).__name__}: {error}\n"
