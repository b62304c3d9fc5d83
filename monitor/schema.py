"""The one table of QMP commands, events and types, and everything derived from it.

A command is described once here (name, arguments with QAPI types, return type, one line of doc); from
that table come argument validation with QEMU's error messages, ``query-commands`` and
``query-qmp-schema`` (QEMU's SchemaInfo list, with non-builtin type names masked as numbers the way QEMU
masks them). The implementations live in :mod:`pyemu.monitor.commands` and are looked up by name, so a
command missing either half is caught by a unit test rather than by a client.

Type references are strings: a builtin (``str``, ``int``, ``bool``, ``number``, ``any``, ``null``), the
name of an :class:`EnumType` or :class:`StructType` in :data:`TYPES`, or ``[T]`` for an array of ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyemu.errors import PyemuError

EMPTY = "q_empty"
"""The argument-less object: commands without arguments or without a meaningful return use it."""

#: QAPI builtin -> the JSON type introspection reports for it.
BUILTINS: dict[str, str] = {"str": "string", "int": "int", "bool": "boolean", "number": "number",
                            "any": "value", "null": "null"}
#: The word QEMU's input visitor uses after "expected:" for each JSON type.
_EXPECTED_WORD: dict[str, str] = {"str": "string", "int": "integer", "bool": "boolean", "number": "number",
                                  "null": "null"}


class QmpError(PyemuError):
    """An error a QMP client sees as ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass(frozen=True)
class Member:
    """An argument or struct member: its name, type reference and whether it may be left out."""

    name: str
    type: str
    optional: bool = False


@dataclass(frozen=True)
class EnumType:
    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class StructType:
    name: str
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[Member, ...]
    returns: str
    doc: str
    allow_before_negotiation: bool = False
    """Only ``qmp_capabilities`` may run in capabilities-negotiation mode."""
    boxed: bool = False
    """The arguments are one union checked by the handler (``blockdev-add``: each driver has its own
    members); ``args`` lists only the common ones, for introspection."""


@dataclass(frozen=True)
class Event:
    name: str
    data: tuple[Member, ...]
    doc: str


def _m(spec: str) -> Member:
    """``"name:type"`` or ``"*name:type"`` (optional), as QAPI writes members."""
    name, _, kind = spec.partition(":")
    return Member(name.lstrip("*"), kind, optional=name.startswith("*"))


def _members(*specs: str) -> tuple[Member, ...]:
    return tuple(_m(spec) for spec in specs)


_THROTTLE_KINDS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")
#: block_set_io_throttle's optional members (QEMU's BlockIOThrottle), also BlockDeviceInfo's.
_THROTTLE_OPTIONAL = tuple(f"*{kind}{suffix}:int" for suffix in ("_max", "_max_length") for kind in _THROTTLE_KINDS) \
    + ("*iops_size:int", "*group:str")


_MIGRATION_PARAMETERS = _members(
    "*announce-initial:int", "*announce-max:int", "*announce-rounds:int", "*announce-step:int",
    "*compress-level:int", "*compress-threads:int", "*decompress-threads:int",
    "*throttle-trigger-threshold:int", "*cpu-throttle-initial:int", "*cpu-throttle-increment:int",
    "*max-bandwidth:int", "*downtime-limit:int", "*x-checkpoint-delay:int", "*multifd-channels:int",
    "*xbzrle-cache-size:int", "*max-postcopy-bandwidth:int", "*max-cpu-throttle:int",
    "*multifd-zlib-level:int", "*multifd-zstd-level:int", "*compress-wait-thread:bool",
    "*cpu-throttle-tailslow:bool", "*block-incremental:bool", "*tls-creds:str", "*tls-hostname:str",
    "*tls-authz:str", "*multifd-compression:str")
"""QEMU 7.2's MigrationParameters members (all optional: migrate-set-parameters takes any subset)."""

_TYPE_LIST: tuple[EnumType | StructType, ...] = (
    StructType(EMPTY, ()),
    EnumType("QMPCapability", ("oob",)),
    EnumType("RunState", ("debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate",
                          "prelaunch", "finish-migrate", "restore-vm", "running", "save-vm", "shutdown",
                          "suspended", "watchdog", "guest-panicked", "colo")),
    EnumType("ShutdownCause", ("none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
                               "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
                               "snapshot-load")),
    EnumType("SysEmuTarget", ("x86_64",)),
    EnumType("GuestPanicAction", ("pause", "poweroff", "run")),
    StructType("StatusInfo", _members("running:bool", "singlestep:bool", "status:RunState")),
    StructType("VersionTriple", _members("major:int", "minor:int", "micro:int")),
    StructType("VersionInfo", _members("qemu:VersionTriple", "package:str")),
    StructType("CommandInfo", _members("name:str")),
    StructType("NameInfo", _members("*name:str")),
    StructType("UuidInfo", _members("UUID:str")),
    StructType("KvmInfo", _members("enabled:bool", "present:bool")),
    StructType("CpuInstanceProperties", _members("*node-id:int", "*socket-id:int", "*die-id:int",
                                                 "*cluster-id:int", "*core-id:int", "*thread-id:int")),
    StructType("CpuInfoFast", _members("cpu-index:int", "qom-path:str", "thread-id:int",
                                       "*props:CpuInstanceProperties", "target:SysEmuTarget")),
    EnumType("SchemaMetaType", ("builtin", "enum", "array", "object", "alternate", "command", "event")),
    # The base members of QEMU's SchemaInfo union; the per-meta-type variants are not described here.
    StructType("SchemaInfo", _members("name:str", "meta-type:SchemaMetaType", "*features:[str]")),
    StructType("ShutdownEventData", _members("guest:bool", "reason:ShutdownCause")),
    StructType("IOThreadInfo", _members("id:str", "thread-id:int", "poll-max-ns:int", "poll-grow:int",
                                        "poll-shrink:int", "aio-max-batch:int")),
    StructType("MachineInfo", _members("name:str", "*alias:str", "*is-default:bool", "cpu-max:int",
                                       "hotpluggable-cpus:bool", "numa-mem-supported:bool", "deprecated:bool",
                                       "*default-cpu-type:str", "*default-ram-id:str")),
    StructType("BlockdevCacheInfo", _members("writeback:bool", "direct:bool", "no-flush:bool")),
    StructType("ImageInfo", _members("filename:str", "format:str", "virtual-size:int", "*dirty-flag:bool",
                                     "*cluster-size:int", "*backing-filename:str",
                                     "*backing-filename-format:str", "*backing-image:ImageInfo")),
    StructType("BlockDeviceInfo", _members("file:str", "*node-name:str", "ro:bool", "drv:str", "*backing_file:str",
                                           "backing_file_depth:int", "encrypted:bool", "detect_zeroes:str",
                                           "bps:int", "bps_rd:int", "bps_wr:int", "iops:int", "iops_rd:int",
                                           "iops_wr:int", "image:ImageInfo", "write_threshold:int",
                                           "cache:BlockdevCacheInfo", "*dirty-bitmaps:[BlockDirtyInfo]",
                                           *_THROTTLE_OPTIONAL)),
    StructType("ChardevInfo", _members("label:str", "filename:str", "frontend-open:bool")),
    StructType("ObjectPropertyInfo", _members("name:str", "type:str", "*description:str", "*default-value:any")),
    StructType("BlockInfo", _members("device:str", "*qdev:str", "type:str", "removable:bool", "locked:bool",
                                     "*inserted:BlockDeviceInfo", "*dirty-bitmaps:[BlockDirtyInfo]")),
    StructType("BlockDirtyInfo", _members("*name:str", "count:int", "granularity:int", "recording:bool",
                                          "busy:bool", "persistent:bool", "*inconsistent:bool")),
    # Migration (pyemu.monitor.migration): QEMU's MigrationStatus, MigrationStats and MigrationInfo.
    EnumType("MigrationStatus", ("none", "setup", "cancelling", "cancelled", "active", "postcopy-active",
                                 "postcopy-paused", "postcopy-recover", "completed", "failed", "colo",
                                 "pre-switchover", "device", "wait-unplug")),
    StructType("MigrationStats", _members("transferred:int", "remaining:int", "total:int", "duplicate:int",
                                          "skipped:int", "normal:int", "normal-bytes:int",
                                          "dirty-pages-rate:int", "mbps:number", "dirty-sync-count:int",
                                          "postcopy-requests:int", "page-size:int", "multifd-bytes:int",
                                          "pages-per-second:int", "precopy-bytes:int", "downtime-bytes:int",
                                          "postcopy-bytes:int", "dirty-sync-missed-zero-copy:int")),
    StructType("MigrationInfo", _members("*status:MigrationStatus", "*ram:MigrationStats", "*total-time:int",
                                         "*expected-downtime:int", "*downtime:int", "*setup-time:int",
                                         "*error-desc:str", "*socket-address:[any]")),
    # migrate-set-parameters / query-migrate-parameters (pyemu.migration.params): QEMU 7.2's members.
    StructType("MigrationParameters", _MIGRATION_PARAMETERS),
    EnumType("MigrationCapability", ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress",
                                     "events", "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
                                     "pause-before-switchover", "multifd", "dirty-bitmaps",
                                     "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
                                     "validate-uuid", "background-snapshot", "zero-copy-send",
                                     "postcopy-preempt", "mapped-ram")),  # mapped-ram: QEMU 9.0's
    StructType("MigrationCapabilityStatus", _members("capability:MigrationCapability", "state:bool")),
    # Jobs (pyemu.block.jobs, pyemu.monitor.job_commands): QEMU's job.json and block-core.json job types.
    EnumType("JobType", ("commit", "stream", "mirror", "backup", "create", "amend", "snapshot-load",
                         "snapshot-save", "snapshot-delete")),
    EnumType("JobStatus", ("undefined", "created", "running", "paused", "ready", "standby", "waiting", "pending",
                           "aborting", "concluded", "null")),
    EnumType("BlockDeviceIoStatus", ("ok", "failed", "nospace")),
    EnumType("MirrorSyncMode", ("top", "full", "none", "incremental", "bitmap")),
    EnumType("BitmapSyncMode", ("on-success", "never", "always")),
    EnumType("MirrorCopyMode", ("background", "write-blocking")),
    EnumType("BlockdevOnError", ("report", "ignore", "enospc", "stop", "auto")),
    EnumType("NewImageMode", ("existing", "absolute-paths")),
    EnumType("IoOperationType", ("read", "write")),
    EnumType("BlockErrorAction", ("ignore", "report", "stop")),
    StructType("BackupPerf", _members("*use-copy-range:bool", "*max-workers:int", "*max-chunk:int")),
    StructType("JobInfo", _members("id:str", "type:JobType", "status:JobStatus", "current-progress:int",
                                   "total-progress:int", "*error:str")),
    StructType("BlockJobInfo", _members("type:str", "device:str", "len:int", "offset:int", "busy:bool",
                                        "paused:bool", "speed:int", "io-status:BlockDeviceIoStatus", "ready:bool",
                                        "status:JobStatus", "auto-finalize:bool", "auto-dismiss:bool",
                                        "*error:str")),
    # Exports (pyemu.monitor.nbd_commands): QEMU's block-export.json.
    EnumType("BlockExportType", ("nbd", "vhost-user-blk", "fuse", "vduse-blk")),
    EnumType("BlockExportRemoveMode", ("safe", "hard")),
    StructType("BlockExportInfo", _members("id:str", "type:BlockExportType", "node-name:str",
                                           "shutting-down:bool")),
)
TYPES: dict[str, EnumType | StructType] = {t.name: t for t in _TYPE_LIST}

COMMANDS: tuple[Command, ...] = (
    Command("qmp_capabilities", _members("*enable:[QMPCapability]"), EMPTY,
            "leave capabilities-negotiation mode and enable the given capabilities",
            allow_before_negotiation=True),
    Command("query-status", (), "StatusInfo", "the run state of the VM"),
    Command("query-version", (), "VersionInfo", "the QEMU version pyemu speaks for, and pyemu's own"),
    Command("query-commands", (), "[CommandInfo]", "the commands this monitor accepts"),
    Command("query-qmp-schema", (), "[SchemaInfo]", "the commands, events and types, as QEMU introspection"),
    Command("query-name", (), "NameInfo", "the guest name given with -name"),
    Command("query-uuid", (), "UuidInfo", "the VM UUID given with -uuid (all zeros without it)"),
    Command("query-kvm", (), "KvmInfo", "whether KVM is in use and whether the host has it"),
    Command("query-cpus-fast", (), "[CpuInfoFast]", "the vCPUs and their host threads"),
    Command("query-iothreads", (), "[IOThreadInfo]", "the I/O threads and their host thread ids"),
    Command("query-machines", (), "[MachineInfo]", "the board types pyemu offers"),
    Command("query-block", (), "[BlockInfo]", "the VM's drives and the images behind them"),
    Command("block_set_io_throttle", _members("*device:str", "*id:str", "bps:int", "bps_rd:int", "bps_wr:int",
                                              "iops:int", "iops_rd:int", "iops_wr:int", *_THROTTLE_OPTIONAL),
            EMPTY, "a drive's I/O limits (bursts, iops size, the throttle group it shares them with)"),
    Command("query-chardev", (), "[ChardevInfo]", "the character backends and where they lead"),
    # The block graph (pyemu.monitor.blockdev, qom, transaction).
    Command("blockdev-add", _members("driver:str", "*node-name:str", "*read-only:bool", "*auto-read-only:bool",
                                     "*discard:str", "*detect-zeroes:str", "*force-share:bool", "*cache:any"),
            EMPTY, "open a block node (QEMU's BlockdevOptions: file, raw, qcow2, ...)", boxed=True),
    Command("blockdev-del", _members("node-name:str"), EMPTY, "close a block node blockdev-add made"),
    Command("query-named-block-nodes", _members("*flat:bool"), "[BlockDeviceInfo]", "every named block node"),
    Command("qom-list", _members("path:str"), "[ObjectPropertyInfo]", "the properties of a QOM path"),
    Command("qom-get", _members("path:str", "property:str"), "any", "read a QOM property"),
    Command("block_resize", _members("*device:str", "*node-name:str", "size:int"), EMPTY,
            "resize a drive or node while the guest runs (virtio-blk tells the guest: config-change interrupt)"),
    Command("qom-set", _members("path:str", "property:str", "value:any"), EMPTY,
            "write a QOM property (a block device's 'drive': swap its node while the guest runs)"),
    Command("transaction", _members("actions:[any]", "*properties:any"), EMPTY,
            "run several actions atomically (all are prepared, then committed, or all aborted)"),
    Command("inject-nmi", (), EMPTY, "send a non-maskable interrupt to every vCPU"),
    Command("human-monitor-command", _members("command-line:str", "*cpu-index:int"), "str",
            "run a human monitor (HMP) command line and return its output"),
    Command("stop", (), EMPTY, "pause every vCPU"),
    Command("cont", (), EMPTY, "start or resume the vCPUs"),
    Command("system_reset", (), EMPTY, "reset the machine as the reset button does"),
    Command("system_powerdown", (), EMPTY, "press the ACPI power button (the guest decides what to do)"),
    Command("quit", (), EMPTY, "end pyemu (the reply comes first)"),
    Command("block-dirty-bitmap-add", _members("node:str", "name:str", "*granularity:int", "*persistent:bool",
                                               "*disabled:bool"), EMPTY,
            "create a dirty bitmap on a node (persistent: stored in its qcow2 image)"),
    Command("block-dirty-bitmap-remove", _members("node:str", "name:str"), EMPTY,
            "delete a dirty bitmap (and from the image, if persistent)"),
    Command("block-dirty-bitmap-clear", _members("node:str", "name:str"), EMPTY, "reset every bit of a bitmap"),
    Command("block-dirty-bitmap-enable", _members("node:str", "name:str"), EMPTY,
            "let a bitmap record writes again"),
    Command("block-dirty-bitmap-disable", _members("node:str", "name:str"), EMPTY,
            "stop a bitmap recording writes"),
    # bitmaps: QEMU's alternate BlockDirtyBitmapOrStr (a name or {node, name}), checked by the handler.
    Command("block-dirty-bitmap-merge", _members("node:str", "target:str", "bitmaps:[any]"), EMPTY,
            "OR bitmaps into a target bitmap"),
    Command("migrate", _members("uri:str", "*blk:bool", "*inc:bool", "*detach:bool", "*resume:bool"), EMPTY,
            "save the VM's state to a file:, exec:, tcp: or unix: URI (the VM ends postmigrate)"),
    Command("migrate-incoming", _members("uri:str"), EMPTY,
            "load the VM's state from a URI (a VM started with -incoming defer)"),
    Command("query-migrate", (), "MigrationInfo", "the status and statistics of the last migration"),
    Command("migrate_cancel", (), EMPTY, "stop the outgoing migration in progress (the VM goes on)"),
    Command("migrate-set-parameters", _MIGRATION_PARAMETERS, EMPTY,
            "set migration parameters (max-bandwidth and downtime-limit act; the others are kept)"),
    Command("query-migrate-parameters", (), "MigrationParameters", "the migration parameters"),
    Command("migrate-set-capabilities", _members("capabilities:[MigrationCapabilityStatus]"), EMPTY,
            "enable or disable migration capabilities (QEMU's names; pyemu supports 'events')"),
    Command("query-migrate-capabilities", (), "[MigrationCapabilityStatus]", "the migration capabilities"),
    Command("snapshot-save", _members("job-id:str", "tag:str", "vmstate:str", "devices:[str]"), EMPTY,
            "a job saving the VM (state into 'vmstate') as internal snapshot 'tag' of the 'devices' nodes"),
    Command("snapshot-load", _members("job-id:str", "tag:str", "vmstate:str", "devices:[str]"), EMPTY,
            "a job reverting the 'devices' nodes to internal snapshot 'tag' and loading its VM state"),
    Command("snapshot-delete", _members("job-id:str", "tag:str", "devices:[str]"), EMPTY,
            "a job deleting internal snapshot 'tag' of the 'devices' nodes"),
    # Jobs: the generic job-* commands take the job id; the block-job-* spellings take it as 'device'
    # (QEMU: a block job's id defaults to its device name), except finalize/dismiss which take 'id'.
    Command("query-jobs", (), "[JobInfo]", "every job and its state"),
    Command("job-pause", _members("id:str"), EMPTY, "pause a job at its next pause point"),
    Command("job-resume", _members("id:str"), EMPTY, "resume a paused job"),
    Command("job-cancel", _members("id:str"), EMPTY, "cancel a job (forced: a ready mirror aborts too)"),
    Command("job-complete", _members("id:str"), EMPTY, "complete a job that is ready"),
    Command("job-finalize", _members("id:str"), EMPTY, "finalize a pending job (auto-finalize=false)"),
    Command("job-dismiss", _members("id:str"), EMPTY, "remove a concluded job (auto-dismiss=false)"),
    Command("query-block-jobs", (), "[BlockJobInfo]", "every block job and its progress"),
    Command("block-job-set-speed", _members("device:str", "speed:int"), EMPTY,
            "change a block job's rate limit (bytes per second, 0 = unlimited)"),
    Command("block-job-cancel", _members("device:str", "*force:bool"), EMPTY,
            "cancel a block job (a ready mirror without force: complete without pivot)"),
    Command("block-job-pause", _members("device:str"), EMPTY, "pause a block job"),
    Command("block-job-resume", _members("device:str"), EMPTY, "resume a paused block job"),
    Command("block-job-complete", _members("device:str"), EMPTY, "complete a block job that is ready"),
    Command("block-job-finalize", _members("id:str"), EMPTY, "finalize a pending block job"),
    Command("block-job-dismiss", _members("id:str"), EMPTY, "remove a concluded block job"),
    Command("blockdev-backup", _members("*job-id:str", "device:str", "target:str", "sync:MirrorSyncMode",
                                        "*speed:int", "*bitmap:str", "*bitmap-mode:BitmapSyncMode",
                                        "*compress:bool", "*on-source-error:BlockdevOnError",
                                        "*on-target-error:BlockdevOnError", "*auto-finalize:bool",
                                        "*auto-dismiss:bool", "*filter-node-name:str", "*x-perf:BackupPerf"),
            EMPTY, "copy a node to an existing target node as of the moment the job starts (a backup job)"),
    Command("blockdev-mirror", _members("*job-id:str", "device:str", "target:str", "*replaces:str",
                                        "sync:MirrorSyncMode", "*speed:int", "*granularity:int", "*buf-size:int",
                                        "*on-source-error:BlockdevOnError", "*on-target-error:BlockdevOnError",
                                        "*filter-node-name:str", "*copy-mode:MirrorCopyMode", "*auto-finalize:bool",
                                        "*auto-dismiss:bool"), EMPTY,
            "mirror a node into an existing target node while the guest writes; job-complete switches to it"),
    Command("drive-mirror", _members("*job-id:str", "device:str", "target:str", "*format:str", "*node-name:str",
                                     "*replaces:str", "sync:MirrorSyncMode", "*mode:NewImageMode", "*speed:int",
                                     "*granularity:int", "*buf-size:int", "*on-source-error:BlockdevOnError",
                                     "*on-target-error:BlockdevOnError", "*unmap:bool", "*copy-mode:MirrorCopyMode",
                                     "*auto-finalize:bool", "*auto-dismiss:bool"), EMPTY,
            "mirror a drive into a new (or existing) image file; job-complete switches the drive to it"),
    Command("block-commit", _members("*job-id:str", "device:str", "*base-node:str", "*base:str", "*top-node:str",
                                     "*top:str", "*backing-file:str", "*speed:int", "*on-error:BlockdevOnError",
                                     "*filter-node-name:str", "*auto-finalize:bool", "*auto-dismiss:bool"), EMPTY,
            "merge upper layers of a backing chain into a lower one (the active layer: ready, then pivot)"),
    Command("blockdev-snapshot-sync", _members("*device:str", "*node-name:str", "snapshot-file:str",
                                               "*snapshot-node-name:str", "*format:str", "*mode:NewImageMode"),
            EMPTY, "put a new qcow2 overlay (created now) on top of a running node"),
    Command("blockdev-snapshot", _members("node:str", "overlay:str"), EMPTY,
            "put an existing overlay node (without a backing) on top of a running node"),
    Command("block-stream", _members("*job-id:str", "device:str", "*base:str", "*base-node:str",
                                     "*backing-file:str", "*bottom:str", "*speed:int", "*on-error:BlockdevOnError",
                                     "*filter-node-name:str", "*auto-finalize:bool", "*auto-dismiss:bool"),
            EMPTY, "copy the backing chain's data into the top image, then drop the backing link (a stream job)"),
    # NBD server and block exports. 'addr' is QEMU's SocketAddressLegacy ({"type": "unix"|"inet",
    # "data": {...}}), checked by the handler; block-export-add is a union on 'type'.
    Command("nbd-server-start", _members("addr:any", "*tls-creds:str", "*tls-authz:str", "*max-connections:int"),
            EMPTY, "start the VM's NBD server on a unix or inet address"),
    Command("nbd-server-stop", (), EMPTY, "stop the NBD server and remove every NBD export"),
    Command("nbd-server-add", _members("device:str", "*name:str", "*description:str", "*writable:bool",
                                       "*bitmap:str"), EMPTY, "export a node over the NBD server"),
    Command("nbd-server-remove", _members("name:str", "*mode:BlockExportRemoveMode"), EMPTY,
            "remove an NBD export"),
    Command("block-export-add", _members("type:BlockExportType", "id:str", "*fixed-iothread:bool", "*iothread:str",
                                         "node-name:str", "*writable:bool", "*writethrough:bool"), EMPTY,
            "export a block node (type=nbd: name, description, bitmaps, allocation-depth)", boxed=True),
    Command("block-export-del", _members("id:str", "*mode:BlockExportRemoveMode"), EMPTY,
            "remove a block export (BLOCK_EXPORT_DELETED follows once its clients are gone)"),
    Command("query-block-exports", (), "[BlockExportInfo]", "the block exports"),
)
COMMANDS_BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}

EVENTS: tuple[Event, ...] = (
    Event("SHUTDOWN", _members("guest:bool", "reason:ShutdownCause"), "the VM is shutting down"),
    Event("RESET", _members("guest:bool", "reason:ShutdownCause"), "the VM was reset"),
    Event("POWERDOWN", (), "the power button was pressed (system_powerdown)"),
    Event("STOP", (), "the vCPUs were stopped"),
    Event("RESUME", (), "the vCPUs run again"),
    Event("GUEST_PANICKED", _members("action:GuestPanicAction"), "the guest reported a panic (pvpanic)"),
    Event("GUEST_CRASHLOADED", _members("action:GuestPanicAction"),
          "the guest's crash kernel was loaded after a panic (pvpanic)"),
    Event("MIGRATION", _members("status:MigrationStatus"), "a migration changed status"),
    Event("JOB_STATUS_CHANGE", _members("id:str", "status:JobStatus"), "a job moved to another state"),
    Event("BLOCK_JOB_COMPLETED", _members("type:JobType", "device:str", "len:int", "offset:int", "speed:int",
                                          "*error:str"), "a block job ended (with 'error' if it failed)"),
    Event("BLOCK_JOB_CANCELLED", _members("type:JobType", "device:str", "len:int", "offset:int", "speed:int"),
          "a block job was cancelled"),
    Event("BLOCK_JOB_ERROR", _members("device:str", "operation:IoOperationType", "action:BlockErrorAction"),
          "a block job met an I/O error (on-source-error / on-target-error decide what follows)"),
    Event("BLOCK_JOB_READY", _members("type:JobType", "device:str", "len:int", "offset:int", "speed:int"),
          "a block job is ready to be completed"),
    Event("BLOCK_JOB_PENDING", _members("type:JobType", "id:str"), "a block job waits for job-finalize"),
    Event("BLOCK_EXPORT_DELETED", _members("id:str"), "a block export is gone (its last client left)"),
)
EVENTS_BY_NAME: dict[str, Event] = {e.name: e for e in EVENTS}


# -- validation -------------------------------------------------------------------------------------------
def validate_arguments(command: Command, arguments: dict[str, Any]) -> dict[str, Any]:
    """Check ``arguments`` against ``command``'s table entry; raise :class:`QmpError` with QEMU's wording."""
    if command.boxed:
        return arguments
    return _check_object(command.args, arguments, prefix="")


def _check_object(members: tuple[Member, ...], value: dict[str, Any], prefix: str) -> dict[str, Any]:
    known = {m.name for m in members}
    for member in members:
        path = prefix + member.name
        if member.name not in value:
            if not member.optional:
                raise QmpError(f"Parameter '{path}' is missing")
            continue
        _check_value(member.type, value[member.name], path)
    for key in value:
        if key not in known:
            raise QmpError(f"Parameter '{prefix}{key}' is unexpected")
    return value


def _check_value(kind: str, value: Any, path: str) -> None:
    if kind.startswith("["):
        if not isinstance(value, list):
            raise QmpError(f"Invalid parameter type for '{path}', expected: array")
        for index, item in enumerate(value):
            _check_value(kind[1:-1], item, f"{path}[{index}]")
        return
    if kind == "any":
        return
    if kind in BUILTINS:
        ok = {"str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "bool": isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool),
              "null": value is None}[kind]
        if not ok:
            raise QmpError(f"Invalid parameter type for '{path}', expected: {_EXPECTED_WORD[kind]}")
        return
    entity = TYPES[kind]
    if isinstance(entity, EnumType):
        if not isinstance(value, str):
            raise QmpError(f"Invalid parameter type for '{path}', expected: string")
        if value not in entity.values:
            raise QmpError(f"Parameter '{path}' does not accept value '{value}'")
        return
    if not isinstance(value, dict):
        raise QmpError(f"Invalid parameter type for '{path}', expected: object")
    _check_object(entity.members, value, prefix=f"{path}.")


# -- introspection ----------------------------------------------------------------------------------------
def query_commands() -> list[dict[str, str]]:
    return [{"name": c.name} for c in COMMANDS]


@dataclass
class _Masker:
    """Gives every non-builtin type a number on first use (QEMU's masked names) and collects its entry."""

    names: dict[str, str] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    builtins_seen: list[str] = field(default_factory=list)

    def ref(self, kind: str) -> str:
        if kind.startswith("["):
            element = self.ref(kind[1:-1])
            name = f"[{element}]"
            if kind not in self.names:
                self.names[kind] = name
                self.entries.append({"name": name, "meta-type": "array", "element-type": element})
            return name
        if kind in BUILTINS:
            if kind not in self.builtins_seen:
                self.builtins_seen.append(kind)
            return kind
        if kind in self.names:
            return self.names[kind]
        name = str(sum(1 for key in self.names if not key.startswith("[")))
        self.names[kind] = name
        entity = TYPES[kind]
        if isinstance(entity, EnumType):
            self.entries.append({"name": name, "meta-type": "enum", "values": list(entity.values),
                                 "members": [{"name": v} for v in entity.values]})
        else:
            entry: dict[str, Any] = {"name": name, "meta-type": "object", "members": []}
            self.entries.append(entry)  # before the members, so a recursive reference finds the name
            entry["members"] = [self.member(m) for m in entity.members]
        return name

    def member(self, member: Member) -> dict[str, Any]:
        out: dict[str, Any] = {"name": member.name, "type": self.ref(member.type)}
        if member.optional:
            out["default"] = None
        return out

    def anonymous(self, key: str, members: tuple[Member, ...]) -> str:
        """The implicit argument object of a command or event (QEMU's ``q_obj_...-arg``)."""
        if not members:
            return self.ref(EMPTY)
        name = str(sum(1 for k in self.names if not k.startswith("[")))
        self.names[key] = name
        entry: dict[str, Any] = {"name": name, "meta-type": "object", "members": []}
        self.entries.append(entry)
        entry["members"] = [self.member(m) for m in members]
        return name


def query_qmp_schema() -> list[dict[str, Any]]:
    """The SchemaInfo list: commands and events first, then the types they use, then the builtins."""
    masker = _Masker()
    masker.ref(EMPTY)  # "0" is the empty object, as in QEMU
    head: list[dict[str, Any]] = []
    for command in COMMANDS:
        arg_type = masker.anonymous(f"q_obj_{command.name}-arg", command.args)
        head.append({"name": command.name, "meta-type": "command", "arg-type": arg_type,
                     "ret-type": masker.ref(command.returns)})
    for event in EVENTS:
        arg_type = masker.anonymous(f"q_obj_{event.name}-arg", event.data)
        head.append({"name": event.name, "meta-type": "event", "arg-type": arg_type})
    builtins = [{"name": b, "meta-type": "builtin", "json-type": BUILTINS[b]} for b in masker.builtins_seen]
    return head + masker.entries + builtins
