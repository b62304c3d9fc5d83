"""``-blockdev`` and QMP ``blockdev-add``: one option schema per driver, and opening a definition as nodes.

A definition is QEMU's BlockdevOptions: common members (``driver``, ``node-name``, ``read-only``,
``auto-read-only``, ``discard``, ``detect-zeroes``, ``cache.direct``, ``cache.no-flush``, ``force-share``)
plus the driver's own. Child members (``file``, ``backing``, later a filter's ``target``) are either the
node-name of an existing node or an inline definition, opened the same way and owned by the parent. The
same schema serves both syntaxes: QMP/JSON values must have their JSON types, keyval strings are converted
the way QEMU's keyval input visitor does (``on``/``off``, integers, sizes with suffixes).

Drivers live in one table, :data:`DRIVERS` (name -> :class:`DriverSpec`: members and an opener taking the
validated options and an :class:`OpenContext` that resolves children); later drivers (``nbd``,
``copy-before-write``, ``snapshot-access``) plug in with :func:`register_driver` without touching this
module. Opening registers every node it creates in the VM's :class:`~pyemu.block.registry.NodeRegistry`
(inline children with automatic ``#blockNNN`` names) and undoes everything when any part fails.
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pyemu.block import borrowed
from pyemu.block.borrowed import BorrowedNode
from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockConfigError, BlockError
from pyemu.block.implicit import IMPLICIT_OWNER, release_if_unused
from pyemu.block.keyval import parse_keyval
from pyemu.block.registry import NodeEntry, NodeRegistry, NodeRegistryError, check_node_name

_SIZE_RE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\s*([bBkKmMgGtTpPeE]?)\Z")
_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
MAX_INLINE_DEPTH = 16


class BlockdevError(BlockError):
    """A definition that is invalid or cannot be opened; the message is what QMP/the CLI shows."""


# -- the schema ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One member: ``kind`` is str, bool, int, size, enum, ref (node-name or inline definition), ref-or-null
    or object (with ``members``)."""

    name: str
    kind: str
    required: bool = False
    values: tuple[str, ...] = ()
    members: tuple["Opt", ...] = ()


COMMON: tuple[Opt, ...] = (
    Opt("driver", "enum", required=True),
    Opt("node-name", "str"),
    Opt("read-only", "bool"),
    Opt("auto-read-only", "bool"),
    Opt("force-share", "bool"),
    Opt("discard", "enum", values=("ignore", "unmap")),
    Opt("detect-zeroes", "enum", values=("off", "on", "unmap")),
    Opt("cache", "object", members=(Opt("direct", "bool"), Opt("no-flush", "bool"))),
)


@dataclass
class OpenContext:
    """What an opener gets besides its options: the resolved children and the node's common settings."""

    registry: NodeRegistry
    name: str
    read_only: bool
    auto_read_only: bool
    cache_direct: bool
    no_flush: bool
    force_share: bool
    parent_driver: str | None = None
    """The driver of the parent defining this node inline (a qcow2's file grows; a raw's does not)."""
    children: dict[str, BlockDriver | None] = field(default_factory=dict)
    """Resolved child members (None for an explicit ``null``); absent members are absent."""
    extra_children: list[tuple[str, BlockDriver]] = field(default_factory=list)
    """Nodes the opener created itself (a qcow2's backing chain from its header), to register for listing."""

    def child(self, role: str) -> BlockDriver:
        node = self.children.get(role)
        if node is None:
            raise BlockdevError(f"Parameter '{role}' is missing")
        return node


Opener = Callable[[dict[str, Any], OpenContext], BlockDriver]


@dataclass(frozen=True)
class DriverSpec:
    name: str
    members: tuple[Opt, ...]
    open: Opener
    doc: str = ""

    @property
    def child_members(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members if m.kind in ("ref", "ref-or-null"))


DRIVERS: dict[str, DriverSpec] = {}


def register_driver(spec: DriverSpec) -> None:
    """Add (or replace) a driver of ``-blockdev``/``blockdev-add``."""
    DRIVERS[spec.name] = spec


# -- validation -----------------------------------------------------------------------------------------
def _type_error(path: str, word: str) -> BlockdevError:
    return BlockdevError(f"Invalid parameter type for '{path}', expected: {word}")


def _convert(opt: Opt, value: Any, path: str, keyval: bool) -> Any:
    kind = opt.kind
    if kind in ("ref", "ref-or-null"):
        if value is None and kind == "ref-or-null":
            return None
        if keyval and value == "" and kind == "ref-or-null":
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return value  # validated when it is opened, with its own driver's members
        raise _type_error(path, "BlockdevRef" + ("OrNull" if kind == "ref-or-null" else ""))
    if kind == "object":
        if not isinstance(value, dict):
            raise _type_error(path, "object")
        return _check_members(opt.members, value, path + ".", keyval)
    if kind in ("str", "enum"):
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if kind == "enum" and opt.values and value not in opt.values:
            raise BlockdevError(f"Parameter '{path}' does not accept value '{value}'")
        return value
    if kind == "bool":
        if keyval and isinstance(value, str):
            if value in ("on", "yes", "true", "y"):
                return True
            if value in ("off", "no", "false", "n"):
                return False
            raise BlockdevError(f"Parameter '{path}' expects 'on' or 'off'")
        if not isinstance(value, bool):
            raise _type_error(path, "boolean")
        return value
    if kind in ("int", "size"):
        if keyval and isinstance(value, str):
            if kind == "size":
                match = _SIZE_RE.match(value.strip())
                if not match:
                    raise BlockdevError(f"Parameter '{path}' expects a non-negative number below 2^64")
                digits, suffix = match.groups()
                number = int(digits, 16) if digits[:2].lower() == "0x" else int(digits)
                value = number << _SHIFT[suffix.lower()]
            else:
                try:
                    value = int(value, 0)
                except ValueError:
                    raise BlockdevError(f"Parameter '{path}' expects integer") from None
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(path, "integer")
        if value < 0 or value >= 1 << 63:
            raise BlockdevError(f"Parameter '{path}' expects a non-negative integer below 2^63")
        return value
    raise AssertionError(f"unknown option kind {kind}")


def _check_members(members: tuple[Opt, ...], options: dict[str, Any], prefix: str,
                   keyval: bool) -> dict[str, Any]:
    known = {m.name: m for m in members}
    out: dict[str, Any] = {}
    for key, value in options.items():
        opt = known.get(key)
        if opt is None:
            raise BlockdevError(f"Parameter '{prefix}{key}' is unexpected")
        out[key] = _convert(opt, value, prefix + key, keyval)
    for opt in members:
        if opt.required and opt.name not in options:
            raise BlockdevError(f"Parameter '{prefix}{opt.name}' is missing")
    return out


def validate(options: dict[str, Any], *, keyval: bool = False, prefix: str = "") -> dict[str, Any]:
    """Check one definition (not its inline children) against the common and the driver's members."""
    if not isinstance(options, dict):
        raise _type_error(prefix.rstrip(".") or "options", "object")
    driver = options.get("driver")
    if driver is None:
        raise BlockdevError(f"Parameter '{prefix}driver' is missing")
    if not isinstance(driver, str):
        raise _type_error(prefix + "driver", "string")
    spec = DRIVERS.get(driver)
    if spec is None:
        raise BlockdevError(f"Parameter '{prefix}driver' does not accept value '{driver}'")
    return _check_members(COMMON + spec.members, options, prefix, keyval)


def parse_blockdev_arg(text: str) -> tuple[dict[str, Any], bool]:
    """A ``-blockdev`` argument: JSON when it starts with ``{``, else keyval. Returns the raw definition
    and whether its values are keyval strings (to be converted by the schema)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BlockConfigError(f"-blockdev: JSON parse error, {exc.msg}", option="-blockdev") from None
        if not isinstance(value, dict):
            raise BlockConfigError("-blockdev: the JSON definition must be an object", option="-blockdev")
        return value, False
    return parse_keyval(text, option="-blockdev"), True


# -- opening --------------------------------------------------------------------------------------------
class _Undo:
    """What an open created, so a failure anywhere leaves the registry and the files as they were."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self.entries: list[NodeEntry] = []
        self.loose: list[BlockDriver] = []

    def rollback(self) -> None:
        for entry in reversed(self.entries):
            try:
                self.registry.remove(entry.name, by_monitor=False)
            except NodeRegistryError:
                pass
        for node in reversed(self.loose):
            try:
                node.close()
            except Exception:  # noqa: BLE001 -- best effort: the original error is what the user sees
                pass


def open_blockdev(options: dict[str, Any], registry: NodeRegistry, *, keyval: bool = False,
                  owner: str = "monitor") -> NodeEntry:
    """Validate and open a definition and every inline child; register them; return the top entry.

    Raises BlockdevError (schema, missing child, read-only conflicts), NodeRegistryError (duplicate or
    invalid node-name, unknown child reference), BlockConfigError/ImageLockedError from the drivers, or
    PermissionConflict; in every case nothing stays registered or open.
    """
    if owner == "monitor" and isinstance(options, dict) and "node-name" not in options:
        raise BlockdevError("'node-name' must be specified for the root node")
    undo = _Undo(registry)
    try:
        return _open(options, registry, keyval=keyval, owner=owner, prefix="", undo=undo, depth=0,
                     inherited={})
    except BaseException:
        undo.rollback()
        raise


def _open(raw: dict[str, Any], registry: NodeRegistry, *, keyval: bool, owner: str, prefix: str, undo: _Undo,
          depth: int, inherited: dict[str, Any]) -> NodeEntry:
    if depth > MAX_INLINE_DEPTH:
        raise BlockdevError(f"'{prefix.rstrip('.')}': inline definitions nested too deeply")
    options = validate(raw, keyval=keyval, prefix=prefix)
    spec = DRIVERS[options["driver"]]
    if "node-name" in options:
        check_node_name(options["node-name"])
        registry.check_free(options["node-name"])
        name, auto = options["node-name"], False
    else:
        name, auto = registry.auto_name(), True
    if options.get("detect-zeroes", "off") != "off":
        raise BlockdevError(f"detect-zeroes={options['detect-zeroes']} is not supported yet (only off)")
    cache = options.get("cache", {})
    read_only = options.get("read-only", inherited.get("read-only", False))
    ctx = OpenContext(registry=registry, name=name, read_only=read_only,
                      auto_read_only=options.get("auto-read-only", inherited.get("auto-read-only", False)),
                      cache_direct=cache.get("direct", inherited.get("cache.direct", False)),
                      no_flush=cache.get("no-flush", inherited.get("cache.no-flush", False)),
                      force_share=options.get("force-share", False),
                      parent_driver=inherited.get("parent-driver"))
    child_names: dict[str, str] = {}
    borrowed_edges: list[BorrowedNode] = []
    owned_children: list[BlockDriver] = []
    for role in spec.child_members:
        if role not in options:
            continue
        value = options[role]
        if value is None:
            ctx.children[role] = None
        elif isinstance(value, str):
            entry = registry.lookup_entry(value)
            edge = BorrowedNode(entry.node, node_name=entry.name)
            borrowed_edges.append(edge)
            ctx.children[role] = edge
            child_names[role] = entry.name
        else:
            child_inherit = {"read-only": True if role == "backing" else read_only,
                             "auto-read-only": ctx.auto_read_only, "cache.direct": ctx.cache_direct,
                             "cache.no-flush": ctx.no_flush, "parent-driver": spec.name}
            child = _open(value, registry, keyval=keyval, owner=name, prefix=f"{prefix}{role}.", undo=undo,
                          depth=depth + 1, inherited=child_inherit)
            ctx.children[role] = child.node
            child_names[role] = child.name
            owned_children.append(child.node)
    try:
        node = spec.open(options, ctx)
    except BaseException:
        for edge in borrowed_edges:
            edge.close()
        raise
    undo.loose.append(node)
    for edge in borrowed_edges:
        edge.settle()
    # Children the parent now owns are closed through it; they stay registered (for listing) until it goes.
    undo.loose = [n for n in undo.loose if n not in owned_children]
    for role, extra in ctx.extra_children:
        extra_entry = NodeEntry(registry.auto_name(), extra, extra.name, owner=name, auto_named=True,
                                read_only=extra.read_only)
        registry.add(extra_entry)
        undo.entries.append(extra_entry)
        child_names.setdefault(role, extra_entry.name)
    entry = NodeEntry(name, node, spec.name, owner=owner, auto_named=auto, children=child_names,
                      options=dict(raw), read_only=bool(ctx.read_only or node.read_only),
                      detect_zeroes=options.get("detect-zeroes", "off"))
    entry.cache_direct = ctx.cache_direct  # type: ignore[attr-defined]
    entry.no_flush = ctx.no_flush  # type: ignore[attr-defined]
    registry.add(entry)
    undo.entries.append(entry)
    return entry


def delete_blockdev(registry: NodeRegistry, name: str) -> None:
    """``blockdev-del``: unregister the node (QEMU's checks, see NodeRegistry.remove) and close it."""
    removed = registry.remove(name)
    borrowed_below = [edge.node for entry in removed
                      if isinstance(edge := getattr(entry.node, "backing", None), BorrowedNode)]
    # The first entry is the node itself; closing it closes the inline children it owns.
    removed[0].node.close()
    for entry in removed[1:]:
        entry.node.close()
    for node in borrowed_below:
        release_if_unused(registry, node)  # a snapshot overlay it was the last user of goes too


def close_all(registry: NodeRegistry) -> None:
    """Close every node the user created or the graph created for them, newest first (VM shutdown)."""
    for entry in reversed(list(registry)):
        if entry.owner in ("monitor", IMPLICIT_OWNER) and entry.name in registry:
            try:
                if entry.monitor_owned:
                    delete_blockdev(registry, entry.name)
                else:
                    for gone in registry.remove(entry.name, by_monitor=False):
                        gone.node.close()
            except NodeRegistryError:
                entry.node.close()


# -- the built-in drivers -------------------------------------------------------------------------------
def _open_file(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    from pyemu.block.file import FileProtocol
    from pyemu.block.locking import PERM_ALL, BlockPerm, default_permissions

    aio = options.get("aio", "threads")
    if aio == "io_uring":
        raise BlockdevError("aio=io_uring was specified, but is not supported in this build")
    if aio == "native" and not ctx.cache_direct:
        raise BlockdevError("aio=native was specified, but it requires cache.direct=on, which was not specified")
    filename = options["filename"]
    if "\0" in filename:
        raise BlockdevError("Could not open the file: its name contains a NUL byte")
    read_only = ctx.read_only
    perm, shared = default_permissions(read_only=read_only)
    if ctx.force_share:
        if not read_only:
            raise BlockdevError("force-share=on can only be used with read-only images")
        perm, shared = BlockPerm.CONSISTENT_READ, PERM_ALL
    # The file under a qcow2 node grows when clusters are appended; other parents never write past the end.
    growable = ctx.parent_driver == "qcow2"
    try:
        return FileProtocol.open(filename, read_only=read_only, direct=ctx.cache_direct,
                                 locking=options.get("locking", "auto"), perm=perm, shared=shared,
                                 growable=growable, no_flush=ctx.no_flush)
    except BlockConfigError as exc:
        if not (ctx.auto_read_only and not read_only and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM)):
            raise
    perm, shared = default_permissions(read_only=True)
    ctx.read_only = True
    return FileProtocol.open(filename, read_only=True, direct=ctx.cache_direct,
                             locking=options.get("locking", "auto"), perm=perm, shared=shared,
                             growable=growable, no_flush=ctx.no_flush)


def _open_raw(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    from pyemu.block.raw import RawFormat

    # A raw node over a read-only child is read-only itself (QEMU accepts the definition; a writer
    # attaching later gets "Block node is read-only").
    child = ctx.child("file")
    return RawFormat(child, offset=options.get("offset", 0), size=options.get("size"))


def _open_qcow2(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    from pyemu.block.image import open_backing_image
    from pyemu.block.qcow2.driver import Qcow2Format

    if options.get("lazy-refcounts"):
        raise BlockdevError("lazy-refcounts=on is not supported by pyemu's qcow2 driver")
    file = ctx.child("file")
    if file.read_only:
        ctx.read_only = True  # as raw: over a read-only file the image opens read-only
    target = file.node if isinstance(file, BorrowedNode) else file
    if getattr(target, "growable", None) is False and not ctx.read_only:
        # A file node defined on its own (file=<node-name>) learns here that a qcow2 node appends to it.
        target.growable = True  # type: ignore[attr-defined]

    def backing_opener(header: Any) -> BlockDriver | None:
        if "backing" in ctx.children:
            return ctx.children["backing"]  # a node-name, an inline definition, or None for backing=null
        if not header.backing_file:
            return None
        node = open_backing_image(file.filename, header, cache_direct=ctx.cache_direct)
        ctx.extra_children.append(("backing", node))
        return node

    return Qcow2Format.open(file, read_only=ctx.read_only, open_backing=backing_opener)


_CACHE_SIZES = ("cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
                "cache-clean-interval")

register_driver(DriverSpec("file", (Opt("filename", "str", required=True),
                                    Opt("locking", "enum", values=("auto", "on", "off")),
                                    Opt("aio", "enum", values=("threads", "native", "io_uring")),
                                    Opt("aio-max-batch", "int"), Opt("drop-cache", "bool")),
                           _open_file, "a host file or block device"))
register_driver(DriverSpec("raw", (Opt("file", "ref", required=True), Opt("offset", "size"), Opt("size", "size")),
                           _open_raw, "the child's bytes, optionally a window of them"))
register_driver(DriverSpec("qcow2", (Opt("file", "ref", required=True), Opt("backing", "ref-or-null"),
                                     Opt("lazy-refcounts", "bool"), Opt("pass-discard-request", "bool"),
                                     Opt("pass-discard-snapshot", "bool"), Opt("pass-discard-other", "bool"))
                           + tuple(Opt(name, "size" if name != "cache-clean-interval" else "int")
                                   for name in _CACHE_SIZES),
                           _open_qcow2, "a qcow2 image over its file child"))


def _open_nbd(options: dict[str, Any], ctx: OpenContext) -> BlockDriver:
    """The NBD client (:mod:`pyemu.block.nbd`) from QEMU's BlockdevOptionsNbd: ``server`` (a SocketAddress:
    unix ``path`` or inet ``host``/``port``), ``export``, ``reconnect-delay``."""
    from pyemu.block.nbd.client import NbdClient
    from pyemu.block.nbd.uri import target_from_options

    if "tls-creds" in options:
        raise BlockdevError("NBD over TLS (tls-creds) is not supported by pyemu's NBD client")
    server = options["server"]
    flat = {f"server.{key}": str(value) for key, value in server.items()}
    if "export" in options:
        flat["export"] = options["export"]
    return NbdClient.open(target_from_options(flat), read_only=ctx.read_only,
                          reconnect_delay=float(options.get("reconnect-delay", 0)))


register_driver(DriverSpec("nbd", (Opt("server", "object", required=True, members=(
                                       Opt("type", "enum", required=True, values=("unix", "inet")),
                                       Opt("path", "str"), Opt("host", "str"), Opt("port", "str"))),
                                   Opt("export", "str"), Opt("reconnect-delay", "int"), Opt("tls-creds", "str")),
                           _open_nbd, "an NBD export (client)"))


def activate(node: object) -> None:
    """A drive starts using ``node``: take the permissions its borrowed children need (see
    :mod:`pyemu.block.borrowed`)."""
    borrowed.activate(node)


def deactivate(node: object) -> None:
    borrowed.deactivate(node)


# The fleecing drivers live in their own modules and register themselves (imported last: they use the above).
from pyemu.block import copy_before_write as _copy_before_write  # noqa: E402,F401
from pyemu.block import snapshot_access as _snapshot_access  # noqa: E402,F401
from pyemu.block import copy_on_read as _copy_on_read  # noqa: E402,F401
from pyemu.block import throttle_filter as _throttle_filter  # noqa: E402,F401
