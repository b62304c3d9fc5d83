"""Local APIC: registers, priorities, IPIs, MSIs, LINT pins, PIC pass-through and the timer, on a fake clock."""

from __future__ import annotations

import dataclasses

import pytest

from pyemu.hw.core.state import StateError
from pyemu.hw.intc.errors import InvalidPinError, InvalidPropertyError
from pyemu.hw.intc.lapic import (
    APIC_VERSION,
    REG_APR,
    REG_DFR,
    REG_EOI,
    REG_ESR,
    REG_ICR_HIGH,
    REG_ICR_LOW,
    REG_ID,
    REG_IRR,
    REG_ISR,
    REG_LDR,
    REG_LVT_ERROR,
    REG_LVT_LINT0,
    REG_LVT_LINT1,
    REG_LVT_TIMER,
    REG_PPR,
    REG_SVR,
    REG_TIMER_CURRENT,
    REG_TIMER_DIVIDE,
    REG_TIMER_INITIAL,
    REG_TMR,
    REG_TPR,
    REG_VERSION,
    Ipi,
    LocalApic,
)
from pyemu.system.timers import TimerQueue
from pyemu.target.x86.cpuid import TSC_CRYSTAL_HZ
from pyemu.testing.apic import ApicRegisters
from pyemu.testing.clock import FakeClock


def advance(clock: FakeClock, queue: TimerQueue, until: int) -> None:
    """Move the fake clock to ``until``, running each timer at its own deadline."""
    while (deadline := queue.next_deadline()) is not None and deadline <= until:
        clock.ns = max(clock.ns, deadline)
        queue.run_due()
    clock.ns = until


class FakePic:
    """A PIC stand-in: one pending vector until acknowledged."""

    def __init__(self) -> None:
        self.vector: int | None = None
        self.acks = 0

    def interrupt_pending(self) -> bool:
        return self.vector is not None

    def acknowledge_interrupt(self) -> int | None:
        self.acks += 1
        vector, self.vector = self.vector, None
        return vector


class Rig(ApicRegisters):
    def __init__(self, **kwargs) -> None:
        self.clock = FakeClock()
        self.queue = TimerQueue(clock=self.clock)
        self.kicks = 0
        self.eois: list[int] = []
        self.ipis: list[Ipi] = []
        self.apic = LocalApic(self.queue, kick=self._kick, eoi_broadcast=self.eois.append,
                              ipi_sink=self.ipis.append, **kwargs)

    def advance(self, until: int) -> None:
        advance(self.clock, self.queue, until)


def fixed_msi(vector: int, *, dest: int = 0, level: bool = False, mode: int = 0) -> tuple[int, int]:
    return 0xFEE00000 | (dest << 12), vector | (mode << 8) | ((1 << 15 | 1 << 14) if level else 0)


def test_reset_values_boot_cpu() -> None:
    rig = Rig(apic_id=3)
    assert rig.rd(REG_ID) == 3 << 24
    assert rig.rd(REG_VERSION) == APIC_VERSION == 0x50014
    assert rig.rd(REG_SVR) == 0xFF
    assert rig.rd(REG_DFR) == 0xFFFFFFFF
    assert rig.rd(REG_TPR) == 0
    assert rig.rd(REG_LVT_TIMER) == 0x10000
    assert rig.rd(REG_LVT_LINT0) == 0x700  # ExtINT, unmasked: the PIC reaches the CPU
    assert rig.rd(REG_LVT_LINT1) == 0x10000
    assert rig.rd(REG_LVT_ERROR) == 0x10000
    assert rig.rd(REG_TIMER_INITIAL) == 0 and rig.rd(REG_TIMER_CURRENT) == 0


def test_application_processor_resets_lint0_masked() -> None:
    rig = Rig(apic_id=1, bsp=False)
    assert rig.rd(REG_LVT_LINT0) == 0x10000


def test_bad_properties_raise_typed_errors() -> None:
    with pytest.raises(InvalidPropertyError):
        Rig(apic_id=256)
    with pytest.raises(InvalidPropertyError):
        Rig(crystal_hz=0)
    with pytest.raises(InvalidPinError):
        Rig().apic.lint(2)


def test_fixed_msi_ack_moves_irr_to_isr_and_eoi_clears() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.deliver_msi(*fixed_msi(0x41))
    assert rig.rd(REG_IRR + 0x20) == 1 << 1  # vector 0x41 is bit 1 of the third IRR dword
    assert rig.apic.interrupt_pending()
    assert rig.kicks >= 1
    assert rig.apic.acknowledge_interrupt() == 0x41
    assert rig.rd(REG_IRR + 0x20) == 0
    assert rig.rd(REG_ISR + 0x20) == 1 << 1
    assert rig.rd(REG_PPR) == 0x40
    assert not rig.apic.interrupt_pending()
    rig.wr(REG_EOI, 0)
    assert rig.rd(REG_ISR + 0x20) == 0
    assert rig.rd(REG_PPR) == 0
    assert rig.eois == []  # edge-triggered: no EOI broadcast


def test_priority_nesting_and_eoi_of_highest_isr() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.deliver_msi(*fixed_msi(0x31))
    rig.apic.deliver_msi(*fixed_msi(0x51))
    assert rig.apic.acknowledge_interrupt() == 0x51
    assert not rig.apic.interrupt_pending()  # 0x31's class 3 is below the PPR class 5
    rig.apic.deliver_msi(*fixed_msi(0x61))
    assert rig.apic.interrupt_pending()  # a higher class nests
    assert rig.apic.acknowledge_interrupt() == 0x61
    assert rig.rd(REG_ISR + 0x30) == 1 << 1 and rig.rd(REG_ISR + 0x20) == 1 << 17
    rig.wr(REG_EOI, 0)  # ends 0x61, the highest in service
    assert rig.rd(REG_ISR + 0x30) == 0 and rig.rd(REG_ISR + 0x20) == 1 << 17
    assert not rig.apic.interrupt_pending()
    rig.wr(REG_EOI, 0)  # ends 0x51
    assert rig.apic.acknowledge_interrupt() == 0x31


def test_tpr_masks_by_priority_class() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TPR, 0x50)
    assert rig.rd(REG_PPR) == 0x50
    rig.apic.deliver_msi(*fixed_msi(0x45))
    rig.apic.deliver_msi(*fixed_msi(0x5F))
    assert not rig.apic.interrupt_pending()
    assert rig.apic.acknowledge_interrupt() == 0xFF  # nothing deliverable: the spurious vector
    assert rig.rd(REG_ISR + 0x40) == 0 and rig.rd(REG_ISR + 0x20) == 0
    kicks = rig.kicks
    rig.wr(REG_TPR, 0x40)
    assert rig.apic.interrupt_pending() and rig.kicks > kicks  # lowering the TPR wakes the CPU
    assert rig.apic.acknowledge_interrupt() == 0x5F
    assert rig.apic.read_cr8() == 4
    rig.apic.write_cr8(0)
    assert rig.rd(REG_TPR) == 0
    assert rig.rd(REG_APR) == 0x50  # max(TPR, ISRV 0x5f, IRRV 0x45) classes


def test_spurious_vector_when_request_masked_between_check_and_ack() -> None:
    rig = Rig()
    rig.wr(REG_SVR, 0x1EF)  # enabled, spurious vector 0xEF
    rig.apic.deliver_msi(*fixed_msi(0x70))
    assert rig.apic.interrupt_pending()
    rig.wr(REG_TPR, 0xF0)
    assert rig.apic.acknowledge_interrupt() == 0xEF
    assert rig.rd(REG_IRR + 0x30) == 1 << 16  # still requested, not in service


def test_software_disabled_apic_drops_fixed_and_masks_lvts() -> None:
    rig = Rig()
    rig.apic.deliver_msi(*fixed_msi(0x41))
    assert rig.rd(REG_IRR + 0x20) == 0
    rig.enable()
    rig.wr(REG_LVT_TIMER, 0x20)
    assert rig.rd(REG_LVT_TIMER) == 0x20
    rig.wr(REG_SVR, 0xFF)  # software disable masks every LVT
    assert rig.rd(REG_LVT_TIMER) == 0x10020
    rig.wr(REG_LVT_TIMER, 0x20)  # and the mask cannot be cleared while disabled
    assert rig.rd(REG_LVT_TIMER) == 0x10020


def test_level_triggered_msi_sets_tmr_and_broadcasts_eoi() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.deliver_msi(*fixed_msi(0x93, level=True))
    assert rig.rd(REG_TMR + 0x40) == 1 << 19
    assert rig.apic.acknowledge_interrupt() == 0x93
    rig.wr(REG_EOI, 0)
    assert rig.eois == [0x93]


def test_msi_destination_filtering_physical_and_logical() -> None:
    rig = Rig(apic_id=2)
    rig.enable()
    rig.apic.deliver_msi(*fixed_msi(0x40, dest=5))  # another CPU's physical ID
    assert not rig.apic.interrupt_pending()
    rig.apic.deliver_msi(*fixed_msi(0x40, dest=2))
    assert rig.apic.acknowledge_interrupt() == 0x40
    rig.wr(REG_EOI, 0)
    rig.wr(REG_LDR, 0x04 << 24)  # flat model, logical ID bit 2
    rig.apic.deliver_msi(0xFEE00000 | (0x03 << 12) | 4, 0x41)
    assert not rig.apic.interrupt_pending()
    rig.apic.deliver_msi(0xFEE00000 | (0x06 << 12) | 4, 0x42)
    assert rig.apic.acknowledge_interrupt() == 0x42
    rig.wr(REG_EOI, 0)
    rig.wr(REG_DFR, 0x0FFFFFFF)  # cluster model: cluster 1, member bit 1
    rig.wr(REG_LDR, 0x12 << 24)
    assert rig.rd(REG_DFR) == 0x0FFFFFFF
    assert rig.apic.matches_destination(0x13, True)
    assert not rig.apic.matches_destination(0x23, True)
    assert rig.apic.matches_destination(0xFF, True)


def test_nmi_message_and_lint1_nmi() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.deliver_msi(0xFEE00000, 4 << 8)
    assert rig.kicks == 1
    assert rig.apic.take_nmi() is True
    assert rig.apic.take_nmi() is False
    rig.wr(REG_LVT_LINT1, 0x400)  # NMI, edge
    line = rig.apic.lint(1)
    line.raise_irq()
    line.raise_irq()  # no new edge
    assert rig.apic.take_nmi() is True and rig.apic.take_nmi() is False
    line.lower_irq()
    line.raise_irq()
    assert rig.apic.take_nmi() is True


def test_lint0_fixed_level_uses_remote_irr_and_redelivers_after_eoi() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_LVT_LINT0, 0x8000 | 0x55)  # fixed, level-triggered, vector 0x55
    line = rig.apic.lint(0)
    line.raise_irq()
    assert rig.rd(REG_LVT_LINT0) & (1 << 14)  # remote IRR
    assert rig.apic.acknowledge_interrupt() == 0x55
    assert rig.rd(REG_TMR + 0x20) == 1 << 21
    rig.wr(REG_EOI, 0)  # still asserted: delivered again
    assert rig.rd(REG_IRR + 0x20) == 1 << 21
    assert rig.apic.acknowledge_interrupt() == 0x55
    line.lower_irq()
    rig.wr(REG_EOI, 0)
    assert not rig.rd(REG_LVT_LINT0) & (1 << 14)
    assert not rig.apic.interrupt_pending()


def test_self_ipi_and_ipis_to_others_go_to_sink() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_ICR_LOW, (1 << 18) | 0x61)  # shorthand self, fixed
    assert rig.rd(REG_ICR_LOW) & (1 << 12) == 0  # delivery status idle
    assert rig.apic.acknowledge_interrupt() == 0x61
    rig.wr(REG_EOI, 0)
    rig.wr(REG_ICR_HIGH, 0 << 24)
    rig.wr(REG_ICR_LOW, 0x62)  # physical destination 0 = ourselves
    assert rig.apic.acknowledge_interrupt() == 0x62
    assert rig.ipis == []
    rig.wr(REG_EOI, 0)
    rig.wr(REG_ICR_LOW, (2 << 18) | 0x63)  # all including self
    assert rig.apic.acknowledge_interrupt() == 0x63
    assert len(rig.ipis) == 1 and rig.ipis[0].vector == 0x63 and rig.ipis[0].shorthand == 2
    rig.wr(REG_EOI, 0)
    rig.wr(REG_ICR_LOW, (3 << 18) | 0x64)  # all excluding self
    assert not rig.apic.interrupt_pending()
    assert rig.ipis[-1].vector == 0x64
    rig.wr(REG_ICR_HIGH, 1 << 24)
    rig.wr(REG_ICR_LOW, 0x65)  # another CPU by physical ID
    assert not rig.apic.interrupt_pending()
    assert rig.ipis[-1].destination == 1


def test_init_and_startup_ipis_go_to_the_sink() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_ICR_HIGH, 1 << 24)
    rig.wr(REG_ICR_LOW, 0x4500)  # INIT, level assert
    rig.wr(REG_ICR_LOW, 0x8500)  # INIT level de-assert: dropped at the sender
    rig.wr(REG_ICR_LOW, 0x0600 | 0x9A)  # start-up at 0x9a000
    modes = [(ipi.delivery_mode, ipi.vector, ipi.destination, ipi.level) for ipi in rig.ipis]
    assert modes == [(5, 0, 1, 1), (6, 0x9A, 1, 0)]
    assert not rig.ipis[0].is_init_deassert
    assert not rig.apic.take_init() and rig.apic.take_startup() is None  # the sender is not a target


def test_init_and_startup_to_self_are_ignored() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TPR, 0x20)
    rig.wr(REG_ICR_HIGH, 0)
    rig.wr(REG_ICR_LOW, 0x4500)  # INIT to our own physical ID
    rig.wr(REG_ICR_LOW, (1 << 18) | 0x0610)  # start-up, self shorthand
    assert rig.ipis == []
    assert not rig.apic.take_init() and rig.apic.take_startup() is None
    assert rig.rd(REG_TPR) == 0x20 and rig.rd(REG_SVR) == 0x1FF
    rig.wr(REG_ICR_LOW, (2 << 18) | 0x4500)  # INIT to all including self: only the others get it
    assert len(rig.ipis) == 1 and not rig.apic.take_init()


def test_icr_delivery_status_always_reads_idle() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_ICR_HIGH, 1 << 24)
    rig.wr(REG_ICR_LOW, (1 << 12) | 0x40)  # the guest cannot set delivery status either
    assert rig.rd(REG_ICR_LOW) == 0x40
    assert len(rig.ipis) == 1


def test_lowest_priority_ipi_is_left_to_the_sink_but_self_delivered_without_one() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_ICR_HIGH, 0xFF << 24)
    rig.wr(REG_ICR_LOW, 0x0140)  # lowest priority, broadcast: the bus arbitrates, the sender included
    assert not rig.apic.interrupt_pending()
    assert [(ipi.delivery_mode, ipi.vector) for ipi in rig.ipis] == [(1, 0x40)]
    rig.apic.ipi_sink = None  # a lone CPU: it is the only candidate
    rig.wr(REG_ICR_LOW, 0x0141)
    assert rig.apic.acknowledge_interrupt() == 0x41
    assert rig.apic.arbitration_priority() == 0x40


def test_nmi_init_and_startup_use_event_kick_not_kick() -> None:
    rig = Rig()
    events: list[str] = []
    rig.apic.event_kick = lambda: events.append("event")
    rig.enable()
    kicks = rig.kicks
    rig.apic.deliver_msi(0xFEE00000, 4 << 8)  # NMI
    rig.apic.deliver_msi(0xFEE00000, 5 << 8)  # INIT
    rig.apic.deliver_msi(0xFEE00000, (6 << 8) | 0x12)  # start-up
    assert events == ["event"] * 3 and rig.kicks == kicks
    assert rig.apic.take_nmi() is False  # the INIT discarded the NMI that came before it
    assert rig.apic.take_init() is True and rig.apic.take_startup() == 0x12
    rig.apic.deliver_msi(0xFEE00000, 0x0741)  # ExtINT is not an "event": no event kick
    assert events == ["event"] * 3


def test_init_message_resets_registers_but_keeps_id_enable_and_lint0_extint() -> None:
    pic = FakePic()
    rig = Rig(apic_id=0, pic=pic)
    rig.enable()
    rig.wr(REG_ID, 6 << 24)
    rig.wr(REG_TPR, 0x40)
    rig.wr(REG_LVT_LINT0, 0x10000)
    rig.apic.set_hardware_enabled(False)
    rig.apic.lint(0).raise_irq()
    rig.apic.accept_message(5, 0, False, "test")
    assert rig.rd(REG_ID) == 6 << 24
    assert rig.apic.hardware_enabled is False
    assert rig.rd(REG_TPR) == 0 and rig.rd(REG_SVR) == 0xFF
    assert rig.rd(REG_LVT_LINT0) == 0x700  # the boot CPU's reset value again
    assert rig.apic.state().lint_levels == (1, 0)  # the input wire is still asserted
    assert rig.apic.take_init() and not rig.apic.take_init()
    rig.apic.reset()  # a full RESET goes back to the board's APIC ID
    assert rig.rd(REG_ID) == 0 and rig.apic.hardware_enabled is True


def test_init_level_deassert_message_is_ignored() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TPR, 0x40)
    kicks = rig.kicks
    rig.apic.accept_message(5, 0, True, "test", level=False)
    assert rig.rd(REG_TPR) == 0x40 and not rig.apic.take_init() and rig.kicks == kicks
    rig.apic.accept_ipi(Ipi(source_id=1, vector=0, delivery_mode=5, logical=False, destination=0, shorthand=0,
                            level=0, level_triggered=True))
    assert rig.rd(REG_TPR) == 0x40 and not rig.apic.take_init()
    rig.apic.accept_ipi(Ipi(source_id=1, vector=0, delivery_mode=5, logical=False, destination=0, shorthand=0,
                            level=1, level_triggered=True))  # level-triggered assert: a real INIT
    assert rig.rd(REG_TPR) == 0 and rig.apic.take_init()


def test_lvt_init_mode_inits_and_reserved_modes_are_dropped() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_LVT_LINT1, 0x0630)  # start-up is reserved in an LVT
    rig.apic.lint(1).raise_irq()
    assert rig.apic.take_startup() is None and not rig.apic.interrupt_pending()
    rig.apic.lint(1).lower_irq()
    rig.wr(REG_LVT_LINT1, 0x0131)  # lowest priority is reserved too
    rig.apic.lint(1).raise_irq()
    assert not rig.apic.interrupt_pending()
    rig.apic.lint(1).lower_irq()
    rig.wr(REG_LVT_LINT1, 0x0500)  # INIT through LINT1
    rig.apic.lint(1).raise_irq()
    assert rig.apic.take_init() and rig.rd(REG_SVR) == 0xFF


def test_state_round_trip_keeps_init_and_startup_latches() -> None:
    rig = Rig()
    rig.apic.accept_message(5, 0, False, "test")
    rig.apic.accept_message(6, 0x9C, False, "test")
    saved = rig.apic.state()
    assert saved.init_pending and saved.startup_vector == 0x9C
    events: list[int] = []
    other = LocalApic(rig.queue, event_kick=lambda: events.append(1))
    other.from_state(saved)
    assert events == [1]  # a restored pending event wakes the vCPU
    assert other.take_init() and other.take_startup() == 0x9C
    with pytest.raises(StateError):
        other.from_state(dataclasses.replace(saved, startup_vector=256))


def test_illegal_vectors_latch_in_esr_and_signal_error_lvt() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_LVT_ERROR, 0xFE)
    rig.wr(REG_ICR_LOW, (1 << 18) | 0x05)  # self IPI with vector 5: send illegal vector
    rig.wr(REG_ESR, 0)
    assert rig.rd(REG_ESR) == 1 << 5
    assert rig.apic.acknowledge_interrupt() == 0xFE
    rig.wr(REG_ESR, 0)
    assert rig.rd(REG_ESR) == 0


def test_bad_accesses_are_ignored_not_raised() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.write(REG_TPR, 1, 0x30)  # byte write: ignored
    rig.apic.write(REG_TPR + 4, 4, 0x30)  # misaligned: ignored
    assert rig.rd(REG_TPR) == 0
    rig.wr(REG_VERSION, 0)  # read-only
    assert rig.rd(REG_VERSION) == 0x50014
    assert rig.apic.read(REG_VERSION, 1) == 0x14
    assert rig.apic.read(REG_VERSION + 8, 4) == 0
    assert rig.rd(0x3C0) == 0  # reserved register
    rig.wr(REG_ESR, 0)
    assert rig.rd(REG_ESR) == 1 << 7  # illegal register address


def test_pic_passthrough_through_lint0_extint() -> None:
    pic = FakePic()
    rig = Rig(pic=pic)
    pic.vector = 0x30
    assert rig.apic.interrupt_pending()  # reset state: LINT0 ExtINT, APIC disabled
    assert rig.apic.acknowledge_interrupt() == 0x30
    assert pic.acks == 1
    rig.enable()
    pic.vector = 0x31
    assert rig.apic.acknowledge_interrupt() == 0x31  # virtual wire with the APIC enabled
    rig.wr(REG_LVT_LINT0, 0x10700)  # masked: the PIC is cut off
    pic.vector = 0x32
    assert not rig.apic.interrupt_pending()
    assert rig.apic.acknowledge_interrupt() is None
    kicks = rig.kicks
    rig.wr(REG_LVT_LINT0, 0x700)
    assert rig.kicks > kicks
    rig.apic.lint(0).raise_irq()  # PIC INTR wired to LINT0 wakes the CPU
    assert rig.kicks > kicks + 1


def test_extint_message_takes_vector_from_pic() -> None:
    pic = FakePic()
    rig = Rig(pic=pic)
    rig.enable()
    rig.wr(REG_LVT_LINT0, 0x10700)
    pic.vector = 0x20
    assert not rig.apic.interrupt_pending()
    rig.apic.deliver_msi(0xFEE00000, 7 << 8)  # the IOAPIC's ExtINT pin
    assert rig.apic.interrupt_pending()
    assert rig.apic.acknowledge_interrupt() == 0x20
    pic.vector = 0x21
    assert not rig.apic.interrupt_pending()


CRYSTAL_NS_PER_TICK = 1_000_000_000 // TSC_CRYSTAL_HZ  # 40 ns at 25 MHz


@pytest.mark.parametrize("config, divide", [(0b1011, 1), (0b0000, 2), (0b0011, 16), (0b1000, 32), (0b1010, 128)])
def test_one_shot_timer_fires_after_count_times_divide(config: int, divide: int) -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TIMER_DIVIDE, config)
    rig.wr(REG_LVT_TIMER, 0xEC)
    rig.wr(REG_TIMER_INITIAL, 1000)
    deadline = 1000 * divide * CRYSTAL_NS_PER_TICK
    rig.advance(deadline // 2)
    assert rig.rd(REG_TIMER_CURRENT) == 500
    rig.advance(deadline - 1)
    assert not rig.apic.interrupt_pending()
    rig.advance(deadline)
    assert rig.apic.acknowledge_interrupt() == 0xEC
    assert rig.rd(REG_TIMER_CURRENT) == 0
    rig.wr(REG_EOI, 0)
    rig.advance(deadline * 10)
    assert not rig.apic.interrupt_pending()  # one-shot


def test_periodic_timer_fires_every_period_and_reloads() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TIMER_DIVIDE, 0b0001)  # divide by 4: 160 ns per tick
    rig.wr(REG_LVT_TIMER, (1 << 17) | 0xEC)
    rig.wr(REG_TIMER_INITIAL, 25_000)  # 4 ms
    period = 25_000 * 4 * CRYSTAL_NS_PER_TICK
    fired_at = []
    for k in range(1, 6):
        rig.advance(k * period - 1)
        assert not rig.apic.interrupt_pending()
        rig.advance(k * period)
        assert rig.apic.acknowledge_interrupt() == 0xEC
        rig.wr(REG_EOI, 0)
        fired_at.append(rig.clock.ns)
    assert fired_at == [k * period for k in range(1, 6)]
    rig.advance(5 * period + period // 4)
    assert rig.rd(REG_TIMER_CURRENT) == 25_000 * 3 // 4
    rig.wr(REG_TIMER_INITIAL, 0)  # writing 0 stops it
    rig.advance(20 * period)
    assert not rig.apic.interrupt_pending()


def test_masked_timer_counts_without_interrupt() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TIMER_DIVIDE, 0b1011)
    rig.wr(REG_LVT_TIMER, 0x10000 | 0xEC)
    rig.wr(REG_TIMER_INITIAL, 100)
    rig.advance(50 * CRYSTAL_NS_PER_TICK)
    assert rig.rd(REG_TIMER_CURRENT) == 50
    rig.advance(200 * CRYSTAL_NS_PER_TICK)
    assert rig.rd(REG_TIMER_CURRENT) == 0
    assert not rig.apic.interrupt_pending()


def test_divide_change_while_counting_continues_from_current_count() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TIMER_DIVIDE, 0b1011)  # 1
    rig.wr(REG_LVT_TIMER, 0xEC)
    rig.wr(REG_TIMER_INITIAL, 1000)
    rig.advance(400 * CRYSTAL_NS_PER_TICK)
    rig.wr(REG_TIMER_DIVIDE, 0b0000)  # 2: the remaining 600 ticks take 1200 crystal periods
    assert rig.rd(REG_TIMER_CURRENT) == 600
    rig.advance((400 + 1200) * CRYSTAL_NS_PER_TICK - 1)
    assert not rig.apic.interrupt_pending()
    rig.advance((400 + 1200) * CRYSTAL_NS_PER_TICK)
    assert rig.apic.interrupt_pending()


def test_timer_expiry_kicks_the_cpu() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TIMER_DIVIDE, 0b1011)
    rig.wr(REG_LVT_TIMER, 0xEC)
    rig.wr(REG_TIMER_INITIAL, 10)
    kicks = rig.kicks
    rig.advance(10 * CRYSTAL_NS_PER_TICK)
    assert rig.kicks == kicks + 1


def test_tsc_deadline_mode() -> None:
    rig = Rig(tsc_hz=1_000_000_000)  # 1 TSC tick per ns keeps the arithmetic visible
    rig.enable()
    rig.wr(REG_LVT_TIMER, (2 << 17) | 0xED)
    rig.wr(REG_TIMER_INITIAL, 1000)  # ignored in TSC-deadline mode
    assert rig.rd(REG_TIMER_INITIAL) == 0
    rig.clock.ns = 5_000
    rig.apic.set_tsc_deadline(1_005_000)
    assert rig.apic.tsc_deadline() == 1_005_000
    rig.advance(1_004_999)
    assert not rig.apic.interrupt_pending()
    rig.advance(1_005_000)
    assert rig.apic.acknowledge_interrupt() == 0xED
    assert rig.apic.tsc_deadline() == 0
    rig.wr(REG_EOI, 0)
    rig.apic.set_tsc_deadline(2_000_000)
    rig.apic.set_tsc_deadline(0)  # disarm
    rig.advance(3_000_000)
    assert not rig.apic.interrupt_pending()
    rig.apic.set_tsc_deadline(10)  # already past: fires at once
    rig.advance(3_000_000)
    assert rig.apic.interrupt_pending()


def test_tsc_deadline_ignored_outside_deadline_mode() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_LVT_TIMER, 0xED)
    rig.apic.set_tsc_deadline(1000)
    assert rig.apic.tsc_deadline() == 0


def test_state_round_trip_keeps_registers_and_running_timer() -> None:
    rig = Rig()
    rig.enable()
    rig.wr(REG_TPR, 0x20)
    rig.wr(REG_LDR, 0x01 << 24)
    rig.wr(REG_TIMER_DIVIDE, 0b1011)
    rig.wr(REG_LVT_TIMER, (1 << 17) | 0xEC)
    rig.wr(REG_TIMER_INITIAL, 1000)
    rig.apic.deliver_msi(*fixed_msi(0x41))
    rig.advance(300 * CRYSTAL_NS_PER_TICK)
    saved = rig.apic.state()

    other = LocalApic(rig.queue)
    rig.apic.reset()  # the original no longer fires
    other.from_state(saved)
    assert other.read(REG_TPR, 4) == 0x20
    assert other.read(REG_LDR, 4) == 0x01 << 24
    assert other.read(REG_IRR + 0x20, 4) == 1 << 1
    assert other.read(REG_TIMER_CURRENT, 4) == 700
    assert other.acknowledge_interrupt() == 0x41
    other.write(REG_EOI, 4, 0)
    rig.advance(1000 * CRYSTAL_NS_PER_TICK)
    assert other.acknowledge_interrupt() == 0xEC
    # the anchor did not move: it is 700 ticks older than when the state was taken
    timer = other.state().timer
    assert timer.next_expiry == 1 and timer.anchor_age_ns == saved.timer.anchor_age_ns + 700 * CRYSTAL_NS_PER_TICK


def test_random_guest_accesses_never_raise() -> None:
    """Garbage from the guest (any offset, size, value) ends in a defined state, never an exception."""
    import random

    from pyemu.hw.intc.ioapic import IoApic

    rnd = random.Random(1234)
    pic = FakePic()
    rig = Rig(pic=pic)
    io = IoApic(rig.apic)
    rig.apic.eoi_broadcast = io.eoi
    for _ in range(3000):
        device, span = rnd.choice(((rig.apic, 0x1000), (io, 0x100)))
        offset = rnd.randrange(span) & (~0xF if rnd.random() < 0.7 else ~0)
        size = rnd.choice((1, 2, 4, 4, 8))
        if rnd.random() < 0.6:
            device.write(offset, size, rnd.getrandbits(32))
        else:
            assert 0 <= device.read(offset, size) < 1 << 64
        if rnd.random() < 0.05:
            io.pin(rnd.randrange(24)).set_level(rnd.randrange(2))
        if rnd.random() < 0.05 and rig.apic.interrupt_pending():
            vector = rig.apic.acknowledge_interrupt()
            assert vector is None or 0 <= vector <= 0xFF
        if rnd.random() < 0.05:
            rig.advance(rig.clock.ns + rnd.choice((100, 10_000, 1_000_000)))
    assert rig.apic.read(REG_VERSION, 4) == 0x50014
