"""The device contract and manager: creation order, ids, bus ranges, reset, AML, states; and the rule that
a device model raising during an access is the device's problem (logged, marked broken) and never the
vCPU's."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.errors import BusError, ConfigError
from pyemu.hw.core.device import BoardDevice, DeviceManager, IoRange
from pyemu.hw.core.state import DeviceState, StateError, check_state
from pyemu.system.bus import mmio_bus, pio_bus


@dataclass(frozen=True)
class CounterState(DeviceState):
    VERSION = 1
    value: int = 0


class Counter:
    """A register that counts writes; raises on a write of 0xdead (a device bug)."""

    def __init__(self, log: list[str], name: str) -> None:
        self.value = 0
        self.log = log
        self.name = name
        self.broken: str | None = None

    def read(self, offset: int, size: int) -> int:
        if offset == 4:
            raise RuntimeError("bug in the read path")
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        if value == 0xDEAD:
            raise ValueError("bug in the write path")
        self.value += 1

    def reset(self) -> None:
        self.log.append(f"reset {self.name}")
        self.value = 0

    def close(self) -> None:
        self.log.append(f"close {self.name}")

    def fail(self, reason: str) -> None:
        self.broken = reason

    def state(self) -> CounterState:
        return CounterState(value=self.value)

    def from_state(self, state: DeviceState) -> None:
        self.value = check_state(self.name, state, CounterState).value


def make() -> tuple[DeviceManager, ExitDispatcher, list[str]]:
    pio, mmio = pio_bus(), mmio_bus()
    return DeviceManager(pio, mmio), ExitDispatcher(pio, mmio), []


def test_devices_are_kept_in_creation_order_and_registered() -> None:
    manager, dispatcher, log = make()
    a, b = Counter(log, "a"), Counter(log, "b")
    manager.add(BoardDevice("a", a, ranges=(IoRange("pio", 0x100, 8, a),), aml=b"AML-A"))
    manager.add(BoardDevice("b", b, ranges=(IoRange("mmio", 0x1000, 0x100, b, own_lock=True),)))
    dispatcher.io_out(0x100, 1, 1)
    dispatcher.mmio_write(0x1000, 4, 1)
    dispatcher.mmio_write(0x1000, 4, 1)
    assert (a.value, b.value) == (1, 2)
    assert manager.ids() == ["a", "b"]
    assert manager.aml() == [b"AML-A"]
    assert manager.states() == {"a": CounterState(value=1), "b": CounterState(value=2)}
    manager.reset_all()
    manager.close_all()
    assert log == ["reset a", "reset b", "close b", "close a"]


def test_duplicate_ids_and_overlaps_are_refused_without_half_registration() -> None:
    manager, dispatcher, log = make()
    a = Counter(log, "a")
    manager.add(BoardDevice("a", a, ranges=(IoRange("pio", 0x100, 8, a),)))
    with pytest.raises(ConfigError, match="Duplicate ID 'a'"):
        manager.add(BoardDevice("a", Counter(log, "x")))
    c = Counter(log, "c")
    with pytest.raises(BusError):
        manager.add(BoardDevice("c", c, ranges=(IoRange("pio", 0x200, 4, c), IoRange("pio", 0x104, 4, c))))
    assert dispatcher.pio.find(0x200) is None  # the first range of the refused device is gone again
    assert manager.ids() == ["a"]


def test_generated_ids_are_unique() -> None:
    manager, _, log = make()
    first = manager.new_id("virtio-blk-device")
    manager.add(BoardDevice(first, Counter(log, "1")))
    second = manager.new_id("virtio-blk-device")
    assert first != second


def test_a_raising_device_is_marked_broken_and_the_caller_goes_on() -> None:
    manager, dispatcher, log = make()
    a = Counter(log, "a")
    manager.add(BoardDevice("a", a, ranges=(IoRange("mmio", 0x1000, 0x100, a),)))
    dispatcher.mmio_write(0x1000, 4, 0xDEAD)          # no exception reaches the vCPU
    assert a.broken is not None and "bug in the write path" in a.broken
    assert dispatcher.mmio_read(0x1004, 4) == 0xFFFFFFFF
    assert dispatcher.device_failures == 2
    assert manager.get("a").failures[-1].startswith("mmio read at 0x1004 failed: RuntimeError")
    dispatcher.mmio_write(0x1000, 4, 1)               # the device still serves what it can
    assert a.value == 1


def test_own_lock_devices_are_called_without_the_big_lock() -> None:
    manager, dispatcher, log = make()
    seen: list[bool] = []

    class Probe(Counter):
        def write(self, offset: int, size: int, value: int) -> None:
            acquired = dispatcher.lock.acquire(blocking=False)  # RLock: only fails if another thread holds it
            seen.append(acquired)
            if acquired:
                dispatcher.lock.release()

    probe = Probe(log, "p")
    manager.add(BoardDevice("p", probe, ranges=(IoRange("mmio", 0x1000, 4, probe, own_lock=True),)))
    holder_ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        with dispatcher.lock:
            holder_ready.set()
            release.wait(5)
    thread = threading.Thread(target=hold)
    thread.start()
    holder_ready.wait(5)
    try:
        dispatcher.mmio_write(0x1000, 4, 1)  # would block forever if it took the big lock
    finally:
        release.set()
        thread.join()
    assert seen == [False]


def test_state_of_a_stateless_device_cannot_be_loaded() -> None:
    manager, _, _ = make()
    device = manager.add(BoardDevice("plain", object()))
    assert device.state() is None
    with pytest.raises(StateError):
        device.from_state(CounterState())


class Burster(Counter):
    """A Counter that takes posted bursts too; a burst containing 0xad is a device bug."""

    def __init__(self, log: list[str], name: str) -> None:
        super().__init__(log, name)
        self.bursts: list[tuple[int, bytes]] = []

    def write_burst(self, offset: int, data: bytes) -> None:
        if 0xAD in data:
            raise ValueError("bug in the burst path")
        self.bursts.append((offset, data))


def test_posted_bursts_go_to_write_burst_or_byte_by_byte_and_a_failure_marks_the_device() -> None:
    manager, dispatcher, log = make()
    plain, burster = Counter(log, "plain"), Burster(log, "burster")
    manager.add(BoardDevice("plain", plain, ranges=(IoRange("pio", 0x3F8, 8, plain),)))
    manager.add(BoardDevice("burster", burster, ranges=(IoRange("pio", 0x2F8, 8, burster),)))
    dispatcher.io_out_burst(0x3F8, b"abc")          # no write_burst: three writes
    assert plain.value == 3
    dispatcher.io_out_burst(0x2F9, b"xyz")
    assert burster.bursts == [(1, b"xyz")] and burster.value == 0
    dispatcher.io_out_burst(0x2F8, b"\xad")          # no exception reaches the vCPU
    assert burster.broken is not None and "bug in the burst path" in burster.broken
    dispatcher.io_out_burst(0x80, b"lost")           # nothing there: dropped like any unassigned write
