"""The virtio-mmio transport and virtio-rng, driven by the Python test driver through the register window."""

from __future__ import annotations

import struct

import pytest

from pyemu.hw.virtio import mmio as regs
from pyemu.hw.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, ID_RNG
from pyemu.hw.virtio.rng import EntropySource, RngConfig, VirtioRng
from pyemu.hw.core.state import StateError
from pyemu.hw.virtio.mmio import VirtioMmioState

from .conftest import Rig, wait_for


def make_rng(max_bytes: int = (1 << 63) - 1, period_ms: int = 1 << 16) -> VirtioRng:
    return VirtioRng(EntropySource("/dev/urandom"), RngConfig("/dev/urandom", max_bytes, period_ms))


def test_identification_registers(rig: Rig) -> None:
    transport, driver, _ = rig.plug(make_rng())
    assert driver.reg(regs.REG_MAGIC) == 0x74726976
    assert driver.reg(regs.REG_VERSION) == 2
    assert driver.reg(regs.REG_DEVICE_ID) == ID_RNG
    assert driver.reg(regs.REG_VENDOR_ID) == 0x554D4551
    features = driver.device_features()
    assert features & F_VERSION_1 and features & F_INDIRECT_DESC and features & F_EVENT_IDX
    driver.set_reg(regs.REG_QUEUE_SEL, 0)
    assert driver.reg(regs.REG_QUEUE_NUM_MAX) == 64
    driver.set_reg(regs.REG_QUEUE_SEL, 5)
    assert driver.reg(regs.REG_QUEUE_NUM_MAX) == 0


def test_features_without_version_1_are_refused(rig: Rig) -> None:
    _, driver, _ = rig.plug(make_rng())
    driver.set_reg(regs.REG_STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER)
    driver.set_reg(regs.REG_DRIVER_FEATURES_SEL, 1)
    driver.set_reg(regs.REG_DRIVER_FEATURES, 0)
    driver.set_reg(regs.REG_STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER | regs.STATUS_FEATURES_OK)
    assert not driver.status & regs.STATUS_FEATURES_OK


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("event_idx", [False, True])
def test_rng_fills_buffers(rig: Rig, indirect: bool, event_idx: bool) -> None:
    _, driver, interrupt = rig.plug(make_rng())
    driver.initialise(event_idx=event_idx, queues={0: 16})
    buffers = [driver.buffer(64), driver.buffer(100)]
    head = driver.submit(0, [(buffers[0], 64, True), (buffers[1], 100, True)], indirect=indirect)
    [(used_head, written)] = driver.wait_used(0)
    assert (used_head, written) == (head, 164)
    data = driver.memory.read(buffers[0], 64) + driver.memory.read(buffers[1], 100)
    assert data != bytes(164)
    assert wait_for(lambda: interrupt.count >= 1)
    assert driver.ack_interrupt() & regs.INT_USED_BUFFER
    assert (buffers[0], 64) in rig.written and (buffers[1], 100) in rig.written


def test_many_requests_in_a_row(rig: Rig) -> None:
    _, driver, _ = rig.plug(make_rng())
    driver.initialise(event_idx=True, queues={0: 8})
    total = 0
    for _ in range(50):  # wraps the 8-entry ring several times
        buffer = driver.buffer(16)
        driver.submit(0, [(buffer, 16, True)])
        total += sum(w for _, w in driver.wait_used(0))
    assert total == 50 * 16


def test_rate_limit_holds_requests_until_the_next_period(rig: Rig) -> None:
    device = make_rng(max_bytes=32, period_ms=2000)
    _, driver, _ = rig.plug(device)
    driver.initialise(queues={0: 8})
    first = driver.buffer(32)
    driver.submit(0, [(first, 32, True)])
    assert driver.wait_used(0)[0][1] == 32
    second = driver.buffer(32)
    driver.submit(0, [(second, 32, True)])
    # The budget of this period is spent: nothing completes now (the period is long enough that even a
    # busy host cannot get past it between the two checks), then the next period serves the request.
    assert not wait_for(lambda: bool(driver.used(0)), timeout=0.1)
    assert driver.wait_used(0, timeout=10)[0][1] == 32
    assert device.bytes_given == 64


def test_malformed_chain_marks_device_broken_and_another_keeps_serving(rig: Rig) -> None:
    transport, driver, interrupt = rig.plug(make_rng())
    other_transport, other, _ = rig.plug(make_rng())
    driver.initialise(queues={0: 8})
    other.initialise(queues={0: 8})
    queue = driver.queues[0]
    # A two-descriptor loop: 0 -> 1 -> 0.
    buffer = driver.buffer(8)
    driver.write_desc(queue.desc, 0, buffer, 8, 2 | 1, 1)
    driver.write_desc(queue.desc, 1, buffer, 8, 2 | 1, 0)
    driver.offer(0, 0)
    driver.kick(0)
    assert wait_for(lambda: bool(driver.status & regs.STATUS_DEVICE_NEEDS_RESET))
    assert "loop" in (transport.broken_reason or "")
    assert wait_for(lambda: interrupt.count >= 1)
    assert driver.reg(regs.REG_INTERRUPT_STATUS) & regs.INT_CONFIG_CHANGE
    good = other.buffer(8)
    other.submit(0, [(good, 8, True)])
    assert other.wait_used(0)[0][1] == 8
    assert not other_transport.broken
    # A driver reset brings the broken device back.
    driver.initialise(queues={0: 8})
    assert not transport.broken
    fresh = driver.buffer(8)
    driver.submit(0, [(fresh, 8, True)])
    assert driver.wait_used(0)[0][1] == 8


def test_ring_outside_ram_is_refused(rig: Rig) -> None:
    transport, driver, _ = rig.plug(make_rng())
    driver.set_reg(regs.REG_STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER)
    driver.set_reg(regs.REG_QUEUE_SEL, 0)
    driver.set_reg(regs.REG_QUEUE_NUM, 8)
    driver.set_reg(regs.REG_QUEUE_DESC_LOW, 0xFFFF0000)
    driver.set_reg(regs.REG_QUEUE_READY, 1)
    assert driver.reg(regs.REG_QUEUE_READY) == 0
    assert driver.status & regs.STATUS_DEVICE_NEEDS_RESET
    assert "outside guest RAM" in (transport.broken_reason or "")


def test_queue_size_must_be_a_power_of_two(rig: Rig) -> None:
    transport, driver, _ = rig.plug(make_rng())
    driver.set_reg(regs.REG_QUEUE_SEL, 0)
    driver.set_reg(regs.REG_QUEUE_NUM, 12)
    driver.set_reg(regs.REG_QUEUE_READY, 1)
    assert transport.broken and "power of two" in (transport.broken_reason or "")


def test_odd_sized_register_access_is_ignored(rig: Rig) -> None:
    transport, driver, _ = rig.plug(make_rng())
    assert transport.read(regs.REG_MAGIC, 2) == 0
    transport.write(regs.REG_STATUS, 1, 0xFF)
    assert driver.status == 0


def test_state_round_trip_and_validation(rig: Rig) -> None:
    transport, driver, _ = rig.plug(make_rng())
    driver.initialise(queues={0: 8})
    buffer = driver.buffer(8)
    driver.submit(0, [(buffer, 8, True)])
    driver.wait_used(0)
    state = transport.state()
    hash(state)
    assert state.queues[0].used_idx == 1 and state.queues[0].ready
    clone, _, _ = rig.plug(make_rng())
    clone.from_state(state)
    assert clone.state() == state
    before = clone.state()
    with pytest.raises(StateError):
        clone.from_state(VirtioMmioState(queues=state.queues[:0]))
    bad_queue = state.queues[0].__class__(size=8, ready=True, desc_addr=1 << 40, avail_addr=0, used_addr=0)
    with pytest.raises(StateError):
        clone.from_state(VirtioMmioState(status=state.status, driver_features=state.driver_features,
                                         queues=(bad_queue,)))
    assert clone.state() == before
    # The restored device goes on where the original was.
    driver.window = clone
    nxt = driver.buffer(8)
    driver.submit(0, [(nxt, 8, True)])
    assert driver.wait_used(0)[0][1] == 8


def test_avail_index_far_ahead_is_a_guest_error(rig: Rig) -> None:
    transport, driver, _ = rig.plug(make_rng())
    driver.initialise(queues={0: 8})
    driver.memory.write(driver.queues[0].avail + 2, struct.pack("<H", 100))
    driver.kick(0)
    assert wait_for(lambda: transport.broken)
    assert "ahead" in (transport.broken_reason or "")
