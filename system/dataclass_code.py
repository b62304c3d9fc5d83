"""Compiled dataclass methods kept from one pyemu process to the next: ~50 ms of every start.

Why: ``@dataclass`` writes the source of each method it generates (``__init__``, ``__repr__``, ``__eq__``;
for a frozen class also ``__setattr__``, ``__delattr__`` and ``__hash__``) and compiles it with ``exec``
when the class is created, at import. A VM's start creates ~100 dataclasses; compiling their ~550 methods
took 50 of its ~110 ms of imports here (2026-12-06), while QEMU's whole machine is ready in ~20 ms. What
``exec`` compiles depends on the source text alone, so this module gives the ``dataclasses`` module an
``exec`` that looks the text up in a table kept in pyemu's cache (as ``__pycache__`` keeps the modules'
bytecode), compiles only what is missing, and writes the table back at exit when it grew. The functions
are still made by ``exec`` in the class's module, exactly as before: only the compile step is skipped.

Only the classes of pyemu's own modules are served (other code's dataclasses compile as usual), nothing
is written where Python writes no bytecode (``PYTHONDONTWRITEBYTECODE``), and a missing, foreign or damaged
table is an empty one: the cache can cost a compile, never change a class.
"""

from __future__ import annotations

import atexit
import builtins
import dataclasses
import marshal
import sys
import threading
from pathlib import Path
from types import CodeType
from typing import Any

from pyemu.system.cache import cache_root, store_small_file

PACKAGE_PREFIX = "pyemu."
MAX_ENTRIES = 4096
"""A table that outgrew this (sources of many code versions) is rewritten with this process's entries."""


class _Table:
    """Source text -> compiled code, loaded on first use, saved at exit if this process added to it."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._code: dict[str, CodeType | bytes] | None = None
        """Source -> code, or its marshalled bytes until first used: a start uses a few dozen of the table's
        hundreds of entries, and unmarshalling them all took 2.5 of 3 ms (2026-12-07)."""
        self._used: set[str] = set()
        self._added = False
        self._lock = threading.Lock()

    def compiled(self, source: str) -> CodeType:
        with self._lock:
            if self._code is None:
                self._code = _load(self.path)
            code = _code_of(self._code.get(source))
            if code is None:
                code = compile(source, "<string>", "exec")  # what exec(source) would compile
                if not self._added:
                    atexit.register(self.save)
                self._added = True
            self._code[source] = code
            self._used.add(source)
            return code

    @property
    def path(self) -> Path | None:
        """Where the table lives (found on first use: pyemu may be imported where there is no home)."""
        if self._path is None:
            try:
                self._path = table_path()
            except (OSError, RuntimeError, KeyError):
                return None
        return self._path

    def save(self) -> None:
        with self._lock:
            path = self.path
            if not self._added or self._code is None or sys.dont_write_bytecode or path is None:
                return
            kept = self._code
            if len(kept) > MAX_ENTRIES:
                kept = {source: code for source, code in kept.items() if source in self._used}
            store_small_file(path, marshal.dumps({source: code if isinstance(code, bytes) else marshal.dumps(code)
                                                  for source, code in kept.items()}))
            self._added = False


def _load(path: Path | None) -> dict[str, CodeType | bytes]:
    """The table as saved: source -> marshalled code (each unmarshalled when first used)."""
    if path is None:
        return {}
    try:
        table = marshal.loads(path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    if not isinstance(table, dict):
        return {}
    return {source: code for source, code in table.items()
            if isinstance(source, str) and isinstance(code, (bytes, CodeType))}


def _code_of(entry: CodeType | bytes | None) -> CodeType | None:
    """An entry's code; None for none, or for bytes that are not marshalled code (then it is compiled)."""
    if not isinstance(entry, bytes):
        return entry
    try:
        code = marshal.loads(entry)
    except (EOFError, ValueError, TypeError):
        return None
    return code if isinstance(code, CodeType) else None


def table_path() -> Path:
    """Per Python version: marshal's format and code objects are the interpreter's own."""
    return cache_root() / "pycache" / f"dataclass-methods.{sys.implementation.cache_tag}.marshal"


_table = _Table()


def _exec(source: Any, globals: dict[str, Any] | None = None, locals: dict[str, Any] | None = None) -> None:
    """``exec`` as the dataclasses module calls it, with pyemu's sources compiled once per cache."""
    if isinstance(source, str) and globals is not None and str(globals.get("__name__", "")).startswith(PACKAGE_PREFIX):
        source = _table.compiled(source)
    builtins.exec(source, globals, locals)


def install() -> None:
    """Serve the dataclasses module's ``exec`` (idempotent; a module global shadows the builtin there only)."""
    dataclasses.exec = _exec  # type: ignore[attr-defined]
