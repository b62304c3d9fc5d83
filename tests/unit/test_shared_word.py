"""pyemu.system.shared_word: the register word Python and C update concurrently."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import pyemu.system.shared_word as shared_word_module
from pyemu.system.native import OptionalNative
from pyemu.system.shared_word import AtomicWord, LockedWord, SharedWord, _module, shared_word


def _words() -> list[SharedWord]:
    module = _module.get()
    assert module is not None, "the C module should build on every supported host"
    return [AtomicWord(module), LockedWord()]


@pytest.mark.parametrize("word", _words(), ids=lambda w: type(w).__name__)
def test_set_clear_store_return_the_old_value(word: SharedWord) -> None:
    assert word.load() == 0
    assert word.set_bits(0b01) == 0
    assert word.set_bits(0b10) == 0b01
    assert word.clear_bits(0b01) == 0b11
    assert word.load() == 0b10
    word.store(0x1_FFFF_FFFF)  # a register is 32 bits wide
    assert word.load() == 0xFFFF_FFFF
    assert word.clear_bits(0xFFFF_FFFF) == 0xFFFF_FFFF and word.load() == 0


def test_only_the_atomic_word_has_an_address_for_c() -> None:
    atomic, locked = _words()
    assert isinstance(atomic.address, int) and atomic.address != 0
    assert locked.address is None
    assert isinstance(shared_word(), AtomicWord)


@pytest.mark.parametrize("word", _words(), ids=lambda w: type(w).__name__)
def test_concurrent_updates_lose_nothing(word: SharedWord) -> None:
    """One thread per bit sets and clears its own bit many times while the others do the same: a
    read-modify-write that is not atomic would lose another thread's bit along the way."""
    rounds = 2000
    stop = threading.Barrier(4)
    seen_missing = []

    def churn(bit: int) -> None:
        stop.wait()
        for _ in range(rounds):
            word.set_bits(1 << bit)
            if not word.load() & (1 << bit):
                seen_missing.append(bit)
            word.clear_bits(1 << bit)
        word.set_bits(1 << bit)  # each thread leaves its bit set

    threads = [threading.Thread(target=churn, args=(bit,)) for bit in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not seen_missing
    assert word.load() == 0b1111


def test_without_a_c_module_the_word_is_python_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that cannot build the module gets words with no address (nothing in C is handed them) and the
    build is not tried again for every word."""
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setenv("PYEMU_CACHE", str(tmp_path / "cache"))
    module = OptionalNative("broken_word", [broken], "int f(void);", what="a broken module", without="none")
    monkeypatch.setattr(shared_word_module, "_module", module)
    first = shared_word()
    assert isinstance(first, LockedWord) and first.address is None
    broken.write_text("int f(void) { return 1; }\n")  # a retry would now succeed: there is none
    assert isinstance(shared_word(), LockedWord)
