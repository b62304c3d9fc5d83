"""One QMP session over a byte stream: framing, greeting, capabilities negotiation, dispatch, events.

The session never touches a socket: the server feeds it the bytes it read (:meth:`QmpSession.feed`) and
it hands back what to write through the ``send`` callable, so unit tests drive it with plain bytes. Each
JSON object is cut out of the stream by :class:`JsonSplitter`, which tracks nesting and strings the way
QEMU's JSON streamer does, so partial reads and several objects in one read both work.

Bad input never ends the VM and never shows a traceback: malformed JSON gets a GenericError
("JSON parse error, ...") and the stream goes on after it; an object larger than :data:`MAX_OBJECT`
gets an error and the session asks to be closed (:attr:`QmpSession.closing`); an exception inside a
command becomes a GenericError with its message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from pyemu.monitor import schema
from pyemu.monitor.protocol import PACKAGE, QEMU_VERSION, Reply
from pyemu.monitor.schema import QmpError

MAX_OBJECT = 1 << 20
"""Largest JSON object accepted (bytes); a client sending more is answered and disconnected."""
MAX_DEPTH = 256
"""Deepest nesting accepted (QEMU allows 1024; Python's json recursion limit is the tighter bound here)."""
_STRUCTURAL = frozenset(b"{}[]:,\"-+.")
_WHITESPACE = frozenset(b" \t\r\n")


def _allowed_outside_string(byte: int) -> bool:
    return (byte in _STRUCTURAL or byte in _WHITESPACE or 0x30 <= byte <= 0x39
            or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A)


@dataclass(frozen=True)
class Frame:
    """One unit cut from the stream: the text of a JSON value, or a framing error to report."""

    text: bytes = b""
    error: str | None = None
    fatal: bool = False


class JsonSplitter:
    """Cuts a byte stream into top-level JSON values without parsing them.

    Values are objects or arrays (tracked by nesting) or bare tokens at top level (cut at whitespace or
    an opening bracket). A byte that cannot appear in JSON outside a string, or a raw control character
    inside a string, ends the current value with an error and resynchronises, as QEMU's lexer does.
    """

    def __init__(self, limit: int = MAX_OBJECT) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = self._bare = False

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        for byte in data:
            if self._bare:
                if byte in _WHITESPACE or byte in (0x7B, 0x5B):
                    frames.append(Frame(bytes(self._buf)))
                    self._reset()
                    if byte in _WHITESPACE:
                        continue
                else:
                    self._buf.append(byte)
                    if len(self._buf) > self.limit:
                        self._reset()
                        frames.append(Frame(error=f"JSON parse error, input exceeds {self.limit} bytes",
                                            fatal=True))
                        return frames
                    continue
            if self._depth == 0 and not self._in_string:
                if byte in _WHITESPACE:
                    continue
                if byte in (0x7B, 0x5B):
                    self._buf.append(byte)
                    self._depth = 1
                elif byte in (0x7D, 0x5D):
                    frames.append(Frame(error=f"JSON parse error, stray '{chr(byte)}'"))
                elif byte == 0x22:
                    self._buf.append(byte)
                    self._in_string = True
                else:
                    self._buf.append(byte)
                    self._bare = True
                continue
            self._buf.append(byte)
            if len(self._buf) > self.limit:
                self._reset()
                frames.append(Frame(error=f"JSON parse error, input exceeds {self.limit} bytes", fatal=True))
                return frames
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif byte == 0x5C:
                    self._escape = True
                elif byte == 0x22:
                    self._in_string = False
                    if self._depth == 0:  # a bare string at top level
                        frames.append(Frame(bytes(self._buf)))
                        self._reset()
                elif byte < 0x20:
                    self._reset()
                    frames.append(Frame(error="JSON parse error, control character in a string"))
                continue
            if byte == 0x22:
                self._in_string = True
            elif byte in (0x7B, 0x5B):
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    self._reset()
                    frames.append(Frame(error="JSON parse error, nesting too deep"))
            elif byte in (0x7D, 0x5D):
                self._depth -= 1
                if self._depth == 0:
                    frames.append(Frame(bytes(self._buf)))
                    self._reset()
            elif not _allowed_outside_string(byte):
                self._reset()
                frames.append(Frame(error=f"JSON parse error, invalid byte 0x{byte:02x}"))
        return frames


def greeting() -> dict[str, Any]:
    return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": PACKAGE}, "capabilities": []}}


def timestamp() -> dict[str, int]:
    now = time.time_ns() // 1000
    return {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}


Execute = Callable[[str, dict[str, Any]], Any]
_ALLOWED_KEYS = ("execute", "arguments", "id")


class QmpSession:
    """The protocol state of one client. ``execute(name, args)`` runs a validated command."""

    def __init__(self, execute: Execute, send: Callable[[bytes], None], *, pretty: bool = False) -> None:
        self._execute = execute
        self._send = send
        self._pretty = pretty
        self._splitter = JsonSplitter()
        self.negotiated = False
        self.closing = False
        """Set when the client sent something that ends the session (oversized input)."""

    # -- output -----------------------------------------------------------------------------------------
    def _write(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, indent=4 if self._pretty else None)
        self._send(text.encode() + b"\r\n")

    def start(self) -> None:
        self._write(greeting())

    def send_event(self, name: str, data: dict[str, Any], stamp: dict[str, int] | None = None) -> None:
        """Deliver an event; a client still negotiating capabilities gets none (as QEMU)."""
        if not self.negotiated or self.closing:
            return
        message: dict[str, Any] = {"event": name}
        if data or schema.EVENTS_BY_NAME.get(name, schema.Event(name, (), "")).data:
            message["data"] = data
        message["timestamp"] = stamp or timestamp()
        self._write(message)

    def _error(self, desc: str, error_class: str = "GenericError", ident: Any = None, has_id: bool = False) -> None:
        message: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
        if has_id:
            message["id"] = ident
        self._write(message)

    # -- input ------------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.closing:
            return
        for frame in self._splitter.feed(data):
            if frame.error is not None:
                self._error(frame.error)
                if frame.fatal:
                    self.closing = True
                    return
                continue
            self._handle_text(frame.text)
            if self.closing:
                return

    def _handle_text(self, text: bytes) -> None:
        try:
            message = json.loads(text.decode("utf-8"))
        except UnicodeDecodeError:
            self._error("JSON parse error, invalid UTF-8 sequence")
            return
        except (ValueError, RecursionError) as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            self._error(f"JSON parse error, {reason}")
            return
        self.handle_message(message)

    def handle_message(self, message: Any) -> None:
        """Answer one parsed request."""
        if not isinstance(message, dict):
            self._error("QMP input must be a JSON object")
            return
        has_id = "id" in message
        ident = message.get("id")
        try:
            value = self._dispatch(message)
        except QmpError as error:
            self._error(error.desc, error.error_class, ident, has_id)
            return
        except Exception as error:  # a bug in a command: the client gets its message, the VM runs on
            self._error(f"internal error in '{message.get('execute')}': {type(error).__name__}: {error}",
                        ident=ident, has_id=has_id)
            return
        after = None
        if isinstance(value, Reply):
            value, after = value.value, value.after
        reply: dict[str, Any] = {"return": value}
        if has_id:
            reply["id"] = ident
        self._write(reply)
        if after is not None:
            after()

    def _dispatch(self, message: dict[str, Any]) -> Any:
        for key in message:
            if key == "exec-oob":
                raise QmpError("QMP input member 'exec-oob' is unexpected (out-of-band execution is not enabled)")
            if key not in _ALLOWED_KEYS:
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" not in message:
            raise QmpError("QMP input lacks member 'execute'")
        name = message["execute"]
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        arguments = message.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        command = schema.COMMANDS_BY_NAME.get(name)
        if not self.negotiated:
            if command is None or not command.allow_before_negotiation:
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        if command is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        if name == "qmp_capabilities":
            if self.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
            schema.validate_arguments(command, arguments)
            for capability in arguments.get("enable", []):
                raise QmpError(f"Capability '{capability}' not available")
            self.negotiated = True
            return {}
        schema.validate_arguments(command, arguments)
        return self._execute(name, arguments)
