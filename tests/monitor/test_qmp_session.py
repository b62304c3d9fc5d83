"""One QMP session fed bytes directly: framing, negotiation, errors, events -- no sockets, no VM."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pyemu.monitor.commands import Reply
from pyemu.monitor.qmp import MAX_OBJECT, JsonSplitter, QmpSession


class FakeCommands:
    """Answers every validated command with its name; ``boom`` raises like a buggy command would."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.after_ran = False

    def __call__(self, name: str, args: dict[str, Any]) -> Any:
        self.calls.append(name)
        if name == "query-name":
            raise RuntimeError("kaboom")
        if name == "quit":
            return Reply({}, after=self._after)
        return {"ran": name}

    def _after(self) -> None:
        self.after_ran = True


class Harness:
    def __init__(self) -> None:
        self.out = bytearray()
        self.commands = FakeCommands()
        self.session = QmpSession(self.commands, self.out.extend)
        self.session.start()

    def messages(self) -> list[dict[str, Any]]:
        lines = [line for line in bytes(self.out).split(b"\r\n") if line]
        self.out.clear()
        return [json.loads(line) for line in lines]

    def feed(self, data: bytes | str) -> list[dict[str, Any]]:
        self.session.feed(data.encode() if isinstance(data, str) else data)
        return self.messages()

    def negotiate(self) -> None:
        self.messages()
        assert self.feed('{"execute": "qmp_capabilities"}') == [{"return": {}}]


@pytest.fixture
def qmp() -> Harness:
    return Harness()


def test_greeting(qmp):
    (greeting,) = qmp.messages()
    assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert greeting["QMP"]["version"]["package"].startswith("pyemu")
    assert greeting["QMP"]["capabilities"] == []


def test_only_qmp_capabilities_before_negotiation(qmp):
    qmp.messages()
    (reply,) = qmp.feed('{"execute": "query-status", "id": 1}')
    assert reply == {"error": {"class": "CommandNotFound",
                               "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}
    assert qmp.commands.calls == []
    qmp.negotiate()
    (reply,) = qmp.feed('{"execute": "qmp_capabilities", "id": "again"}')
    assert reply["error"] == {"class": "CommandNotFound",
                              "desc": "Capabilities negotiation is already complete, command ignored"}
    assert reply["id"] == "again"


def test_oob_capability_is_refused(qmp):
    qmp.messages()
    (reply,) = qmp.feed('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    assert reply["error"]["class"] == "GenericError" and "oob" in reply["error"]["desc"]
    assert not qmp.session.negotiated


def test_id_echoed_with_any_json_value(qmp):
    qmp.negotiate()
    for ident in (7, "x", {"a": [1, 2]}, None):
        (reply,) = qmp.feed(json.dumps({"execute": "query-status", "id": ident}))
        assert reply == {"return": {"ran": "query-status"}, "id": ident}


def test_partial_reads_and_concatenated_objects(qmp):
    qmp.negotiate()
    text = '{"execute": "stop", "id": 1}{"execute": "cont", "id": 2}\n  {"execute":"query-status","id":"{3}"}'
    replies = []
    for index in range(len(text)):  # one byte at a time
        replies += qmp.feed(text[index])
    assert [r["id"] for r in replies] == [1, 2, "{3}"]
    assert qmp.commands.calls == ["stop", "cont", "query-status"]
    replies = qmp.feed(text.encode())  # all at once
    assert [r["id"] for r in replies] == [1, 2, "{3}"]


def test_braces_and_quotes_inside_strings_do_not_confuse_framing(qmp):
    qmp.negotiate()
    (reply,) = qmp.feed('{"execute": "query-status", "id": "}\\"{[]"}')
    assert reply["id"] == '}"{[]'


def test_garbage_is_answered_and_the_session_continues(qmp):
    qmp.negotiate()
    replies = qmp.feed(b'foo\n{"execute": }\n\xff\n]\n42\n[1, 2]\n{"execute": "query-status", "id": 9}\n')
    errors = [r for r in replies if "error" in r]
    assert all(r["error"]["class"] == "GenericError" for r in errors)
    assert any(r["error"]["desc"].startswith("JSON parse error") for r in errors)
    assert {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}} in replies
    assert replies[-1] == {"return": {"ran": "query-status"}, "id": 9}
    assert not qmp.session.closing


def test_unterminated_string_resynchronises_at_end_of_line(qmp):
    qmp.negotiate()
    replies = qmp.feed('{"execute": "oops\n{"execute": "query-status", "id": 1}\n')
    assert replies[0]["error"]["desc"].startswith("JSON parse error")
    assert replies[-1]["id"] == 1


def test_malformed_requests(qmp):
    qmp.negotiate()
    cases = {
        '{"id": 1}': "QMP input lacks member 'execute'",
        '{"execute": 5}': "QMP input member 'execute' must be a string",
        '{"execute": "stop", "arguments": []}': "QMP input member 'arguments' must be an object",
        '{"execute": "stop", "extra": 1}': "QMP input member 'extra' is unexpected",
    }
    for text, desc in cases.items():
        (reply,) = qmp.feed(text)
        assert reply["error"] == {"class": "GenericError", "desc": desc}


def test_unknown_command_and_bad_arguments(qmp):
    qmp.negotiate()
    (reply,) = qmp.feed('{"execute": "foo", "id": 3}')
    assert reply == {"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}, "id": 3}
    (reply,) = qmp.feed('{"execute": "stop", "arguments": {"x": 1}}')
    assert reply["error"] == {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}
    assert qmp.commands.calls == []


def test_exception_in_a_command_is_a_generic_error(qmp):
    qmp.negotiate()
    (reply,) = qmp.feed('{"execute": "query-name", "id": 1}')
    assert reply["error"]["class"] == "GenericError" and "kaboom" in reply["error"]["desc"]
    (reply,) = qmp.feed('{"execute": "query-status"}')
    assert "return" in reply


def test_reply_is_sent_before_the_after_action(qmp):
    qmp.negotiate()
    seen_before_after: list[bytes] = []
    original = qmp.commands._after

    def after() -> None:
        seen_before_after.append(bytes(qmp.out))
        original()

    qmp.commands._after = after  # type: ignore[method-assign]
    qmp.feed('{"execute": "quit", "id": "q"}')
    assert qmp.commands.after_ran
    assert b'"return": {}' in seen_before_after[0]


def test_oversized_object_is_answered_then_closed(qmp):
    qmp.negotiate()
    chunk = b'{"execute": "query-status", "arguments": {"x": "' + b"a" * 65536
    qmp.session.feed(chunk)
    for _ in range(MAX_OBJECT // 65536 + 1):
        qmp.session.feed(b"a" * 65536)
        if qmp.session.closing:
            break
    assert qmp.session.closing
    (reply,) = qmp.messages()
    assert reply["error"]["class"] == "GenericError" and "exceeds" in reply["error"]["desc"]
    assert qmp.feed('{"execute": "query-status"}') == []  # nothing more is read


def test_oversized_bare_token_is_bounded():
    splitter = JsonSplitter(limit=1000)
    frames = splitter.feed(b"x" * 2000)
    assert frames and frames[-1].fatal


def test_deep_nesting_is_an_error_not_a_crash(qmp):
    qmp.negotiate()
    replies = qmp.feed("[" * 5000 + "]" * 5000 + '\n{"execute": "query-status", "id": 1}')
    assert replies[0]["error"]["desc"].startswith("JSON parse error")
    assert replies[-1]["id"] == 1


def test_events_only_after_negotiation(qmp):
    qmp.messages()
    qmp.session.send_event("STOP", {})
    assert qmp.messages() == []
    qmp.negotiate()
    qmp.session.send_event("STOP", {}, {"seconds": 1, "microseconds": 2})
    qmp.session.send_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
    stop, shutdown = qmp.messages()
    assert stop == {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert set(shutdown["timestamp"]) == {"seconds", "microseconds"}
