"""The software CPU's ioeventfd table (accel/tcg/mmio_notify.c): which device-window writes become an
eventfd signal in C and which still reach the window's Python callback."""

from __future__ import annotations

from typing import Any

import pytest

from pyemu.accel.tcg.block_gate import load_gate_module
from pyemu.accel.tcg.errors import TcgError
from pyemu.accel.tcg.mmio_notify import SLOTS, STATUS_SLOTS, MmioNotifiers
from pyemu.system.event_notifier import EventNotifier
from pyemu.system.shared_word import LockedWord, shared_word

BASE = 0xD000_0000
NOTIFY = BASE + 0x50
STATUS = BASE + 0x60
ACK = BASE + 0x64


class Window:
    """One device window driven through the C callback, as the engine calls it."""

    def __init__(self, table: MmioNotifiers, base: int = BASE) -> None:
        module = table.module
        self.ffi: Any = module.ffi
        self.lib: Any = module.lib
        self.python_writes: list[tuple[int, int, int]] = []

        @self.ffi.callback("void (*)(void *, uint64_t, unsigned, uint64_t, void *)")
        def py_write(_uc: Any, offset: int, size: int, value: int, _key: Any) -> None:
            self.python_writes.append((offset, size, value))
        self._py_write = py_write
        self.state = self.ffi.new("struct pyemu_mmio_window *")
        self.state.base = base
        self.state.notify = table.state
        self.state.py_write = py_write
        self.python_reads: list[tuple[int, int]] = []

        @self.ffi.callback("uint64_t (*)(void *, uint64_t, unsigned, void *)")
        def py_read(_uc: Any, offset: int, size: int, _key: Any) -> int:
            self.python_reads.append((offset, size))
            return 0xABCD
        self._py_read = py_read
        self.state.py_read = py_read

    def write(self, addr: int, size: int, value: int) -> None:
        self.lib.pyemu_mmio_write(self.ffi.NULL, addr - self.state.base, size, value, self.state)

    def read(self, addr: int, size: int) -> int:
        return int(self.lib.pyemu_mmio_read(self.ffi.NULL, addr - self.state.base, size, self.state))


@pytest.fixture
def table():  # type: ignore[no-untyped-def]
    notifiers = MmioNotifiers(load_gate_module())
    yield notifiers
    notifiers.close()


def test_a_matching_write_signals_the_notifier_without_python(table: MmioNotifiers) -> None:
    queue0, queue1 = EventNotifier("q0"), EventNotifier("q1")
    try:
        assert table.bind(queue0, NOTIFY, 4, 0) and table.bind(queue1, NOTIFY, 4, 1)
        window = Window(table)
        window.write(NOTIFY, 4, 1)
        assert window.python_writes == []
        assert queue1.test_and_clear() and not queue0.test_and_clear()
        window.write(NOTIFY, 4, 0)
        window.write(NOTIFY, 4, 0)  # two kicks before the I/O thread looks: still one wake-up
        assert queue0.test_and_clear() and not queue1.test_and_clear()
        assert table.hits == 3
    finally:
        queue0.close()
        queue1.close()


def test_other_writes_reach_python(table: MmioNotifiers) -> None:
    queue0 = EventNotifier("q0")
    try:
        table.bind(queue0, NOTIFY, 4, 0)
        window = Window(table)
        window.write(NOTIFY, 4, 7)          # a queue that is not bound: the device logs it
        window.write(NOTIFY, 2, 0)          # a 2-byte write is not the 4-byte register's
        window.write(NOTIFY + 4, 4, 0)      # another register
        window.write(NOTIFY, 4, 1 << 32)    # more than the register holds
        assert window.python_writes == [(0x50, 4, 7), (0x50, 2, 0), (0x54, 4, 0), (0x50, 4, 1 << 32)]
        assert not queue0.test_and_clear()
        assert table.hits == 0
    finally:
        queue0.close()


def test_the_table_keeps_its_own_descriptor_and_unbinds_on_close(table: MmioNotifiers) -> None:
    queue0 = EventNotifier("q0")
    table.bind(queue0, NOTIFY, 4, 0)
    window = Window(table)
    fd = queue0.fileno()
    queue0.close()  # the device went away first: the table's duplicate still names the same eventfd
    window.write(NOTIFY, 4, 0)
    assert window.python_writes == [] and table.hits == 1
    table.close()
    window.write(NOTIFY, 4, 0)
    assert window.python_writes == [(0x50, 4, 0)]
    assert table.hits == 1 and fd >= 0


def test_a_full_table_leaves_further_bindings_to_python(table: MmioNotifiers) -> None:
    notifiers = [EventNotifier(f"q{i}") for i in range(SLOTS + 1)]
    try:
        bound = [table.bind(notifier, NOTIFY, 4, index) for index, notifier in enumerate(notifiers)]
        assert bound == [True] * SLOTS + [False]
        window = Window(table)
        window.write(NOTIFY, 4, SLOTS)
        assert window.python_writes == [(0x50, 4, SLOTS)]
        window.write(NOTIFY, 4, SLOTS - 1)
        assert notifiers[SLOTS - 1].test_and_clear()
    finally:
        for notifier in notifiers:
            notifier.close()


def test_only_four_byte_registers_can_be_bound(table: MmioNotifiers) -> None:
    queue0 = EventNotifier("q0")
    try:
        with pytest.raises(TcgError, match="only 4-byte"):
            table.bind(queue0, NOTIFY, 2, 0)
    finally:
        queue0.close()


def test_interrupt_status_is_read_and_acknowledged_in_c(table: MmioNotifiers) -> None:
    word = shared_word()
    assert table.bind_status(STATUS, word)
    window = Window(table)
    word.set_bits(0b11)                     # a used buffer and a config change (the I/O thread's side)
    assert window.read(STATUS, 4) == 0b11
    window.write(ACK, 4, 0b01)              # the driver acknowledges the used buffer only
    assert word.load() == 0b10
    window.write(ACK, 4, 0xFFFF_FFFF)
    assert word.load() == 0 and window.read(STATUS, 4) == 0
    assert window.python_reads == [] and window.python_writes == []
    assert table.status_hits == 4  # two reads, two acknowledgements


def test_other_status_accesses_reach_python(table: MmioNotifiers) -> None:
    word = shared_word()
    table.bind_status(STATUS, word)
    word.set_bits(1)
    window = Window(table)
    assert window.read(STATUS, 2) == 0xABCD     # not the 4-byte register: the device logs it
    assert window.read(ACK, 4) == 0xABCD        # InterruptACK is write-only: the device answers
    assert window.read(BASE + 0x70, 4) == 0xABCD
    window.write(STATUS, 4, 1)                  # InterruptStatus is read-only
    window.write(ACK, 2, 1)
    assert window.python_reads == [(0x60, 2), (0x64, 4), (0x70, 4)]
    assert window.python_writes == [(0x60, 4, 1), (0x64, 2, 1)]
    assert word.load() == 1 and table.status_hits == 0


def test_status_bindings_end_at_close_and_when_the_table_is_full(table: MmioNotifiers) -> None:
    words = [shared_word() for _ in range(STATUS_SLOTS + 1)]
    bound = [table.bind_status(BASE + 0x1000 * i + 0x60, w) for i, w in enumerate(words)]
    assert bound == [True] * STATUS_SLOTS + [False]
    assert not table.bind_status(STATUS + 0x100000, LockedWord())   # no C address: Python serves it
    window = Window(table)
    words[0].set_bits(1)
    assert window.read(STATUS, 4) == 1
    table.close()
    assert window.read(STATUS, 4) == 0xABCD and window.python_reads == [(0x60, 4)]
