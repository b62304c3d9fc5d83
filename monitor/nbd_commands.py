"""QMP's NBD server and block export commands, over the VM's :class:`~pyemu.block.exports.ExportManager`.

``nbd-server-start``/``-stop``, ``block-export-add``/``-del``, ``query-block-exports`` and the older
``nbd-server-add``/``-remove`` spellings. This module only checks arguments the generic validator cannot
(the SocketAddressLegacy union of ``addr``, the per-type members of the boxed ``block-export-add``, the
str-or-object bitmap list) with the messages QEMU 7.2's input visitor gives, resolves node names, and turns
the manager's typed errors into GenericErrors. What is not supported says so: TLS, and export types other
than ``nbd``.
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.block.exports import ExportManager, InetAddress, ListenAddress, UnixAddress
from pyemu.block.registry import NodeRegistryError
from pyemu.errors import PyemuError
from pyemu.monitor.blockdev import node_registry
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import Command, Member, QmpError, validate_arguments

UINT32_MAX = (1 << 32) - 1


def _members(*specs: str) -> tuple[Member, ...]:
    return tuple(Member(s.lstrip("*").split(":")[0], s.split(":")[1], s.startswith("*")) for s in specs)


# QEMU's UnixSocketAddress and InetSocketAddress (the members 7.2 accepts on Linux).
_UNIX = _members("path:str", "*abstract:bool", "*tight:bool")
_INET = _members("host:str", "port:str", "*numeric:bool", "*to:int", "*ipv4:bool", "*ipv6:bool",
                 "*keep-alive:bool", "*mptcp:bool")
# block-export-add: BlockExportOptions' common members, plus BlockExportOptionsNbd's for type=nbd.
_EXPORT_COMMON = Command("block-export-add", _members(
    "type:str", "id:str", "*fixed-iothread:bool", "*iothread:str", "node-name:str", "*writable:bool",
    "*writethrough:bool"), "", "")
_EXPORT_NBD = Command("block-export-add", _EXPORT_COMMON.args + _members(
    "*name:str", "*description:str", "*bitmaps:[any]", "*allocation-depth:bool"), "", "")


def exports(api: ControlApi) -> ExportManager:
    manager = getattr(api, "exports", None)
    if not isinstance(manager, ExportManager):
        raise QmpError("this VM has no block exports")
    return manager


def _guard(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except PyemuError as error:
        raise QmpError(str(error)) from None


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise QmpError(f"Invalid parameter type for '{path}', expected: object")
    return value


def _check(members: tuple[Member, ...], value: dict[str, Any], prefix: str) -> dict[str, Any]:
    """QEMU's visitor messages for a nested object, with ``prefix`` in every parameter path."""
    try:
        return validate_arguments(Command("", members, "", ""), value)
    except QmpError as error:
        desc = error.desc.replace("Parameter '", f"Parameter '{prefix}", 1).replace(
            "parameter type for '", f"parameter type for '{prefix}", 1)
        raise QmpError(desc) from None


def _discriminator(value: dict[str, Any], prefix: str, accepted: tuple[str, ...]) -> str:
    """A union's ``type`` member, with the visitor's messages (QEMU names the bad value without the path)."""
    if "type" not in value:
        raise QmpError(f"Parameter '{prefix}type' is missing")
    kind = value["type"]
    if not isinstance(kind, str):
        raise QmpError(f"Invalid parameter type for '{prefix}type', expected: string")
    if kind not in accepted:
        raise QmpError(f"Parameter 'type' does not accept value '{kind}'")
    return kind


def parse_address(addr: Any) -> ListenAddress:
    """QEMU's SocketAddressLegacy: ``{"type": "unix"|"inet"|"vsock"|"fd", "data": {...}}``."""
    addr = _object(addr, "addr")
    kind = _discriminator(addr, "addr.", ("inet", "unix", "vsock", "fd"))
    if "data" not in addr:
        raise QmpError("Parameter 'addr.data' is missing")
    for key in addr:
        if key not in ("type", "data"):
            raise QmpError(f"Parameter 'addr.{key}' is unexpected")
    data = _object(addr["data"], "addr.data")
    if kind == "unix":
        _check(_UNIX, data, "addr.data.")
        return UnixAddress(data["path"], abstract=data.get("abstract", False), tight=data.get("tight", True))
    if kind == "inet":
        _check(_INET, data, "addr.data.")
        return InetAddress(data["host"], data["port"], ipv4=data.get("ipv4"), ipv6=data.get("ipv6"))
    raise QmpError(f"NBD server address type '{kind}' is not supported by pyemu (use 'unix' or 'inet')")


def _nbd_server_start(api: ControlApi, args: dict[str, Any]) -> Any:
    address = parse_address(args["addr"])
    limit = args.get("max-connections", 0)
    if not 0 <= limit <= UINT32_MAX:
        raise QmpError("Parameter 'max-connections' expects uint32_t")
    manager = exports(api)
    if manager.server_running:
        raise QmpError("NBD server already running")
    if "tls-creds" in args:
        raise QmpError(f"No TLS credentials with id '{args['tls-creds']}' (pyemu's NBD server does not "
                       "support TLS)")
    _guard(lambda: manager.start_nbd_server(address, max_connections=limit))
    return {}


def _nbd_server_stop(api: ControlApi, args: dict[str, Any]) -> Any:
    _guard(exports(api).stop_nbd_server)
    return {}


def _bitmap_specs(value: list[Any]) -> list[str | tuple[str, str]]:
    """``bitmaps``: each a name or ``{"node": ..., "name": ...}`` (QEMU's BlockDirtyBitmapOrStr)."""
    specs: list[str | tuple[str, str]] = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            specs.append(item)
        elif isinstance(item, dict):
            _check(_members("node:str", "name:str"), item, f"bitmaps[{index}].")
            specs.append((item["node"], item["name"]))
        else:
            raise QmpError(f"Invalid parameter type for 'bitmaps[{index}]', expected: BlockDirtyBitmapOrStr")
    return specs


def _check_iothread(api: ControlApi, name: str | None) -> None:
    """An export's ``iothread`` must exist (requests are served on the NBD server's own threads anyway)."""
    if name is not None and all(thread.name != name for thread in api.machine.iothreads()):
        raise QmpError(f'iothread "{name}" not found')


def _block_export_add(api: ControlApi, args: dict[str, Any]) -> Any:
    kind = _discriminator(args, "", ("nbd", "vhost-user-blk", "fuse", "vduse-blk"))
    if kind != "nbd":
        # The common members are checked first, as QEMU's visitor does; the branch does not exist here.
        validate_arguments(_EXPORT_COMMON, {k: v for k, v in args.items() if k in
                                            {m.name for m in _EXPORT_COMMON.args}})
        raise QmpError("No driver found for the requested export type")
    validate_arguments(_EXPORT_NBD, args)
    if args.get("allocation-depth", False):
        raise QmpError("allocation-depth is not supported by pyemu's NBD server (no qemu:allocation-depth "
                       "context)")
    specs = _bitmap_specs(args.get("bitmaps", []))
    registry = node_registry(api)
    manager = exports(api)
    node_name = args["node-name"]
    _guard(lambda: manager.check_new_id(args["id"]))
    entry = registry.get(node_name)  # a node-name only: QEMU looks the node up without a device name
    if entry is None:
        raise QmpError(f"Cannot find device='' nor node-name='{node_name}'")
    _check_iothread(api, args.get("iothread"))
    _guard(lambda: manager.add_nbd_export(
        registry, export_id=args["id"], node=entry.node, node_name=node_name, name=args.get("name"),
        description=args.get("description"), writable=args.get("writable", False),
        writethrough=args.get("writethrough", False), bitmaps=specs))
    return {}


def _block_export_del(api: ControlApi, args: dict[str, Any]) -> Any:
    _guard(lambda: exports(api).delete(args["id"], hard=args.get("mode", "safe") == "hard"))
    return {}


def _query_block_exports(api: ControlApi, args: dict[str, Any]) -> Any:
    return exports(api).query()


def _nbd_server_add(api: ControlApi, args: dict[str, Any]) -> Any:
    """The pre-5.2 spelling: ``device`` is a drive id or node-name, the export id is ``name`` (default:
    ``device``), a read-only node is silently exported read-only, and one ``bitmap`` may be named."""
    manager = exports(api)
    if not manager.server_running:
        raise QmpError("NBD server not running")
    device = args["device"]
    registry = node_registry(api)
    try:
        node = registry.lookup(device)
    except NodeRegistryError as error:
        raise QmpError(str(error)) from None
    node_name = registry.name_of(node) or device
    export_id = args.get("name", device)
    writable = args.get("writable", False) and not node.read_only
    bitmaps = [args["bitmap"]] if "bitmap" in args else []
    _guard(lambda: manager.check_new_id(export_id))
    _guard(lambda: manager.add_nbd_export(registry, export_id=export_id, node=node, node_name=node_name,
                                          name=export_id, description=args.get("description"),
                                          writable=writable, bitmaps=bitmaps))
    return {}


def _nbd_server_remove(api: ControlApi, args: dict[str, Any]) -> Any:
    return _block_export_del(api, {"id": args["name"], **({"mode": args["mode"]} if "mode" in args else {})})


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "nbd-server-start": _nbd_server_start,
    "nbd-server-stop": _nbd_server_stop,
    "nbd-server-add": _nbd_server_add,
    "nbd-server-remove": _nbd_server_remove,
    "block-export-add": _block_export_add,
    "block-export-del": _block_export_del,
    "query-block-exports": _query_block_exports,
}
