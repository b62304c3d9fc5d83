"""Port I/O at CPL 3 against IOPL and the TSS I/O permission bitmap, checked from inside the guest.

A CPU raises #GP(0), with RIP at the IN/OUT instruction and nothing of it done, when CPL > IOPL in
protected/long mode and the TSS bitmap does not clear every bit of the access (SDM 19.5). Unicorn serves
such accesses by itself; :mod:`pyemu.accel.tcg.io_guard` makes the software CPU fault like hardware.

Each user program runs a list of probes. Before a probe it stores the probe's address and length; the
#GP handler records the faulting RIP and error code in the next slot and returns past the instruction.
"""

from __future__ import annotations

from pyemu.testing import Gate, GuestProgram, describe, run_program
from pyemu.testing.environment import DATA, RECORD_PORT, TSS
from pyemu.testing.runner import ProgramResult

IOPL0_RFLAGS = 0x0202
IOPL3_RFLAGS = 0x3202
FAULTS = DATA + 0x800            # count, then (rip, error code) pairs from +0x10, RFLAGS from +0x410
PROBES = DATA + 0x700            # addresses of the probes, in order
MARKS = DATA + 0x600             # values the user program stores after probes
BITMAP_LIMIT = 0x128             # TSS limit with the bitmap: ports 0..0x5ff inside, 0x600 and up beyond


def enter_user(rflags: int) -> str:
    return f"""
        mov rax, user_ds
        push rax
        mov rax, user_stack_top
        push rax
        push {rflags}
        mov rax, user_cs
        push rax
        mov rax, user
        push rax
        iretq
    """


# Reload TR with a TSS whose limit covers an I/O bitmap at TSS+0x68 for ports 0..0x5ff: every port
# denied but RECORD_PORT (bit clear); the byte after the limit is 0 in memory, yet beyond the limit.
SETUP_BITMAP = f"""
    mov rdi, {TSS + 0x68}
    mov ecx, 0xC0
    mov al, 0xFF
    rep stosb
    mov rdi, {TSS + 0x68 + (RECORD_PORT >> 3)}
    and byte ptr [rdi], {0xFF & ~(1 << (RECORD_PORT & 7))}
    mov rdi, {TSS + BITMAP_LIMIT}
    mov qword ptr [rdi], 0
    mov rdi, gdt
    mov dword ptr [rdi + 0x30], {BITMAP_LIMIT | (TSS << 16)}
    mov dword ptr [rdi + 0x34], 0x8900
    mov ax, tss_sel
    ltr ax
"""

GP_HANDLER = f"""
    push rax
    push rbx
    mov rbx, {FAULTS}
    mov rax, [rbx]
    shl rax, 4
    add rax, rbx
    push rcx
    mov rcx, [rsp + 32]
    mov [rax + 0x10], rcx           ; faulting RIP
    mov rcx, [rsp + 24]
    mov [rax + 0x18], rcx           ; error code
    mov rcx, [rsp + 48]
    mov [rax + 0x410], rcx          ; RFLAGS of the frame
    pop rcx
    inc qword ptr [rbx]
    add [rsp + 24], r13             ; step over the probe (r13 = its length)
    pop rbx
    pop rax
    add rsp, 8
    iretq
"""


def probe(index: int, instruction: str, length: int) -> str:
    return f"""
        mov r15, probe{index}
        mov rbx, {PROBES + 8 * index}
        mov [rbx], r15
        mov r13, {length}
        mov dx, {{port}}
    probe{index}:
        {instruction}
    """


def user_program(probes: list[str], rflags: int, *, bitmap: bool = False, epilogue: str = "") -> GuestProgram:
    body = "\n".join(probes)
    return GuestProgram(
        code=(SETUP_BITMAP if bitmap else "") + enter_user(rflags),
        sections={"user": f"""
            {body}
            {epilogue}
            int 0x80
        """},
        handlers={13: GP_HANDLER, 0x80: "mov eax, 0x600d\nmov dx, exit_port\nout dx, eax\n"},
        gates={0x80: Gate(dpl=3)},
    )


def faults(result: ProgramResult) -> list[tuple[int, int]]:
    count = result.u64(FAULTS)
    return [(result.u64(FAULTS + 0x10 + 16 * i), result.u64(FAULTS + 0x18 + 16 * i)) for i in range(count)]


def probe_address(result: ProgramResult, index: int) -> int:
    return result.u64(PROBES + 8 * index)


def port_traffic(result: ProgramResult) -> list[tuple[str, int, int]]:
    return [(access.kind, access.offset, access.size) for access in result.traffic if access.space == "pio"]


def test_iopl0_without_bitmap_faults_in_and_out(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    probes = [probe(0, "in al, dx", 1).format(port=RECORD_PORT),
              probe(1, "out dx, al", 1).format(port=RECORD_PORT),
              probe(2, "in eax, dx", 1).format(port=RECORD_PORT)]
    program = user_program(probes, IOPL0_RFLAGS)
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert faults(result) == [(probe_address(result, i), 0) for i in range(3)]
    assert port_traffic(result) == []


def test_faulting_in_changes_nothing(accel: str, needs_full_kvm) -> None:
    """RAX keeps its upper half and low bits, the flags of an earlier CMP survive, and the instruction after
    the IN runs only once, after the handler (Unicorn would otherwise run the rest of the block first)."""
    needs_full_kvm("CPL3 code")
    probes = [f"""
        mov rax, 0x1122334455667788
        xor r14, r14
        mov rbx, 5
        cmp rbx, 5                      ; ZF=1, kept in QEMU's lazy flags at the IN
        {probe(0, "in eax, dx", 1).format(port=RECORD_PORT)}
        lea r14, [r14 + 1]              ; leaves the flags alone
        mov rbx, {MARKS}
        mov [rbx], rax
        mov [rbx + 8], r14
        pushfq
        pop rcx
        mov [rbx + 0x10], rcx
    """]
    result = run_program(user_program(probes, IOPL0_RFLAGS), accel)
    assert result.exit_value == 0x600D, describe(result)
    assert faults(result) == [(probe_address(result, 0), 0)]
    assert result.u64(MARKS) == 0x1122334455667788
    assert result.u64(MARKS + 8) == 1
    assert result.u64(FAULTS + 0x410) & 0x40, "ZF of the CMP before the faulting IN is not in the #GP frame"
    assert result.u64(MARKS + 0x10) & 0x40, "ZF of the CMP before the faulting IN was lost"


def test_string_io_faults_before_touching_registers(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    probes = [f"""
        mov rsi, user_stack_top
        sub rsi, 0x100
        mov rcx, 3
        {probe(0, "rep outsb", 2).format(port=RECORD_PORT)}
        mov rbx, {MARKS}
        mov [rbx], rsi
        mov [rbx + 8], rcx
    """]
    result = run_program(user_program(probes, IOPL0_RFLAGS), accel)
    assert result.exit_value == 0x600D, describe(result)
    assert faults(result) == [(probe_address(result, 0), 0)]
    assert (result.u64(MARKS), result.u64(MARKS + 8)) == (0x40000 - 0x100, 3)
    assert port_traffic(result) == []


def test_iopl3_serves_the_port(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    probes = [probe(0, "in al, dx", 1).format(port=RECORD_PORT),
              probe(1, "out dx, ax", 2).format(port=RECORD_PORT + 2)]
    result = run_program(user_program(probes, IOPL3_RFLAGS), accel)
    assert result.exit_value == 0x600D, describe(result)
    assert faults(result) == []
    assert port_traffic(result) == [("read", 0, 1), ("write", 2, 2)]


def test_tss_bitmap_grants_single_port(accel: str, needs_full_kvm) -> None:
    needs_full_kvm("CPL3 code")
    probes = [probe(0, "in al, dx", 1).format(port=RECORD_PORT),        # bit clear: served
              probe(1, "in ax, dx", 2).format(port=RECORD_PORT),        # also needs RECORD_PORT+1: #GP
              probe(2, "in al, dx", 1).format(port=RECORD_PORT + 1),    # bit set: #GP
              probe(3, "out dx, al", 1).format(port=RECORD_PORT),       # served
              probe(4, "in al, dx", 1).format(port=0x600),              # bitmap byte beyond the limit
              probe(5, "in al, dx", 1).format(port=0xFFFF)]
    result = run_program(user_program(probes, IOPL0_RFLAGS, bitmap=True), accel)
    assert result.exit_value == 0x600D, describe(result)
    assert faults(result) == [(probe_address(result, i), 0) for i in (1, 2, 4, 5)]
    assert port_traffic(result) == [("read", 0, 1), ("write", 0, 1)]


def test_cpl0_ignores_iopl_and_bitmap(accel: str) -> None:
    program = GuestProgram(code=f"""
        push 0x0002                     ; IOPL 0
        popfq
        mov dx, {RECORD_PORT + 1}
        in al, dx
        mov eax, 0x600d
        mov dx, exit_port
        out dx, eax
    """)
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert port_traffic(result) == [("read", 1, 1)]


def test_every_fault_restored_the_instruction_state() -> None:
    """TCG: the guard found the translated block's return address for each #GP it raised (the exact
    instruction state, not only RIP), and looked at the bitmap only for CPL 3 accesses."""
    vcpus = []
    probes = [probe(i, instruction, length).format(port=RECORD_PORT + 1)
              for i, (instruction, length) in enumerate([("in al, dx", 1), ("out dx, eax", 1), ("rep insb", 2),
                                                         ("outsw", 2)])]
    setup = "mov rdi, user_stack_top\nsub rdi, 0x200\nmov rsi, rdi\nmov rcx, 2\n"
    program = user_program([setup] + probes, IOPL0_RFLAGS, bitmap=True)
    result = run_program(program, "tcg", before_run=lambda context: vcpus.append(context.vcpu))
    assert result.exit_value == 0x600D, describe(result)
    assert [rip for rip, _code in faults(result)] == [probe_address(result, i) for i in range(4)]
    statistics = vcpus[0]._io.guard.statistics  # type: ignore[attr-defined]
    assert statistics == {"checks": 4, "faults": 4, "unrestored": 0}
