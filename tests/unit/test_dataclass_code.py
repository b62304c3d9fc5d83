"""The dataclass method cache: pyemu's dataclasses reuse compiled methods, and nothing else changes."""

from __future__ import annotations

import dataclasses
import marshal
import subprocess
import sys
from pathlib import Path

import pytest

from pyemu.system import dataclass_code
from pyemu.system.dataclass_code import _Table

SOURCE = "def __create_fn__():\n def f(x):\n  return x + 1\n return f"


def _make(table: _Table, module: str, monkeypatch: pytest.MonkeyPatch) -> type:
    monkeypatch.setattr(dataclass_code, "_table", table)
    namespace = {"__module__": module, "__annotations__": {"a": "int", "b": "str"}}
    cls = type("Point", (), namespace)
    monkeypatch.setitem(sys.modules, module, type(sys)(module))
    return dataclasses.dataclass(frozen=True)(cls)


def test_pyemu_classes_are_served_from_the_table_and_the_table_is_saved(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = tmp_path / "methods.marshal"
    first = _Table(path)
    cls = _make(first, "pyemu.fake_module", monkeypatch)
    point = cls(1, "x")
    assert (point.a, point.b, repr(point)) == (1, "x", "Point(a=1, b='x')")
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.a = 2  # type: ignore[misc]
    first.save()
    stored = marshal.loads(path.read_bytes())
    assert len(stored) == 6  # __init__, __repr__, __eq__, __setattr__, __delattr__, __hash__

    # A later process: every method comes from the table (none compiled), and behaves the same.
    second = _Table(path)
    compiled: list[str] = []
    real_compile = compile
    monkeypatch.setattr(dataclass_code, "compile", lambda *a: compiled.append(a[0]) or real_compile(*a),
                        raising=False)
    again = _make(second, "pyemu.fake_module", monkeypatch)
    assert compiled == []
    assert again(1, "x") == again(1, "x") and hash(again(1, "x")) == hash(again(1, "x"))
    assert repr(again(2, "y")) == "Point(a=2, b='y')"


def test_the_table_is_what_is_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code stored for a source is what runs: so a source is the key, never a class or module name."""
    path = tmp_path / "methods.marshal"
    path.write_bytes(marshal.dumps({SOURCE: compile(SOURCE.replace("x + 1", "x + 2"), "<string>", "exec")}))
    monkeypatch.setattr(dataclass_code, "_table", _Table(path))
    namespace: dict[str, object] = {}
    dataclass_code._exec(SOURCE, {"__name__": "pyemu.anything"}, namespace)
    assert namespace["__create_fn__"]()(1) == 3  # type: ignore[operator]
    other: dict[str, object] = {}
    dataclass_code._exec(SOURCE, {"__name__": "someone_else"}, other)  # not pyemu's: compiled as usual
    assert other["__create_fn__"]()(1) == 2  # type: ignore[operator]


def test_entries_stay_marshalled_until_used_and_a_damaged_one_is_compiled(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    path = tmp_path / "methods.marshal"
    table = _Table(path)
    _make(table, "pyemu.fake_module", monkeypatch)
    table.save()
    stored = marshal.loads(path.read_bytes())
    assert len(stored) == 6 and all(isinstance(code, bytes) for code in stored.values())
    later = _Table(path)
    later.compiled(next(iter(stored)))
    assert sum(not isinstance(code, bytes) for code in (later._code or {}).values()) == 1  # only the one used

    path.write_bytes(marshal.dumps({source: b"not code" for source in stored}))
    compiled: list[str] = []
    real_compile = compile
    monkeypatch.setattr(dataclass_code, "compile", lambda *a: compiled.append(a[0]) or real_compile(*a),
                        raising=False)
    cls = _make(_Table(path), "pyemu.fake_module", monkeypatch)
    assert len(compiled) == 6 and repr(cls(3, "z")) == "Point(a=3, b='z')"


@pytest.mark.parametrize("content", [b"", b"not marshal", marshal.dumps([1, 2]), marshal.dumps({"a": 1})])
def test_a_damaged_table_is_an_empty_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    path = tmp_path / "methods.marshal"
    path.write_bytes(content)
    cls = _make(_Table(path), "pyemu.fake_module", monkeypatch)
    assert cls(3, "z").a == 3


def test_nothing_is_written_without_bytecode_writing_or_without_anything_new(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "methods.marshal"
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    table = _Table(path)
    _make(table, "pyemu.fake_module", monkeypatch)
    table.save()
    assert not path.exists()
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    table = _Table(path)
    table.save()  # nothing compiled: nothing to write
    assert not path.exists()


def test_a_pyemu_process_writes_the_table_and_the_next_one_uses_it(tmp_path: Path) -> None:
    probe = ("import pyemu.system.config as c, pyemu.system.dataclass_code as d; "
             "print(len(d._table._code or {}), d._table._added)")
    env = {"PYEMU_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[1] == "True"
    assert (tmp_path / "pycache" / dataclass_code.table_path().name).is_file()
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    count, added = second.stdout.split()
    assert int(count) > 0 and added == "False"
