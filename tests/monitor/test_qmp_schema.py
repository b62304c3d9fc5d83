"""The QMP schema table: argument validation with QEMU's messages, query-commands, query-qmp-schema."""

from __future__ import annotations

import pytest

from pyemu.monitor import commands, schema
from pyemu.monitor.schema import COMMANDS, COMMANDS_BY_NAME, QmpError, validate_arguments


def test_every_command_has_an_implementation_and_every_implementation_a_table_entry():
    table = {c.name for c in COMMANDS}
    assert table == set(commands.HANDLERS) | commands.SESSION_COMMANDS


def test_type_references_resolve():
    def check(kind: str) -> None:
        if kind.startswith("["):
            check(kind[1:-1])
        else:
            assert kind in schema.BUILTINS or kind in schema.TYPES, kind

    for command in COMMANDS:
        check(command.returns)
        for member in command.args:
            check(member.type)
    for entity in schema.TYPES.values():
        for member in getattr(entity, "members", ()):
            check(member.type)


@pytest.mark.parametrize("args,message", [
    ({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ({"enable": ["nope"]}, "Parameter 'enable[0]' does not accept value 'nope'"),
    ({"enable": [1]}, "Invalid parameter type for 'enable[0]', expected: string"),
    ({"bogus": True}, "Parameter 'bogus' is unexpected"),
])
def test_validation_messages(args, message):
    with pytest.raises(QmpError) as info:
        validate_arguments(COMMANDS_BY_NAME["qmp_capabilities"], args)
    assert info.value.desc == message and info.value.error_class == "GenericError"


def test_missing_and_typed_members():
    command = schema.Command("x", schema._members("a:int", "*b:bool", "c:str"), schema.EMPTY, "test")
    with pytest.raises(QmpError, match="Parameter 'a' is missing"):
        validate_arguments(command, {"c": "s"})
    with pytest.raises(QmpError, match="Invalid parameter type for 'a', expected: integer"):
        validate_arguments(command, {"a": True, "c": "s"})
    with pytest.raises(QmpError, match="Invalid parameter type for 'b', expected: boolean"):
        validate_arguments(command, {"a": 1, "b": 1, "c": "s"})
    assert validate_arguments(command, {"a": 1, "c": "s"}) == {"a": 1, "c": "s"}


def test_query_commands_lists_the_table():
    names = [entry["name"] for entry in schema.query_commands()]
    assert names == [c.name for c in COMMANDS]
    assert {"qmp_capabilities", "query-status", "stop", "cont", "quit"} <= set(names)


def test_qmp_schema_is_self_consistent_and_masked():
    info = schema.query_qmp_schema()
    by_name = {entry["name"]: entry for entry in info}
    assert len(by_name) == len(info), "duplicate SchemaInfo names"
    for entry in info:
        assert entry["meta-type"] in ("builtin", "enum", "array", "object", "command", "event")
        refs: list[str] = []
        if entry["meta-type"] == "command":
            refs = [entry["arg-type"], entry["ret-type"]]
        elif entry["meta-type"] == "event":
            refs = [entry["arg-type"]]
        elif entry["meta-type"] == "array":
            refs = [entry["element-type"]]
        elif entry["meta-type"] == "object":
            refs = [m["type"] for m in entry["members"]]
        for ref in refs:
            assert ref in by_name, f"{entry['name']} refers to unknown {ref}"
        if entry["meta-type"] in ("enum", "object"):
            assert entry["name"].isdigit(), "non-builtin type names are masked as numbers, as QEMU does"
    assert by_name["0"] == {"name": "0", "meta-type": "object", "members": []}
    status = by_name["query-status"]
    ret = by_name[status["ret-type"]]
    assert [m["name"] for m in ret["members"]] == ["running", "singlestep", "status"]
    run_state = by_name[next(m["type"] for m in ret["members"] if m["name"] == "status")]
    assert run_state["meta-type"] == "enum" and "prelaunch" in run_state["values"]
    caps = by_name[by_name["qmp_capabilities"]["arg-type"]]
    assert caps["members"] == [{"name": "enable", "type": caps["members"][0]["type"], "default": None}]
    assert by_name[caps["members"][0]["type"]]["meta-type"] == "array"
    shutdown = by_name[by_name["SHUTDOWN"]["arg-type"]]
    assert [m["name"] for m in shutdown["members"]] == ["guest", "reason"]
    assert by_name["bool"] == {"name": "bool", "meta-type": "builtin", "json-type": "boolean"}
