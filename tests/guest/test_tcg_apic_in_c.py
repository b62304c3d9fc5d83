"""The software CPU's INTA and the guest's EOI writes served in C by the local APIC's core
(hw/intc/apic_core.py): a guest with a real xAPIC takes interrupts that a host thread requests, and its
handler's EOI writes end them, without the model's Python -- except where the model must answer (a PIC
passed through, a level-triggered vector), which still reaches Python with the same result."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from pyemu.accel.base import create_accelerator
from pyemu.hw.intc.lapic import APIC_DEFAULT_BASE, APIC_PAGE_SIZE, LocalApic
from pyemu.system.timers import TimerQueue
from pyemu.target.x86.cpuid import default_cpuid
from pyemu.testing import GuestProgram
from pyemu.testing.board import DeviceMapping, TestBoard
from pyemu.testing.environment import build
from pyemu.testing.handlers import exit_with

VECTOR = 0x51
ROUNDS = 20
COUNT = 0x48000

# The handler counts and writes EOI; main enables the APIC (SVR), sets LINT0 as the test asks, then halts
# until the count reaches ROUNDS.
HANDLER = f"""
    push rax
    push rbx
    mov rbx, {COUNT}
    inc dword ptr [rbx]
    mov rbx, {APIC_DEFAULT_BASE}
    mov dword ptr [rbx + 0xb0], 0
    pop rbx
    pop rax
    iretq
"""


def main(lint0: int) -> str:
    return f"""
    mov rbx, {APIC_DEFAULT_BASE}
    mov dword ptr [rbx + 0xf0], 0x1ff
    mov dword ptr [rbx + 0x350], {lint0}
wait:
    sti
    hlt
    cli
    mov rbx, {COUNT}
    mov eax, [rbx]
    cmp eax, {ROUNDS}
    jb wait
    {exit_with("eax")}
"""


@dataclass
class Machine:
    board: TestBoard
    lapic: LocalApic
    vcpu: object


class IdlePic:
    """An 8259 pair behind LINT0 with nothing to say."""

    def interrupt_pending(self) -> bool:
        return False

    def acknowledge_interrupt(self) -> int | None:
        return None


@contextmanager
def apic_machine(lint0: int) -> Iterator[Machine]:
    board = TestBoard()
    lapic = LocalApic(TimerQueue(clock=time.monotonic_ns), apic_id=0, bsp=True, pic=IdlePic())
    board.add_device(DeviceMapping("mmio", APIC_DEFAULT_BASE, APIC_PAGE_SIZE, lapic, "lapic"))
    accelerator = create_accelerator("tcg")
    try:
        built = build(GuestProgram(main(lint0), handlers={VECTOR: HANDLER}), board.memory)
        accelerator.attach(board.memory, board.dispatcher, default_cpuid())
        vcpu = accelerator.create_vcpu(0, lapic)
        lapic.kick = vcpu.kick
        board.exit_device.on_exit = vcpu.request_stop
        vcpu.load_state(built.state)
        yield Machine(board, lapic, vcpu)
    finally:
        accelerator.close()
        board.close()


def run_rounds(machine: Machine, *, level: bool = False) -> None:
    """Request VECTOR ROUNDS times, each once the guest took the one before; run the guest to its end."""
    board, lapic, vcpu = machine.board, machine.lapic, machine.vcpu

    def fire() -> None:
        deadline = time.monotonic() + 20
        while not lapic.software_enabled and time.monotonic() < deadline:  # fixed interrupts are dropped before
            time.sleep(0.0005)
        for taken in range(ROUNDS):
            while board.memory.read_u32(COUNT) < taken and time.monotonic() < deadline:
                time.sleep(0.0005)
            with board.lock:
                lapic.accept_fixed(VECTOR, level)

    threading.Thread(target=fire, daemon=True).start()
    timer = threading.Timer(60, vcpu.request_stop)  # type: ignore[attr-defined]
    timer.start()
    try:
        vcpu.run()  # type: ignore[attr-defined]
    finally:
        timer.cancel()
    assert board.exit_device.value == ROUNDS
    assert lapic.irr == 0 and lapic.isr == 0


def native_core() -> bool:
    return LocalApic(TimerQueue(clock=time.monotonic_ns)).engine_acknowledge is not None


needs_native = pytest.mark.skipif(not native_core(), reason="the APIC core's C module could not be built")


@needs_native
def test_interrupts_are_acknowledged_and_ended_in_c() -> None:
    with apic_machine(lint0=0x10000) as machine:  # LINT0 masked: no PIC passed through
        run_rounds(machine)
        assert machine.lapic.engine_acknowledges >= ROUNDS
        assert machine.lapic.engine_eois >= ROUNDS
        assert machine.vcpu._gate.native_acknowledges >= ROUNDS  # type: ignore[attr-defined]


@needs_native
def test_with_the_pic_passed_through_the_model_answers_inta() -> None:
    """LINT0 in ExtINT mode, unmasked (the boot CPU's reset state) with an 8259 behind it: its vector would
    come first, so the C INTA and EOI defer to the model, which delivers the same interrupts."""
    with apic_machine(lint0=0x700) as machine:
        run_rounds(machine)
        assert machine.lapic.engine_acknowledges == 0
        assert machine.lapic.engine_eois == 0


@needs_native
def test_the_eoi_of_a_level_triggered_vector_reaches_the_model() -> None:
    """The IOAPIC must hear of a level-triggered vector's end (remote IRR): that EOI is the model's."""
    ended: list[int] = []
    with apic_machine(lint0=0x10000) as machine:
        machine.lapic.eoi_broadcast = ended.append
        run_rounds(machine, level=True)
        assert ended == [VECTOR] * ROUNDS
        assert machine.lapic.engine_eois == 0
        assert machine.lapic.engine_acknowledges >= ROUNDS
