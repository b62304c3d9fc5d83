"""Privilege changes checked from inside the guest: CPL3 -> CPL0 interrupts on TSS.RSP0, gate DPL checks,
user-mode page faults, SYSCALL/SYSRET round trips."""

from __future__ import annotations

from pyemu.testing import Gate, GuestProgram, describe, pte_address, run_program
from pyemu.testing.environment import DATA, KERNEL_CS, KERNEL_DS, RSP0_TOP, USER_CS, USER_DS, USER_STACK_TOP
from pyemu.testing.handlers import exit_with, read_frame, recording_handler

IF = 1 << 9
USER_RFLAGS = 0x3202  # IOPL=3 (the user program may write the exit port), IF=1

ENTER_USER = f"""
    mov rax, user_ds
    push rax
    mov rax, user_stack_top
    push rax
    push {USER_RFLAGS}
    mov rax, user_cs
    push rax
    mov rax, user
    push rax
    iretq
"""


def test_user_interrupt_switches_to_rsp0(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    program = GuestProgram(
        code=ENTER_USER,
        sections={"user": f"""
            mov rcx, user_stack_top
            sub rcx, 0x28
            mov rsp, rcx
            int 0x80
            mov rbx, data
            mov rax, cs
            mov [rbx + 0x600], rax          ; CS after iretq back to user
            mov [rbx + 0x608], rsp
            {exit_with(0x600d)}
        """},
        handlers={0x80: """
            push rbx
            mov rbx, data
            mov word ptr [rbx + 0x300], ss  ; SS inside the handler: the null selector (RPL 0)
            pop rbx
        """ + recording_handler(0, error_code=False)},
        gates={0x80: Gate(dpl=3)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.count == 1
    assert (frame.cs, frame.ss) == (USER_CS, USER_DS)
    assert frame.rsp == USER_STACK_TOP - 0x28
    assert frame.rflags & 0x3200 == 0x3200
    assert frame.handler_rsp == RSP0_TOP - 40
    assert frame.handler_cs == KERNEL_CS
    assert result.u64(DATA + 0x300) & 0xFFFF == 0
    assert result.u64(DATA + 0x600) == USER_CS
    assert result.u64(DATA + 0x608) == USER_STACK_TOP - 0x28


def test_gate_dpl_blocks_int_from_user_mode(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    program = GuestProgram(
        code=ENTER_USER,
        sections={"user": f"""
            mov rcx, fault
            mov rbx, data
            mov [rbx], rcx
        fault:
            int 0x81                        ; gate DPL 0: #GP(0x81 * 8 + 2)
            {exit_with(0x600d)}
        """},
        handlers={13: recording_handler(0, error_code=True, skip=2), 0x81: exit_with(0xbad)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.error_code == 0x81 * 8 + 2
    assert frame.rip == result.u64(DATA)            # a fault: RIP at the int instruction
    assert frame.cs == USER_CS


def test_user_page_fault_error_code_and_privileged_instruction(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    supervisor_page = 0x49000
    program = GuestProgram(
        code=f"""
            mov rbx, {pte_address(supervisor_page)}
            mov qword ptr [rbx], {supervisor_page | 0x3}   ; present, writable, not user
            invlpg [rbx]
            {ENTER_USER}
        """,
        sections={"user": f"""
            mov rdi, {supervisor_page + 0x18}
            mov rax, [rdi]                  ; #PF: user read of a supervisor page (3 bytes)
            mov rax, cr0                    ; #GP(0) at CPL3 (3 bytes)
            {exit_with(0x600d)}
        """},
        handlers={14: """
            push rbx
            push rax
            mov rbx, data
            mov rax, cr2
            mov [rbx + 0x700], rax
            pop rax
            pop rbx
        """ + recording_handler(0, error_code=True, skip=3),
                  13: recording_handler(1, error_code=True, skip=3)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    page_fault, protection = read_frame(result, 0), read_frame(result, 1)
    assert page_fault.error_code == 0b101          # present, read, user
    assert result.u64(DATA + 0x700) == supervisor_page + 0x18
    assert page_fault.handler_rsp == RSP0_TOP - 48
    assert protection.error_code == 0 and protection.cs == USER_CS and protection.count == 1


def test_syscall_sysret_round_trip(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    program = GuestProgram(
        code=ENTER_USER,
        sections={
            "user": f"""
                mov rcx, after
                mov rbx, data
                mov [rbx + 0x100], rcx
                mov rax, 0x1234
                syscall
            after:
                mov rbx, data
                mov [rbx + 0x200], rax          ; the kernel's return value
                mov [rbx + 0x208], rcx
                mov rax, cs
                mov [rbx + 0x210], rax
                mov rax, ss
                mov [rbx + 0x218], rax
                pushfq
                pop rax
                mov [rbx + 0x220], rax
                mov rax, cr0                    ; must fault: SYSRET really returned to CPL3
                {exit_with(0x600d)}
            """,
            "syscall_entry": """
                mov rbx, data
                mov [rbx], rcx                  ; return RIP
                mov [rbx + 8], r11              ; user RFLAGS
                mov rax, cs
                mov [rbx + 0x10], rax
                mov rax, ss
                mov [rbx + 0x18], rax
                mov [rbx + 0x20], rsp           ; SYSCALL does not switch stacks
                pushfq
                pop rax
                mov [rbx + 0x28], rax
                mov rax, 0x4321
                sysret
            """,
        },
        handlers={13: recording_handler(0, error_code=True, skip=3)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    after = result.u64(DATA + 0x100)
    assert result.u64(DATA) == after                               # RCX = return RIP
    assert result.u64(DATA + 8) & 0x3202 == USER_RFLAGS             # R11 = user RFLAGS
    assert (result.u64(DATA + 0x10), result.u64(DATA + 0x18)) == (KERNEL_CS, KERNEL_DS)
    assert result.u64(DATA + 0x20) == USER_STACK_TOP
    assert not result.u64(DATA + 0x28) & IF                         # FMASK cleared IF
    assert result.u64(DATA + 0x200) == 0x4321
    assert (result.u64(DATA + 0x210), result.u64(DATA + 0x218)) == (USER_CS, USER_DS)
    assert result.u64(DATA + 0x220) & IF                            # RFLAGS restored from R11
    frame = read_frame(result, 0)
    assert frame.count == 1 and frame.cs == USER_CS and frame.error_code == 0


def test_syscall_with_sce_clear_is_invalid_opcode(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            mov ecx, 0xC0000080
            rdmsr
            and eax, 0xFFFFFFFE
            wrmsr
            mov rcx, fault
            mov rbx, data
            mov [rbx], rcx
        fault:
            syscall
            {exit_with(0x600d)}
        """,
        handlers={6: recording_handler(0, error_code=False, skip=2)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0)
    assert frame.count == 1 and frame.rip == result.u64(DATA)
