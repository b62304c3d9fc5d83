"""External interrupts checked from inside the guest: waking HLT, IF=0 masking, the STI shadow, delivery
during a tight loop and in user mode."""

from __future__ import annotations

import threading
import time

from pyemu.accel.exits import Halt
from pyemu.testing import FakeInterruptController, Gate, GuestProgram, RunContext, describe, run_program
from pyemu.testing.environment import DATA, KERNEL_CS, RSP0_TOP, USER_CS
from pyemu.testing.handlers import exit_with, read_frame, recording_handler, slot_address

VECTOR = 0x30
COUNT = slot_address(0) + 0x48  # recording_handler(0)'s delivery counter


def raise_later(vector: int, delay: float = 0.05):
    def start(context: RunContext) -> None:
        assert context.interrupts is not None

        def fire() -> None:
            time.sleep(delay)
            context.interrupts.raise_vector(vector)

        threading.Thread(target=fire, daemon=True).start()

    return start


def raise_now(vector: int):
    def start(context: RunContext) -> None:
        assert context.interrupts is not None
        context.interrupts.raise_vector(vector)

    return start


def test_timer_interrupt_wakes_sti_hlt(accel: str) -> None:
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"""
            mov rcx, after
            mov rbx, data
            mov [rbx], rcx
            sti
            hlt
        after:
            cli
            mov rbx, {COUNT}
            mov eax, [rbx]
            {exit_with("eax")}
        """,
        handlers={VECTOR: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel, interrupts=controller, before_run=raise_later(VECTOR))
    assert result.exit_value == 1, describe(result)
    assert result.interrupts_acknowledged == [VECTOR]
    frame = read_frame(result, 0)
    assert frame.rip == result.u64(DATA)       # the instruction after the hlt
    assert frame.cs == KERNEL_CS and frame.rflags & (1 << 9)


def test_no_delivery_while_if_clear_then_exactly_one(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("an interrupt window of a few instructions after sti (this PVM host reports KVM_EXIT_IRQ_WINDOW_OPEN late, also for in-kernel LAPIC interrupts)")
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"""
            mov rbx, {COUNT}
            mov rcx, 200000
        spin:
            dec rcx
            jnz spin
            mov rax, [rbx]
            mov rdi, data
            mov [rdi], rax                  ; count while IF was 0
            sti
            nop
            nop
            cli
            mov rax, [rbx]
            mov [rdi + 8], rax              ; count after the window
            {exit_with(0x600d)}
        """,
        handlers={VECTOR: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel, interrupts=controller, before_run=raise_now(VECTOR))
    assert result.exit_value == 0x600D, describe(result)
    assert result.u64(DATA) == 0
    assert result.u64(DATA + 8) == 1
    assert result.interrupts_acknowledged == [VECTOR]


def test_sti_shadow_lets_one_instruction_run_first(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("an interrupt window of a few instructions after sti (this PVM host reports KVM_EXIT_IRQ_WINDOW_OPEN late, also for in-kernel LAPIC interrupts)")
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"""
            mov rbx, {COUNT}
            sti
            mov rcx, [rbx]                  ; in the STI shadow: the interrupt is not taken yet
            mov rdx, [rbx]                  ; taken before this one
            cli
            mov rdi, data
            mov [rdi], rcx
            mov [rdi + 8], rdx
            {exit_with(0x600d)}
        """,
        handlers={VECTOR: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel, interrupts=controller, before_run=raise_now(VECTOR))
    assert result.exit_value == 0x600D, describe(result)
    assert (result.u64(DATA), result.u64(DATA + 8)) == (0, 1)


def test_interrupt_stops_a_tight_loop(accel: str) -> None:
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"""
            mov rbx, {COUNT}
            sti
        spin:
            cmp qword ptr [rbx], 0
            je spin
            cli
            {exit_with(0x600d)}
        """,
        handlers={VECTOR: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel, interrupts=controller, before_run=raise_later(VECTOR, 0.1))
    assert result.exit_value == 0x600D, describe(result)
    assert result.interrupts_acknowledged == [VECTOR]


def test_higher_vector_first_and_each_once(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("an interrupt window of a few instructions after sti (this PVM host reports KVM_EXIT_IRQ_WINDOW_OPEN late, also for in-kernel LAPIC interrupts)")
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"""
            sti
            nop
            nop
            cli
            {exit_with(0x600d)}
        """,
        handlers={0x30: recording_handler(0, error_code=False), 0x40: recording_handler(1, error_code=False)},
    )

    def start(context: RunContext) -> None:
        controller.raise_vector(0x30)
        controller.raise_vector(0x40)

    result = run_program(program, accel, interrupts=controller, before_run=start)
    assert result.exit_value == 0x600D, describe(result)
    assert result.interrupts_acknowledged == [0x40, 0x30]
    assert read_frame(result, 0).count == 1 and read_frame(result, 1).count == 1


def test_interrupt_in_user_mode_switches_to_rsp0(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    controller = FakeInterruptController()
    program = GuestProgram(
        code="""
            mov rax, user_ds
            push rax
            mov rax, user_stack_top
            push rax
            push 0x3202
            mov rax, user_cs
            push rax
            mov rax, user
            push rax
            iretq
        """,
        sections={"user": f"""
            mov rbx, {COUNT}
        spin:
            cmp qword ptr [rbx], 0
            je spin
            {exit_with(0x600d)}
        """},
        handlers={VECTOR: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel, interrupts=controller, before_run=raise_later(VECTOR))
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.cs == USER_CS
    assert frame.handler_rsp == RSP0_TOP - 40


def test_hlt_with_interrupts_off_is_halt(accel: str) -> None:
    result = run_program(GuestProgram("cli\nhlt"), accel, interrupts=FakeInterruptController())
    assert isinstance(result.exit, Halt), describe(result)


def test_hlt_without_controller_is_halt(accel: str) -> None:
    result = run_program(GuestProgram("sti\nhlt"), accel)
    assert isinstance(result.exit, Halt), describe(result)


def test_interrupt_gate_dpl_does_not_apply_to_external_interrupts(accel: str) -> None:
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"""
            sti
            hlt
            cli
            {exit_with(0x600d)}
        """,
        handlers={VECTOR: recording_handler(0, error_code=False)},
        gates={VECTOR: Gate(dpl=0)},
    )
    result = run_program(program, accel, interrupts=controller, before_run=raise_later(VECTOR, 0.02))
    assert result.exit_value == 0x600D, describe(result)
    assert read_frame(result, 0).count == 1
