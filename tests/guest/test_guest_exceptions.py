"""Exceptions in 64-bit mode, checked from inside the guest: the vector that runs, the frame it sees,
the error code, CR2, IST stacks, not-present gates, double and triple faults."""

from __future__ import annotations

from pyemu.accel.exits import Shutdown
from pyemu.testing import Gate, GuestProgram, describe, pte_address, run_program
from pyemu.testing.environment import DATA, KERNEL_CS, KERNEL_DS, STACK_TOP, ist_top
from pyemu.testing.handlers import exit_with, read_frame, recording_handler

IF = 1 << 9
PAGE = 0x48000  # inside the data area, mapped with a 4 KiB PTE in pt0


def test_page_fault_handler_maps_page_and_retries(accel: str) -> None:
    pte = pte_address(PAGE)
    program = GuestProgram(
        code=f"""
            mov rbx, {pte}
            mov qword ptr [rbx], 0          ; unmap the page
            mov rdi, {PAGE + 0x10}
            invlpg [rdi]
            mov rcx, fault
            mov rbx, data
            mov [rbx + 0x200], rcx          ; where the fault should be reported
        fault:
            mov qword ptr [rdi], 0x1234     ; #PF: write to a not-present page, retried after the handler
            mov rax, qword ptr [rdi]
            mov [rbx + 0x208], rax
            {exit_with(0x600d)}
        """,
        handlers={14: f"""
            push rax
            push rbx
            mov rbx, data
            mov rax, cr2
            mov [rbx], rax
            mov rax, [rsp + 16]             ; error code
            mov [rbx + 8], rax
            mov rax, [rsp + 24]             ; RIP of the faulting instruction
            mov [rbx + 16], rax
            inc qword ptr [rbx + 24]
            mov rbx, {pte}
            mov qword ptr [rbx], {PAGE | 0x7}
            pop rbx
            pop rax
            add rsp, 8
            iretq
        """},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert result.u64(DATA) == PAGE + 0x10          # CR2
    assert result.u64(DATA + 8) == 0b010             # write, not present, supervisor
    assert result.u64(DATA + 16) == result.u64(DATA + 0x200)
    assert result.u64(DATA + 24) == 1
    assert result.u64(DATA + 0x208) == 0x1234


def test_invalid_opcode_frame(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            mov rcx, fault
            mov rbx, data
            mov [rbx], rcx
            mov rsp, {STACK_TOP - 0x18}     ; not 16-byte aligned: the CPU aligns before pushing
            mov rdx, rsp
            mov [rbx + 8], rdx
        fault:
            ud2
            mov rbx, data
            mov [rbx + 16], rsp
            {exit_with(0x600d)}
        """,
        handlers={6: recording_handler(0, error_code=False, skip=2)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.count == 1
    assert frame.rip == result.u64(DATA)
    assert frame.cs == KERNEL_CS and frame.ss == KERNEL_DS
    assert frame.rsp == STACK_TOP - 0x18
    assert frame.handler_rsp == (STACK_TOP - 0x20) - 40   # aligned down to 16, five quadwords
    assert frame.rflags & 0x2 and not frame.rflags & IF
    assert frame.handler_cs == KERNEL_CS
    assert result.u64(DATA + 16) == STACK_TOP - 0x18     # iretq restored the unaligned RSP


def test_divide_error_reports_the_div(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            mov rcx, fault
            mov rbx, data
            mov [rbx], rcx
            xor edx, edx
            mov eax, 7
            xor ecx, ecx
        fault:
            div ecx                          ; 2 bytes
            {exit_with(0x600d)}
        """,
        handlers={0: recording_handler(0, error_code=False, skip=2)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert (frame.count, frame.rip, frame.cs) == (1, result.u64(DATA), KERNEL_CS)


def test_general_protection_error_code_is_the_selector(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            mov rcx, fault
            mov rbx, data
            mov [rbx], rcx
            mov ax, 0x1238                   ; beyond the GDT limit
        fault:
            mov ds, ax                       ; 3 bytes (66 8e d8)
            {exit_with(0x600d)}
        """,
        handlers={13: recording_handler(0, error_code=True, skip=3)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.count == 1
    assert frame.error_code == 0x1238
    assert frame.rip == result.u64(DATA)


def test_breakpoint_is_a_trap_with_rip_after_int3(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("int3")
    program = GuestProgram(
        code=f"""
            mov rcx, after
            mov rbx, data
            mov [rbx], rcx
            int3
        after:
            {exit_with(0x600d)}
        """,
        handlers={3: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.count == 1 and frame.rip == result.u64(DATA)


def test_trap_gate_keeps_interrupts_enabled(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("INT n at CPL0")
    program = GuestProgram(
        code=f"""
            sti
            int 0x40
            int 0x41
            cli
            {exit_with(0x600d)}
        """,
        handlers={0x40: recording_handler(0, error_code=False), 0x41: recording_handler(1, error_code=False)},
        gates={0x41: Gate(kind="trap")},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    interrupt_gate, trap_gate = read_frame(result, 0), read_frame(result, 1)
    assert interrupt_gate.rflags & IF and not interrupt_gate.handler_rflags & IF
    assert trap_gate.rflags & IF and trap_gate.handler_rflags & IF


def test_ist_stack_is_used(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            ud2
            {exit_with(0x600d)}
        """,
        handlers={6: recording_handler(0, error_code=False, skip=2)},
        gates={6: Gate(ist=3)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.handler_rsp == ist_top(3) - 40
    assert frame.rsp == STACK_TOP


def test_int_n_through_not_present_gate_raises_np(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("INT n at CPL0")
    program = GuestProgram(
        code=f"""
            mov rcx, fault
            mov rbx, data
            mov [rbx], rcx
        fault:
            int 0x40
            {exit_with(0x600d)}
        """,
        handlers={11: recording_handler(0, error_code=True, skip=2)},
        gates={0x40: Gate(present=False)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.error_code == 0x40 * 8 + 2     # IDT, not external
    assert frame.rip == result.u64(DATA)         # a fault: reported at the INT instruction
    assert frame.count == 1


def test_page_fault_with_not_present_gate_becomes_double_fault(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            mov rbx, {pte_address(PAGE)}
            mov qword ptr [rbx], 0
            mov rdi, {PAGE}
            invlpg [rdi]
            mov rax, [rdi]
            {exit_with(0xbad)}
        """,
        handlers={8: recording_handler(0, error_code=True, then=exit_with(0xdf))},
        gates={14: Gate(present=False)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0xDF, describe(result)
    frame = read_frame(result, 0)
    assert frame.error_code == 0
    assert frame.count == 1


def test_triple_fault_shuts_down(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            mov rbx, {pte_address(PAGE)}
            mov qword ptr [rbx], 0
            mov rdi, {PAGE}
            invlpg [rdi]
            mov rax, [rdi]
            {exit_with(0xbad)}
        """,
        gates={14: Gate(present=False), 8: Gate(present=False)},
    )
    result = run_program(program, accel, timeout=5)
    assert isinstance(result.exit, Shutdown), describe(result)
    assert "triple fault" in result.exit.reason
    assert result.exit_value is None


def test_fault_while_pushing_the_frame_is_delivered_serially(accel: str, needs_full_kvm) -> None:
    """#UD with an unmapped stack: the #PF raised while pushing the frame is not a double fault (#UD is
    benign, SDM table 6-5), so #PF is delivered -- on an IST stack, with CR2 = the stack address."""
    needs_full_kvm("a fault while pushing an exception frame")
    stack_page = 0x30000
    program = GuestProgram(
        code=f"""
            mov rbx, {pte_address(stack_page)}
            mov qword ptr [rbx], 0
            mov rsp, {stack_page + 0x800}
            invlpg [rsp]
            ud2
            {exit_with(0xbad)}
        """,
        handlers={14: f"""
            mov rbx, data
            mov rax, cr2
            mov [rbx], rax
            mov rax, [rsp]
            mov [rbx + 8], rax
            {exit_with(0x14)}
        """},
        gates={14: Gate(ist=1)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x14, describe(result)
    assert stack_page <= result.u64(DATA) < stack_page + 0x800
    assert result.u64(DATA + 8) == 0b010       # supervisor write, not present
