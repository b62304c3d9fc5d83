"""Device interrupts posted in C (hw/intc/apic_core.py NativeRoute): the IOAPIC names a route only for a
fixed edge to one APIC that accepts it, any change that could move or stop it makes aimed routes stale, and
a post leaves the APIC and the device's status word as the models' pulse does."""

from __future__ import annotations

import time
from functools import partial

import pytest

from pyemu.hw.core.irq import PulseInterrupt
from pyemu.hw.intc import apic_core
from pyemu.hw.intc.apic_bus import ApicBus
from pyemu.hw.intc.apic_core import native_route
from pyemu.hw.intc.ioapic import IoApic
from pyemu.hw.intc.lapic import REG_EOI, REG_SVR, LocalApic
from pyemu.system.shared_word import shared_word
from pyemu.system.timers import TimerQueue

pytestmark = pytest.mark.skipif(apic_core._module.get() is None, reason="the APIC core's C module could not be built")

VECTOR = 0x33
PIN = 5


def wr(io: IoApic, index: int, value: int) -> None:
    io.write(0x00, 4, index)
    io.write(0x10, 4, value)


def program(io: IoApic, pin: int, low: int, dest: int = 0) -> None:
    wr(io, 0x11 + 2 * pin, dest << 24)
    wr(io, 0x10 + 2 * pin, low)


def enabled_apic(apic_id: int = 0) -> LocalApic:
    apic = LocalApic(TimerQueue(clock=time.monotonic_ns), apic_id=apic_id, bsp=apic_id == 0)
    apic.write(REG_SVR, 4, 0x1FF)
    return apic


def test_only_a_fixed_edge_to_one_accepting_apic_is_a_route() -> None:
    apic = enabled_apic()
    io = IoApic(apic)
    assert io.edge_route(PIN) is None                         # masked after reset
    program(io, PIN, VECTOR)
    assert io.edge_route(PIN) == (apic, VECTOR)
    program(io, PIN, VECTOR | 1 << 15)                        # level-triggered: the EOI matters
    assert io.edge_route(PIN) is None
    program(io, PIN, VECTOR | 4 << 8)                         # NMI delivery
    assert io.edge_route(PIN) is None
    program(io, PIN, VECTOR, dest=3)                          # another APIC ID
    assert io.edge_route(PIN) is None
    program(io, PIN, VECTOR)
    apic.write(REG_SVR, 4, 0xFF)                              # software-disabled: fixed interrupts dropped
    assert io.edge_route(PIN) is None


def test_on_the_apic_bus_the_destination_must_name_one_apic() -> None:
    apics = [enabled_apic(0), enabled_apic(1)]
    bus = ApicBus(apics, current_cpu=lambda: 0)
    io = IoApic(bus)
    program(io, PIN, VECTOR, dest=1)
    assert io.edge_route(PIN) == (apics[1], VECTOR)
    program(io, PIN, VECTOR, dest=0xFF)                       # broadcast
    assert io.edge_route(PIN) is None


def test_a_post_leaves_irr_and_the_status_word_as_the_pulse_does_and_goes_stale_on_changes() -> None:
    apic = enabled_apic()
    kicks: list[int] = []
    apic.kick = lambda: kicks.append(1)
    io = IoApic(apic)
    program(io, PIN, VECTOR)
    status = shared_word()
    assert status.address is not None
    route = native_route(status.address, 1)
    assert route is not None
    assert not route.post()                                   # unarmed
    route.aim(io.edge_route(PIN))
    assert not route.stale
    assert route.post()
    assert apic.irr == 1 << VECTOR and status.load() == 1 and route.posts == 1
    route.kick()
    assert kicks == [1]
    assert apic.acknowledge_interrupt() == VECTOR
    apic.write(REG_EOI, 4, 0)

    program(io, PIN, VECTOR | 1 << 16)                        # the guest masks the pin
    assert route.stale and not route.post()
    assert apic.irr == 0 and route.posts == 1
    program(io, PIN, VECTOR)
    route.aim(io.edge_route(PIN))
    apic.write(0x20, 4, 7 << 24)                              # the APIC's ID moves away from the entry
    assert route.stale and not route.post()
    route.aim(io.edge_route(PIN))                             # no route now: stays unarmed
    assert route.stale and not route.post()


def test_the_transport_posts_through_the_route_and_aims_it_after_a_pulse() -> None:
    """virtio-mmio's used-buffer interrupt: the first goes through the models and aims the route; the
    next ones are posted, with the status bit set and the vCPU kicked, the pulse untouched."""
    import threading

    from pyemu.hw.core.dma import DmaMemory
    from pyemu.hw.virtio.mmio import INT_USED_BUFFER, VirtioMmio
    from pyemu.hw.virtio.rng import EntropySource, RngConfig, VirtioRng
    from pyemu.system.iothread import IoThread
    from pyemu.system.memory import GuestMemory

    apic = enabled_apic()
    kicks: list[int] = []
    apic.kick = lambda: kicks.append(1)
    io = IoApic(apic)
    program(io, PIN, VECTOR)
    interrupt = PulseInterrupt(io.pin(PIN), threading.RLock(), partial(io.edge_route, PIN))
    memory = GuestMemory([(0, 1 << 20)], name="irq-route-test")
    iothread = IoThread("irq-route-test")
    try:
        transport = VirtioMmio(VirtioRng(EntropySource("/dev/urandom"), RngConfig()),
                               DmaMemory(memory), interrupt, iothread)
        route = transport.interrupt_route()
        assert route is not None and not route.stale
        transport._raise(INT_USED_BUFFER)
        assert interrupt.count == 0 and route.posts == 1 and kicks == [1]
        assert transport.interrupt_status == INT_USED_BUFFER and apic.irr == 1 << VECTOR
        program(io, PIN, VECTOR | 1 << 16)                    # masked: the models latch the edge instead
        transport._raise(INT_USED_BUFFER)
        assert interrupt.count == 1 and route.posts == 1
        assert transport.interrupts == 2
    finally:
        iothread.close()
        memory.close()
