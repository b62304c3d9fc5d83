"""APIC bus: IPI and MSI routing between several local APICs, lowest-priority arbitration, INIT / SIPI / NMI
signalling and the per-CPU APIC page, on a fake clock with recording kick callbacks."""

from __future__ import annotations

import io

import pytest

from pyemu.hw.intc.apic_bus import ApicBus, CurrentCpuError
from pyemu.hw.intc.errors import InterruptControllerError, InvalidPropertyError
from pyemu.hw.intc.ioapic import IoApic
from pyemu.hw.intc.lapic import (
    DM_EXTINT,
    DM_FIXED,
    DM_INIT,
    DM_LOWEST,
    DM_NMI,
    DM_STARTUP,
    REG_DFR,
    REG_EOI,
    REG_ICR_HIGH,
    REG_ICR_LOW,
    REG_ID,
    REG_IRR,
    REG_LDR,
    REG_LVT_LINT0,
    REG_LVT_TIMER,
    REG_SVR,
    REG_TIMER_DIVIDE,
    REG_TIMER_INITIAL,
    REG_TPR,
    SHORTHAND_NONE,
    Ipi,
    LocalApic,
)
from pyemu.system import log
from pyemu.system.timers import TimerQueue
from pyemu.testing.apic import ApicRegisters
from pyemu.testing.clock import FakeClock


class Cpu(ApicRegisters):
    """One CPU's view for a test: its APIC plus the wake-ups it received."""

    def __init__(self, queue: TimerQueue, index: int) -> None:
        self.kicks = 0
        self.event_kicks = 0
        self.apic = LocalApic(queue, apic_id=index, bsp=index == 0, kick=self._kick, event_kick=self._event_kick)

    def _event_kick(self) -> None:
        self.event_kicks += 1

    def irr_has(self, vector: int) -> bool:
        return bool(self.rd(REG_IRR + 0x10 * (vector >> 5)) & (1 << (vector & 31)))

    def send(self, low: int, destination: int = 0) -> None:
        self.wr(REG_ICR_HIGH, destination << 24)
        self.wr(REG_ICR_LOW, low)

    def clear_counts(self) -> None:
        self.kicks = self.event_kicks = 0


class Rig:
    def __init__(self, cpus: int = 4) -> None:
        self.clock = FakeClock()
        self.queue = TimerQueue(clock=self.clock)
        self.cpus = [Cpu(self.queue, i) for i in range(cpus)]
        self.current = 0
        self.bus = ApicBus([cpu.apic for cpu in self.cpus], lambda: self.current)
        for cpu in self.cpus:
            cpu.enable()
            cpu.clear_counts()

    def holding(self, vector: int) -> list[int]:
        return [i for i, cpu in enumerate(self.cpus) if cpu.irr_has(vector)]

    def kicked(self) -> list[int]:
        return [i for i, cpu in enumerate(self.cpus) if cpu.kicks]

    def event_kicked(self) -> list[int]:
        return [i for i, cpu in enumerate(self.cpus) if cpu.event_kicks]


def icr(vector: int = 0, *, mode: int = DM_FIXED, logical: bool = False, shorthand: int = 0, level: int = 1,
        level_triggered: bool = False) -> int:
    return (vector | (mode << 8) | (int(logical) << 11) | (level << 14) | (int(level_triggered) << 15)
            | (shorthand << 18))


@pytest.fixture
def guest_errors(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Turn on ``-d guest_errors,unimp`` for one test and collect the log lines (the log keeps the stderr
    of import time, so it is redirected rather than captured)."""
    stream = io.StringIO()
    monkeypatch.setattr(log._state, "stream", stream)
    monkeypatch.setattr(log._state, "enabled", frozenset({"guest_errors", "unimp"}))
    return stream


# -- IPIs: destinations -----------------------------------------------------------------------------------
def test_fixed_ipi_to_physical_id_lands_only_there() -> None:
    rig = Rig()
    rig.cpus[0].send(icr(0x40), destination=2)
    assert rig.holding(0x40) == [2]
    assert rig.kicked() == [2]
    assert rig.event_kicked() == []  # a maskable interrupt does not need the IF-ignoring wake-up
    assert rig.cpus[2].apic.acknowledge_interrupt() == 0x40
    assert rig.cpus[0].rd(REG_ICR_LOW) & (1 << 12) == 0  # delivery status idle: delivered synchronously


def test_physical_broadcast_reaches_everyone_once() -> None:
    rig = Rig()
    rig.cpus[1].send(icr(0x41), destination=0xFF)
    assert rig.holding(0x41) == [0, 1, 2, 3]
    assert [cpu.kicks for cpu in rig.cpus] == [1, 1, 1, 1]  # the sender is not delivered to twice
    rig.cpus[1].send(icr(2, mode=DM_NMI), destination=0xFF)
    assert [cpu.event_kicks for cpu in rig.cpus] == [1, 1, 1, 1]
    assert all(cpu.apic.take_nmi() for cpu in rig.cpus)


def test_shorthand_all_including_and_excluding_self() -> None:
    rig = Rig()
    rig.cpus[2].send(icr(0x42, shorthand=2))  # all including self
    assert rig.holding(0x42) == [0, 1, 2, 3]
    assert [cpu.kicks for cpu in rig.cpus] == [1, 1, 1, 1]
    for cpu in rig.cpus:
        cpu.clear_counts()
    rig.cpus[2].send(icr(0x43, shorthand=3))  # all excluding self
    assert rig.holding(0x43) == [0, 1, 3]
    assert rig.kicked() == [0, 1, 3]
    rig.cpus[2].send(icr(2, mode=DM_NMI, shorthand=2))
    assert [cpu.event_kicks for cpu in rig.cpus] == [1, 1, 1, 1]  # NMI to all: the sender gets one, too


def test_sender_is_known_by_cpu_not_by_apic_id() -> None:
    rig = Rig(cpus=3)
    rig.cpus[1].wr(REG_ID, 0)  # the guest gave CPU 1 the boot CPU's APIC ID
    rig.cpus[1].send(icr(0x46, shorthand=3))  # all excluding self
    assert rig.holding(0x46) == [0, 2]


def test_logical_flat_destination() -> None:
    rig = Rig()
    for i, cpu in enumerate(rig.cpus):
        cpu.wr(REG_LDR, (1 << i) << 24)  # flat model (DFR all ones): one bit per CPU
    rig.cpus[0].send(icr(0x50, logical=True), destination=0b0110)
    assert rig.holding(0x50) == [1, 2]
    rig.cpus[1].send(icr(0x51, logical=True), destination=0b0011)  # includes the sender itself
    assert rig.holding(0x51) == [0, 1]
    assert rig.cpus[1].kicks == 2  # 0x50 and 0x51, once each


def test_logical_cluster_destination() -> None:
    rig = Rig()
    clusters = (0x11, 0x12, 0x21, 0x22)  # cluster in the high nibble, member bit in the low
    for cpu, ldr in zip(rig.cpus, clusters):
        cpu.wr(REG_DFR, 0x0FFFFFFF)
        cpu.wr(REG_LDR, ldr << 24)
    rig.cpus[0].send(icr(0x52, logical=True), destination=0x23)  # cluster 2, members 1 and 2
    assert rig.holding(0x52) == [2, 3]
    rig.cpus[0].send(icr(0x53, logical=True), destination=0x12)  # cluster 1, member 2
    assert rig.holding(0x53) == [1]


def test_destination_nobody_has_is_logged_and_dropped(guest_errors: io.StringIO) -> None:
    rig = Rig()
    rig.cpus[0].send(icr(0x44), destination=9)
    assert rig.holding(0x44) == [] and rig.kicked() == []
    assert "reaches no APIC" in guest_errors.getvalue()


# -- lowest priority --------------------------------------------------------------------------------------
def test_lowest_priority_picks_exactly_the_lowest_tpr() -> None:
    rig = Rig()
    for cpu, tpr in zip(rig.cpus, (0x30, 0x40, 0x10, 0x20)):
        cpu.wr(REG_TPR, tpr)
    rig.cpus[0].send(icr(0x60, mode=DM_LOWEST), destination=0xFF)
    assert rig.holding(0x60) == [2]
    assert rig.kicked() == [2]


def test_lowest_priority_may_choose_the_sender_and_ties_go_to_lowest_apic_id() -> None:
    rig = Rig()
    for cpu, tpr in zip(rig.cpus, (0x10, 0x20, 0x20, 0x20)):
        cpu.wr(REG_TPR, tpr)
    rig.cpus[0].send(icr(0x62, mode=DM_LOWEST), destination=0xFF)  # the sender itself is lowest
    assert rig.holding(0x62) == [0]
    assert rig.cpus[0].kicks == 1  # delivered once, by the bus, not also by the sender
    assert rig.cpus[0].apic.acknowledge_interrupt() == 0x62
    rig.cpus[0].wr(REG_EOI, 0)
    rig.cpus[3].send(icr(0x61, mode=DM_LOWEST), destination=0xFF)
    assert rig.holding(0x61) == [0]
    rig.cpus[1].wr(REG_ID, 9 << 24)  # CPUs 1-3 tie at TPR 0x20; CPU 1 no longer has the lowest APIC ID
    rig.cpus[0].send(icr(0x63, mode=DM_LOWEST, shorthand=3))  # all but the sender
    assert rig.holding(0x63) == [2]
    rig.cpus[3].wr(REG_ID, 9 << 24)  # CPUs 1 and 3 tie on priority and (duplicate) ID: lower index wins
    rig.cpus[0].send(icr(0x64, mode=DM_LOWEST, shorthand=3))
    assert rig.holding(0x64) == [1]


def test_lowest_priority_skips_disabled_apics_and_counts_pending_irr() -> None:
    rig = Rig(cpus=3)
    rig.cpus[0].wr(REG_SVR, 0xFF)  # software-disabled: would drop it, so cannot win
    rig.cpus[1].wr(REG_TPR, 0x20)
    rig.cpus[2].wr(REG_TPR, 0x20)
    rig.bus.deliver_msi(0xFEE00000 | (2 << 12), 0x90)  # CPU 2 now has class 9 pending: APR 0x90
    rig.cpus[2].send(icr(0x65, mode=DM_LOWEST), destination=0xFF)
    assert rig.holding(0x65) == [1]


# -- NMI, INIT, start-up ----------------------------------------------------------------------------------
def test_nmi_ipi_sets_take_nmi_and_event_kick_on_target_only() -> None:
    rig = Rig()
    rig.cpus[0].send(icr(0, mode=DM_NMI), destination=3)
    assert rig.event_kicked() == [3]
    assert rig.cpus[3].kicks == 0  # the plain kick is for maskable interrupts
    assert rig.cpus[3].apic.take_nmi() is True
    assert rig.cpus[3].apic.take_nmi() is False
    assert not any(cpu.apic.take_nmi() for cpu in rig.cpus[:3])


def test_init_resets_target_but_keeps_its_apic_id() -> None:
    rig = Rig()
    target = rig.cpus[1]
    target.wr(REG_TPR, 0x30)
    target.wr(REG_LDR, 0x02 << 24)
    target.wr(REG_DFR, 0x0FFFFFFF)
    target.wr(REG_TIMER_DIVIDE, 0b1011)
    target.wr(REG_LVT_TIMER, 0xEC)
    target.wr(REG_TIMER_INITIAL, 1000)
    target.wr(REG_ID, 5 << 24)  # the guest moved this APIC to ID 5: INIT keeps what the register holds
    rig.bus.deliver_msi(0xFEE00000 | (5 << 12), 0x70)
    assert target.irr_has(0x70)
    rig.cpus[0].send(icr(0, mode=DM_INIT), destination=5)
    assert rig.event_kicked() == [1]
    assert target.rd(REG_ID) == 5 << 24
    assert target.rd(REG_TPR) == 0 and target.rd(REG_LDR) == 0 and target.rd(REG_DFR) == 0xFFFFFFFF
    assert target.rd(REG_SVR) == 0xFF  # software-disabled again
    assert target.rd(REG_LVT_TIMER) == 0x10000 and target.rd(REG_TIMER_INITIAL) == 0
    assert target.rd(REG_LVT_LINT0) == 0x10000  # an application processor: LINT0 masked
    assert not target.irr_has(0x70)
    assert rig.queue.next_deadline() is None  # its timer stopped
    assert target.apic.take_init() is True
    assert target.apic.take_init() is False
    assert not any(cpu.apic.take_init() for i, cpu in enumerate(rig.cpus) if i != 1)
    assert rig.cpus[2].rd(REG_SVR) == 0x1FF  # bystanders untouched


def test_init_level_deassert_does_nothing() -> None:
    rig = Rig()
    rig.cpus[1].wr(REG_TPR, 0x30)
    rig.cpus[0].send(icr(0, mode=DM_INIT, level=0, level_triggered=True), destination=0xFF)  # Linux's 2nd INIT
    assert rig.event_kicked() == []
    assert rig.cpus[1].rd(REG_TPR) == 0x30 and rig.cpus[1].rd(REG_SVR) == 0x1FF
    assert not any(cpu.apic.take_init() for cpu in rig.cpus)
    rig.bus.deliver_ipi(Ipi(source_id=0, vector=0, delivery_mode=DM_INIT, logical=False, destination=1,
                            shorthand=SHORTHAND_NONE, level=0, level_triggered=True))  # straight to the bus
    assert rig.cpus[1].rd(REG_TPR) == 0x30 and not rig.cpus[1].apic.take_init()


def test_startup_ipi_latches_latest_vector_once() -> None:
    rig = Rig()
    target = rig.cpus[2].apic
    rig.cpus[0].send(icr(0, mode=DM_INIT), destination=2)  # INIT, then SIPI twice, as Linux does
    rig.cpus[0].send(icr(0x9A, mode=DM_STARTUP), destination=2)
    assert rig.cpus[2].event_kicks == 2
    rig.cpus[0].send(icr(0x9B, mode=DM_STARTUP), destination=2)
    assert target.take_init() is True
    assert target.take_startup() == 0x9B
    assert target.take_startup() is None
    assert rig.cpus[1].apic.take_startup() is None
    rig.cpus[0].send(icr(0x9C, mode=DM_STARTUP), destination=2)
    rig.cpus[0].send(icr(0, mode=DM_INIT), destination=2)  # an INIT voids the start-up IPI before it
    assert target.take_init() is True and target.take_startup() is None


def test_init_and_startup_to_all_others_skip_the_sender() -> None:
    rig = Rig(cpus=3)
    rig.cpus[0].send(icr(0, mode=DM_INIT, shorthand=3))
    rig.cpus[0].send(icr(0x10, mode=DM_STARTUP, shorthand=3))
    assert [cpu.apic.take_init() for cpu in rig.cpus] == [False, True, True]
    assert [cpu.apic.take_startup() for cpu in rig.cpus] == [None, 0x10, 0x10]
    assert rig.cpus[0].rd(REG_SVR) == 0x1FF


def test_extint_ipi_is_not_delivered(guest_errors: io.StringIO) -> None:
    rig = Rig()
    rig.cpus[0].send(icr(0x30, mode=DM_EXTINT), destination=1)
    rig.bus.deliver_ipi(Ipi(source_id=0, vector=0x30, delivery_mode=DM_EXTINT, logical=False, destination=1,
                            shorthand=SHORTHAND_NONE, level=1, level_triggered=False))
    assert rig.kicked() == [] and rig.event_kicked() == []
    assert "ExtINT IPI" in guest_errors.getvalue()


# -- the per-CPU APIC page --------------------------------------------------------------------------------
def test_icr_written_through_the_page_of_cpu0_reaches_cpu1() -> None:
    rig = Rig(cpus=2)
    page = rig.bus.mmio_page()
    rig.current = 0
    page.write(REG_ICR_HIGH, 4, 1 << 24)
    page.write(REG_ICR_LOW, 4, 0x45)
    assert rig.holding(0x45) == [1]
    assert page.read(REG_ICR_LOW, 4) == 0x45  # CPU 0's ICR, delivery status idle
    rig.current = 1
    assert page.read(REG_IRR + 0x20, 4) == 1 << 5  # CPU 1 sees its own IRR at the same address
    page.write(REG_EOI, 4, 0)
    assert rig.cpus[1].apic.acknowledge_interrupt() == 0x45


def test_page_reads_the_current_cpus_id_register() -> None:
    rig = Rig(cpus=2)
    page = rig.bus.mmio_page()
    rig.current = 0
    assert page.read(REG_ID, 4) == 0
    rig.current = 1
    assert page.read(REG_ID, 4) == 1 << 24
    page.write(REG_TPR, 4, 0x20)
    assert rig.cpus[1].rd(REG_TPR) == 0x20 and rig.cpus[0].rd(REG_TPR) == 0


@pytest.mark.parametrize("current", [-1, 2, 7, None, "0"])
def test_current_cpu_out_of_range_is_a_typed_error(current: object) -> None:
    rig = Rig(cpus=2)
    page = rig.bus.mmio_page()
    rig.current = current  # type: ignore[assignment]
    with pytest.raises(CurrentCpuError) as info:
        page.read(REG_ID, 4)
    assert isinstance(info.value, InterruptControllerError)
    assert info.value.cpu == current and info.value.cpus == 2
    with pytest.raises(CurrentCpuError):
        page.write(REG_TPR, 4, 0x10)


def test_bus_needs_at_least_one_apic() -> None:
    with pytest.raises(InvalidPropertyError):
        ApicBus([], lambda: 0)


# -- MSIs ---------------------------------------------------------------------------------------------------
def program(ioapic: IoApic, pin: int, low: int, destination: int) -> None:
    ioapic.write(0x00, 4, 0x11 + 2 * pin)
    ioapic.write(0x10, 4, destination << 24)
    ioapic.write(0x00, 4, 0x10 + 2 * pin)
    ioapic.write(0x10, 4, low)


def test_ioapic_msi_reaches_the_cpu_in_the_redirection_entry() -> None:
    rig = Rig()
    ioapic = IoApic(rig.bus)
    for cpu in rig.cpus:
        cpu.apic.eoi_broadcast = ioapic.eoi
    program(ioapic, 4, 0x31, destination=2)  # fixed, physical, edge
    ioapic.pin(4).raise_irq()
    assert rig.holding(0x31) == [2] and rig.kicked() == [2]
    program(ioapic, 9, 0x32 | (1 << 15), destination=3)  # level-triggered
    ioapic.pin(9).raise_irq()
    assert rig.holding(0x32) == [3]
    assert rig.cpus[3].apic.acknowledge_interrupt() == 0x32
    ioapic.pin(9).lower_irq()
    rig.cpus[3].wr(REG_EOI, 0)  # EOI broadcast clears remote IRR
    ioapic.write(0x00, 4, 0x10 + 2 * 9)
    assert ioapic.read(0x10, 4) & (1 << 14) == 0


def test_ioapic_logical_and_lowest_priority_msis() -> None:
    rig = Rig()
    ioapic = IoApic(rig.bus)
    for i, cpu in enumerate(rig.cpus):
        cpu.wr(REG_LDR, (1 << i) << 24)
        cpu.wr(REG_TPR, 0x40 - 0x10 * i)  # CPU 3 has the lowest priority
    program(ioapic, 5, 0x33 | (1 << 11), destination=0b0101)  # fixed, logical CPUs 0 and 2
    ioapic.pin(5).raise_irq()
    assert rig.holding(0x33) == [0, 2]
    program(ioapic, 6, 0x74 | (DM_LOWEST << 8) | (1 << 11), destination=0b1111)
    ioapic.pin(6).raise_irq()
    assert rig.holding(0x74) == [3]


def test_msi_broadcast_and_bad_addresses(guest_errors: io.StringIO) -> None:
    rig = Rig()
    rig.bus.deliver_msi(0xFEEFF000, 0x35)
    assert rig.holding(0x35) == [0, 1, 2, 3]
    for cpu in rig.cpus:
        cpu.clear_counts()
    rig.bus.deliver_msi(0xFED00000 | (1 << 12), 0x36)  # not the interrupt window
    rig.bus.deliver_msi(0x1_FEE01000, 0x36)
    rig.bus.deliver_msi(0xFEE00000 | (7 << 12), 0x36)  # no CPU with APIC ID 7
    assert rig.holding(0x36) == [] and rig.kicked() == [] and rig.event_kicked() == []
    err = guest_errors.getvalue()
    assert err.count("outside 0xfeexxxxx dropped") == 2
    assert "reaches no APIC" in err


def test_msi_nmi_and_init_modes_reach_only_the_destination() -> None:
    rig = Rig()
    rig.bus.deliver_msi(0xFEE00000 | (1 << 12), DM_NMI << 8)
    rig.bus.deliver_msi(0xFEE00000 | (2 << 12), DM_INIT << 8)
    assert rig.event_kicked() == [1, 2]
    assert rig.cpus[1].apic.take_nmi() and not rig.cpus[2].apic.take_nmi()
    assert rig.cpus[2].apic.take_init() and not rig.cpus[1].apic.take_init()


# -- remembered routes ----------------------------------------------------------------------------------
def _pulse_and_take(rig: Rig, ioapic: IoApic, pin: int, vector: int) -> list[int]:
    """Edge on ``pin``; which CPUs got ``vector`` (each then acknowledges it, so the next edge shows anew)."""
    ioapic.pin(pin).pulse()
    holding = rig.holding(vector)
    for index in holding:
        assert rig.cpus[index].apic.acknowledge_interrupt() == vector
        rig.cpus[index].wr(REG_EOI, 0)
    return holding


def test_a_remembered_route_follows_apic_id_ldr_and_dfr_changes() -> None:
    rig = Rig()
    ioapic = IoApic(rig.bus)
    program(ioapic, 3, 0x41, destination=2)  # physical APIC ID 2
    assert _pulse_and_take(rig, ioapic, 3, 0x41) == [2]
    assert _pulse_and_take(rig, ioapic, 3, 0x41) == [2]  # now from the remembered route
    rig.cpus[2].wr(REG_ID, 7 << 24)
    rig.cpus[1].wr(REG_ID, 2 << 24)
    assert _pulse_and_take(rig, ioapic, 3, 0x41) == [1]
    program(ioapic, 4, 0x42 | (1 << 11), destination=0b0100)  # logical, flat: LDR bit 2
    rig.cpus[0].wr(REG_LDR, 0b0100 << 24)
    assert _pulse_and_take(rig, ioapic, 4, 0x42) == [0]
    assert _pulse_and_take(rig, ioapic, 4, 0x42) == [0]
    rig.cpus[0].wr(REG_LDR, 0)
    rig.cpus[3].wr(REG_LDR, 0b0100 << 24)
    assert _pulse_and_take(rig, ioapic, 4, 0x42) == [3]
    rig.cpus[3].wr(REG_DFR, 0x0FFFFFFF)  # cluster model: cluster 0, bit 2 no longer matches 0b0100 << 24's
    rig.cpus[3].wr(REG_LDR, 0x14 << 24)   # cluster 1
    assert _pulse_and_take(rig, ioapic, 4, 0x42) == []


def test_a_remembered_route_follows_a_rewritten_entry_a_reset_and_a_loaded_state() -> None:
    rig = Rig()
    ioapic = IoApic(rig.bus)
    program(ioapic, 3, 0x41, destination=2)
    assert _pulse_and_take(rig, ioapic, 3, 0x41) == [2]
    program(ioapic, 3, 0x43, destination=1)
    assert _pulse_and_take(rig, ioapic, 3, 0x43) == [1]
    saved = rig.cpus[1].apic.state()
    rig.cpus[1].wr(REG_ID, 9 << 24)
    assert _pulse_and_take(rig, ioapic, 3, 0x43) == []
    rig.cpus[1].apic.from_state(saved)  # APIC ID 1 again
    assert _pulse_and_take(rig, ioapic, 3, 0x43) == [1]
    rig.cpus[1].wr(REG_ID, 9 << 24)
    rig.cpus[1].apic.reset()  # back to its initial ID, software-disabled
    rig.cpus[1].enable()
    assert _pulse_and_take(rig, ioapic, 3, 0x43) == [1]
    saved_ioapic = ioapic.state()
    program(ioapic, 3, 0x44, destination=0)
    assert _pulse_and_take(rig, ioapic, 3, 0x44) == [0]
    ioapic.from_state(saved_ioapic)
    assert _pulse_and_take(rig, ioapic, 3, 0x43) == [1]


def test_routes_stay_bounded_whatever_messages_the_guest_sends() -> None:
    from pyemu.hw.intc.apic_bus import MAX_ROUTES

    rig = Rig()
    for vector in range(0x20, 0x100):
        for destination in range(4):
            rig.bus.deliver_msi(0xFEE00000 | (destination << 12), vector)
    assert len(rig.bus._routes) <= MAX_ROUTES
    assert rig.holding(0xFF) == [0, 1, 2, 3]
