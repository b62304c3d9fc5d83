"""pyemu.system.digest gives hashlib's SHA-256 digests, with or without CPython's built-in module."""

from __future__ import annotations

import hashlib
import sys

import pytest

from pyemu.system import digest


@pytest.mark.parametrize("data", [b"", b"abc", bytes(range(256)) * 300])
def test_same_digest_as_hashlib(data: bytes) -> None:
    ours = digest.sha256(data[:7])
    ours.update(data[7:])
    assert ours.hexdigest() == hashlib.sha256(data).hexdigest()


def test_falls_back_to_hashlib_without_the_builtin_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "_sha256", None)  # None in sys.modules: the import raises ImportError
    monkeypatch.setitem(sys.modules, "_sha2", None)
    assert digest._find_constructor() is hashlib.sha256
    assert digest.sha256(b"abc").hexdigest() == hashlib.sha256(b"abc").hexdigest()
