"""Delivery in flat 32-bit protected mode (the PVH/multiboot entry state): 8-byte gates, 32-bit frames,
the ring switch through the 32-bit TSS, INTO, #PF with 32-bit paging, external interrupts."""

from __future__ import annotations

import threading
import time

import pytest

from pyemu.testing import FakeInterruptController, Gate, GuestProgram, RunContext, describe, run_program
from pyemu.testing.environment import (
    DATA,
    PM_KERNEL_CS,
    PM_KERNEL_DS,
    PM_USER_CS,
    PM_USER_DS,
    RSP0_TOP,
    STACK_TOP,
    USER_STACK_TOP,
    pte_address32,
)
from pyemu.testing.handlers import exit_with, read_frame, recording_handler

IF = 1 << 9


@pytest.fixture(autouse=True)
def _protected_mode_kvm(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("32-bit protected-mode exception return (iretd)")


def handler32(slot: int, *, error_code: bool, skip: int = 0) -> str:
    return recording_handler(slot, error_code=error_code, skip=skip, bits=32)


def test_invalid_opcode_and_divide_error_frames(accel: str) -> None:
    program = GuestProgram(
        mode="protected",
        code=f"""
            mov ebx, data
            mov ecx, ud
            mov [ebx], ecx
            mov ecx, de
            mov [ebx + 8], ecx
        ud:
            ud2
            xor edx, edx
            mov eax, 5
            xor ecx, ecx
        de:
            div ecx
            {exit_with(0x600d)}
        """,
        handlers={6: handler32(0, error_code=False, skip=2), 0: handler32(1, error_code=False, skip=2)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    ud, de = read_frame(result, 0, bits=32), read_frame(result, 1, bits=32)
    assert (ud.rip, ud.cs, ud.count) == (result.u64(DATA), PM_KERNEL_CS, 1)
    assert (de.rip, de.cs, de.count) == (result.u64(DATA + 8), PM_KERNEL_CS, 1)
    assert ud.handler_rsp == STACK_TOP - 12     # EIP, CS, EFLAGS: no stack switch at CPL0
    assert ud.rflags & 0x2 and not ud.handler_rflags & IF


def test_general_protection_error_code(accel: str) -> None:
    program = GuestProgram(
        mode="protected",
        code=f"""
            mov eax, 0x1238
            mov ds, eax                     ; 2 bytes, selector beyond the GDT limit
            {exit_with(0x600d)}
        """,
        handlers={13: handler32(0, error_code=True, skip=2)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0, bits=32)
    assert frame.error_code == 0x1238 and frame.count == 1
    assert frame.handler_rsp == STACK_TOP - 16


def test_into_and_int_n_are_traps(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("INT n at CPL0")
    program = GuestProgram(
        mode="protected",
        code=f"""
            mov ebx, data
            mov ecx, after_into
            mov [ebx], ecx
            mov ecx, after_int
            mov [ebx + 8], ecx
            mov al, 0x7f
            add al, 1                       ; OF=1
            into
        after_into:
            int 0x21
        after_int:
            {exit_with(0x600d)}
        """,
        handlers={4: handler32(0, error_code=False), 0x21: handler32(1, error_code=False)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    overflow, software = read_frame(result, 0, bits=32), read_frame(result, 1, bits=32)
    assert overflow.rip == result.u64(DATA) and overflow.count == 1
    assert software.rip == result.u64(DATA + 8) and software.count == 1


def test_user_interrupt_switches_to_ss0_esp0(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    program = GuestProgram(
        mode="protected",
        code="""
            mov eax, user_ds
            push eax
            mov eax, user_stack_top
            push eax
            push 0x3202
            mov eax, user_cs
            push eax
            mov eax, user
            push eax
            iretd
        """,
        sections={"user": f"""
            mov eax, user_ds
            mov ds, eax
            int 0x80
            mov ebx, data
            mov eax, cs
            mov [ebx + 0x600], eax
            {exit_with(0x600d)}
        """},
        handlers={0x80: """
            push ebx
            mov ebx, data
            mov word ptr [ebx + 0x300], ss
            pop ebx
        """ + handler32(0, error_code=False)},
        gates={0x80: Gate(dpl=3)},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0, bits=32)
    assert (frame.cs, frame.ss, frame.rsp) == (PM_USER_CS, PM_USER_DS, USER_STACK_TOP)
    assert frame.handler_rsp == RSP0_TOP - 20
    assert frame.handler_cs == PM_KERNEL_CS
    assert result.u64(DATA + 0x300) & 0xFFFF == PM_KERNEL_DS
    assert result.u64(DATA + 0x600) & 0xFFFF == PM_USER_CS


def test_page_fault_with_32bit_paging(accel: str) -> None:
    page = 0x48000
    program = GuestProgram(
        mode="protected",
        paging=True,
        code=f"""
            mov ebx, {pte_address32(page)}
            mov dword ptr [ebx], 0
            mov edi, {page + 0x24}
            invlpg [edi]
            mov eax, [edi]                  ; #PF: read of a not-present page
            {exit_with(0x600d)}
        """,
        handlers={14: f"""
            push eax
            push ebx
            mov ebx, data
            mov eax, cr2
            mov [ebx], eax
            mov eax, [esp + 8]
            mov [ebx + 8], eax
            mov ebx, {pte_address32(page)}
            mov dword ptr [ebx], {page | 0x7}
            pop ebx
            pop eax
            add esp, 4
            iretd
        """},
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert result.u64(DATA) == page + 0x24
    assert result.u64(DATA + 8) == 0          # read, not present, supervisor


def test_external_interrupt_wakes_hlt(accel: str) -> None:
    controller = FakeInterruptController()
    program = GuestProgram(
        mode="protected",
        code=f"""
            sti
            hlt
            cli
            {exit_with(0x600d)}
        """,
        handlers={0x30: handler32(0, error_code=False)},
    )

    def start(context: RunContext) -> None:
        def fire() -> None:
            time.sleep(0.05)
            controller.raise_vector(0x30)

        threading.Thread(target=fire, daemon=True).start()

    result = run_program(program, accel, interrupts=controller, before_run=start)
    assert result.exit_value == 0x600D, describe(result)
    frame = read_frame(result, 0, bits=32)
    assert frame.count == 1 and frame.rflags & IF and frame.cs == PM_KERNEL_CS


def test_sysenter_sysexit_round_trip(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    program = GuestProgram(
        mode="protected",
        msrs={0x174: PM_KERNEL_CS, 0x175: "rsp0_top", 0x176: "sysenter_entry"},
        code="""
            mov eax, user_ds
            push eax
            mov eax, user_stack_top
            push eax
            push 0x3202
            mov eax, user_cs
            push eax
            mov eax, user
            push eax
            iretd
        """,
        sections={
            "user": f"""
                mov ecx, user_stack_top
                sub ecx, 0x10                   ; ESP for SYSEXIT
                mov edx, after                  ; EIP for SYSEXIT
                sysenter
            after:
                mov ebx, data
                mov eax, cs
                mov [ebx + 0x100], eax
                mov eax, ss
                mov [ebx + 0x108], eax
                mov [ebx + 0x110], esp
                {exit_with(0x600d)}
            """,
            "sysenter_entry": """
                mov ebx, data
                mov [ebx], esp
                mov eax, cs
                mov [ebx + 8], eax
                mov eax, ss
                mov [ebx + 16], eax
                pushfd
                pop eax
                mov [ebx + 24], eax
                sysexit
            """,
        },
    )
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert result.u64(DATA) == RSP0_TOP
    assert (result.u64(DATA + 8) & 0xFFFF, result.u64(DATA + 16) & 0xFFFF) == (PM_KERNEL_CS, PM_KERNEL_DS)
    assert not result.u64(DATA + 24) & IF
    assert (result.u64(DATA + 0x100) & 0xFFFF, result.u64(DATA + 0x108) & 0xFFFF) == (PM_USER_CS, PM_USER_DS)
    assert result.u64(DATA + 0x110) & 0xFFFF_FFFF == USER_STACK_TOP - 0x10
