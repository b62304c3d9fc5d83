"""QMP ``transaction``: several actions that happen together or not at all, as QEMU's.

Every action type is an entry of :data:`ACTIONS`: a factory that checks the action's ``data`` (with the
same schema as the command of that name, so the messages match) and returns an :class:`Action` with
``prepare`` (do the work, keeping what is needed to undo it), ``commit`` and ``abort``. The transaction
prepares the actions in order; when one fails, the ones already prepared are aborted in reverse order and
the client gets the failing action's error -- QEMU's semantics. Later actions (``blockdev-backup``, jobs)
plug in with :func:`register_action` and need nothing else here. With ``completion-mode=grouped`` the jobs
the actions start form one :class:`~pyemu.jobs.job.JobTxn` (they complete together or are all cancelled);
actions that start no job refuse that mode, as in QEMU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pyemu.monitor import schema
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError


class Action:
    """One prepared step. ``prepare`` raises QmpError to fail the whole transaction."""

    def prepare(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Make the prepared work final (most actions have nothing left to do)."""

    def abort(self) -> None:
        """Undo ``prepare`` (called only after a successful prepare)."""


ActionFactory = Callable[[ControlApi, dict[str, Any]], Action]


@dataclass(frozen=True)
class ActionType:
    name: str
    factory: ActionFactory
    command: str | None = None
    """The command whose argument schema checks ``data`` (None: the factory checks it)."""
    groupable: bool = False
    """The action starts a job that can join a ``completion-mode=grouped`` group (its action has ``job``)."""


ACTIONS: dict[str, ActionType] = {}


def register_action(name: str, factory: ActionFactory, *, command: str | None = None,
                    groupable: bool = False) -> None:
    ACTIONS[name] = ActionType(name, factory, command, groupable)


# -- built-in actions -------------------------------------------------------------------------------------
class _Abort(Action):
    def prepare(self) -> None:
        raise QmpError("Transaction aborted using Abort action")


class _CommandAction(Action):
    """An action that runs a command in prepare and undoes it with a given function."""

    def __init__(self, do: Callable[[], Any], undo: Callable[[], Any]) -> None:
        self._do = do
        self._undo = undo

    def prepare(self) -> None:
        self._do()

    def abort(self) -> None:
        self._undo()


def _bitmap_add(api: ControlApi, data: dict[str, Any]) -> Action:
    from pyemu.block.dirty_bitmap import bitmaps_of
    from pyemu.monitor import bitmap_commands

    def undo() -> None:
        node = bitmap_commands.resolve_node(api, data["node"])
        bitmaps_of(node).remove(data["name"])

    return _CommandAction(lambda: bitmap_commands.block_dirty_bitmap_add(api, data), undo)


class _BitmapClear(Action):
    """Clear in prepare, keeping the bits; abort ORs them back (a write that landed meanwhile stays
    recorded, so an aborted clear never loses a dirty granule)."""

    def __init__(self, api: ControlApi, data: dict[str, Any]) -> None:
        self.api = api
        self.data = data
        self.saved: bytes | None = None
        self.bitmap: Any = None

    def prepare(self) -> None:
        from pyemu.monitor import bitmap_commands

        _node, self.bitmap = bitmap_commands._lookup(self.api, self.data["node"], self.data["name"])
        self.saved = self.bitmap.copy_bits()
        bitmap_commands.block_dirty_bitmap_clear(self.api, self.data)

    def abort(self) -> None:
        if self.saved is None:
            return
        self.bitmap.merge_bits(self.saved)


def _bitmap_toggle(enable: bool) -> ActionFactory:
    def factory(api: ControlApi, data: dict[str, Any]) -> Action:
        from pyemu.block.dirty_bitmap import bitmaps_of
        from pyemu.monitor import bitmap_commands

        state: dict[str, Any] = {}

        def do() -> None:
            node, bitmap = bitmap_commands._lookup(api, data["node"], data["name"])
            state["node"], state["was"] = node, bitmap.enabled
            (bitmap_commands.block_dirty_bitmap_enable if enable else
             bitmap_commands.block_dirty_bitmap_disable)(api, data)

        def undo() -> None:
            bitmaps_of(state["node"]).set_enabled(data["name"], state["was"])

        return _CommandAction(do, undo)
    return factory


register_action("abort", lambda api, data: _Abort())
register_action("block-dirty-bitmap-add", _bitmap_add, command="block-dirty-bitmap-add")
register_action("block-dirty-bitmap-clear", _BitmapClear, command="block-dirty-bitmap-clear")
register_action("block-dirty-bitmap-enable", _bitmap_toggle(True), command="block-dirty-bitmap-enable")
register_action("block-dirty-bitmap-disable", _bitmap_toggle(False), command="block-dirty-bitmap-disable")


# -- the command ------------------------------------------------------------------------------------------
def _parse(actions: list[Any]) -> list[tuple[ActionType, dict[str, Any]]]:
    parsed: list[tuple[ActionType, dict[str, Any]]] = []
    for index, item in enumerate(actions):
        where = f"actions[{index}]"
        if not isinstance(item, dict):
            raise QmpError(f"Invalid parameter type for '{where}', expected: object")
        for key in item:
            if key not in ("type", "data"):
                raise QmpError(f"Parameter '{where}.{key}' is unexpected")
        kind = item.get("type")
        if kind is None:
            raise QmpError(f"Parameter '{where}.type' is missing")
        if not isinstance(kind, str):
            raise QmpError(f"Invalid parameter type for '{where}.type', expected: string")
        action_type = ACTIONS.get(kind)
        if action_type is None:
            raise QmpError(f"Parameter 'type' does not accept value '{kind}'")  # QEMU 7.2's words
        data = item.get("data", {})
        if not isinstance(data, dict):
            raise QmpError(f"Invalid parameter type for '{where}.data', expected: object")
        command = schema.COMMANDS_BY_NAME.get(action_type.command or "")
        if command is not None:
            schema._check_object(command.args, data, prefix=f"{where}.data.")
        parsed.append((action_type, data))
    return parsed


def _transaction(api: ControlApi, args: dict[str, Any]) -> Any:
    properties = args.get("properties") or {}
    if not isinstance(properties, dict):
        raise QmpError("Invalid parameter type for 'properties', expected: object")
    mode = properties.get("completion-mode", "individual")
    if mode not in ("individual", "grouped"):
        raise QmpError(f"Parameter 'properties.completion-mode' does not accept value '{mode}'")
    parsed = _parse(args["actions"])
    if mode == "grouped":  # QEMU: only actions that start jobs take part in a job group
        for action_type, _data in parsed:
            if not action_type.groupable and action_type.name != "abort":
                raise QmpError(f"Action '{action_type.name}' does not support Transaction property "
                               "completion-mode = grouped")
    prepared: list[Action] = []
    try:
        for action_type, data in parsed:
            action = action_type.factory(api, data)
            action.prepare()
            prepared.append(action)
    except BaseException:
        for action in reversed(prepared):
            action.abort()
        raise
    if mode == "grouped":
        from pyemu.jobs.job import JobTxn

        group = JobTxn()
        for action in prepared:
            job = getattr(action, "job", None)
            if job is not None:
                group.add(job)
    for action in prepared:
        action.commit()
    return {}


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {"transaction": _transaction}
