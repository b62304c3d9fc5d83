"""A 32-bit device register that C code outside Python may change at the same time as Python does.

Why: virtio-mmio's InterruptStatus is set by an I/O thread (a used buffer, a config change) and cleared by
the guest's InterruptACK write on a vCPU thread. Under the software CPU those two registers are served in
C by the vCPU's window callback without entering Python (:mod:`pyemu.accel.tcg.mmio_notify`), so the value
must live in memory the C side can reach, and every read-modify-write on either side must be atomic: a
Python ``|=`` under a Python lock would lose an ACK that C made between its read and its write.

:func:`shared_word` gives an :class:`AtomicWord` (the value in C memory, changed with the compiler's atomic
builtins, ``shared_word.c`` built at first use like pyemu's other small C modules) or, where no C module
can be built, a :class:`LockedWord` (a Python int under a lock, with no address, so nothing in C is handed
the register and Python alone serves it, as before).
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from pyemu.system.native import OptionalNative

CDEF = """
uint32_t pyemu_word_load(const uint32_t *word);
void pyemu_word_store(uint32_t *word, uint32_t value);
uint32_t pyemu_word_set_bits(uint32_t *word, uint32_t bits);
uint32_t pyemu_word_clear_bits(uint32_t *word, uint32_t bits);
"""
SOURCE = Path(__file__).with_name("shared_word.c")
MASK = 0xFFFF_FFFF

_module = OptionalNative("shared_word", [SOURCE], CDEF, what="shared device registers in C",
                         without="Python serves them alone")


class SharedWord(Protocol):
    """A 32-bit value with atomic updates; ``address`` is where C may find it (None: Python only)."""

    address: int | None

    def load(self) -> int: ...

    def store(self, value: int) -> None: ...

    def set_bits(self, bits: int) -> int:
        """OR ``bits`` in; returns the value before."""
        ...

    def clear_bits(self, bits: int) -> int:
        """Clear ``bits``; returns the value before."""
        ...


class AtomicWord:
    """The value in C memory (``uint32_t``), every access one atomic builtin."""

    __slots__ = ("_cell", "_lib", "address")

    def __init__(self, module: ModuleType) -> None:
        ffi: Any = module.ffi
        self._cell = ffi.new("uint32_t *")  # zeroed; freed with this object
        self._lib = module.lib
        self.address: int | None = int(ffi.cast("uintptr_t", self._cell))

    def load(self) -> int:
        return int(self._lib.pyemu_word_load(self._cell))

    def store(self, value: int) -> None:
        self._lib.pyemu_word_store(self._cell, value & MASK)

    def set_bits(self, bits: int) -> int:
        return int(self._lib.pyemu_word_set_bits(self._cell, bits & MASK))

    def clear_bits(self, bits: int) -> int:
        return int(self._lib.pyemu_word_clear_bits(self._cell, bits & MASK))


class LockedWord:
    """The value as a Python int under a lock: for a host that cannot build the C module."""

    __slots__ = ("_value", "_lock", "address")

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()
        self.address: int | None = None

    def load(self) -> int:
        return self._value

    def store(self, value: int) -> None:
        with self._lock:
            self._value = value & MASK

    def set_bits(self, bits: int) -> int:
        with self._lock:
            old = self._value
            self._value = (old | bits) & MASK
            return old

    def clear_bits(self, bits: int) -> int:
        with self._lock:
            old = self._value
            self._value = old & ~bits & MASK
            return old


def shared_word() -> SharedWord:
    """A new zeroed word: atomic in C memory where the module builds, else Python-only."""
    module = _module.get()
    return AtomicWord(module) if module is not None else LockedWord()
