"""Page faults, SYSCALL and external interrupts done inside the engine on pyemu's libunicorn
(accel/tcg/engine_delivery.py, BlockGate.take_interrupts_in_engine): what the guest sees is the same as
through the Python hooks, the engine really did the work (its counts), and the hooks take over again where
they must (``-d int``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pyemu.accel.exits import Stopped
from pyemu.accel.tcg.block_gate import _uc_library, engine_takes_interrupts
from pyemu.system import log
from pyemu.testing import FakeInterruptController, Gate, GuestProgram, describe, prepared, pte_address
from pyemu.testing.environment import DATA, KERNEL_CS, KERNEL_DS
from pyemu.testing.handlers import exit_with, read_frame, recording_handler, slot_address

ENGINE_DELIVERS = hasattr(_uc_library(), "uc_pyemu_native_events")
#: The engine takes external interrupts too (pyemu's libunicorn, unless PYEMU_TCG_ENGINE_IRQ=0).
ENGINE_INTERRUPTS = ENGINE_DELIVERS and engine_takes_interrupts()
FIRST_PAGE = 0x48000   # inside the data area, mapped with 4 KiB PTEs in pt0
PAGES = 3
SYSCALLS = 4

# Unmaps PAGES pages, then writes each: every write faults once; the handler records CR2 and the error
# code, maps the page back and retries. Then SYSCALLS system calls at CPL0 (to LSTAR and back by jmp rcx).
PROGRAM = GuestProgram(
    code=f"""
        mov rbx, {pte_address(FIRST_PAGE)}
        xor ecx, ecx
    unmap:
        mov qword ptr [rbx + rcx * 8], 0
        inc ecx
        cmp ecx, {PAGES}
        jne unmap
        mov rax, cr3
        mov cr3, rax                    ; flush the TLB
        mov rdi, {FIRST_PAGE + 0x18}
        xor esi, esi
    touch:
        mov qword ptr [rdi], rsi        ; #PF, retried after the handler mapped the page
        add rdi, 0x1000
        inc esi
        cmp esi, {PAGES}
        jne touch
        xor esi, esi
        mov rcx, back
        mov rbx, data
        mov [rbx + 0x328], rcx          ; where each SYSCALL returns
    calls:
        mov rax, 0x5a5a
        syscall
    back:
        inc esi
        cmp esi, {SYSCALLS}
        jne calls
        {exit_with(0x600d)}
    """,
    sections={"syscall_entry": """
        mov rbx, data
        mov [rbx + 0x300], rcx          ; return RIP
        mov [rbx + 0x308], r11          ; RFLAGS at the SYSCALL
        mov rax, cs
        mov [rbx + 0x310], rax
        mov rax, ss
        mov [rbx + 0x318], rax
        inc qword ptr [rbx + 0x320]
        jmp rcx
    """},
    handlers={14: f"""
        push rax
        push rbx
        push rcx
        mov rbx, data
        mov rcx, [rbx + 0x100]          ; faults so far
        mov rax, cr2
        mov [rbx + rcx * 8], rax
        mov rax, [rsp + 24]             ; error code
        mov [rbx + 0x80 + rcx * 8], rax
        inc qword ptr [rbx + 0x100]
        mov rax, cr2
        and rax, ~0xfff
        mov rcx, rax
        sub rcx, {FIRST_PAGE}
        shr rcx, 9                      ; the page's PTE offset: page index * 8
        mov rbx, {pte_address(FIRST_PAGE)}
        or rax, 0x3
        mov [rbx + rcx], rax
        pop rcx
        pop rbx
        pop rax
        add rsp, 8
        iretq
    """},
)


@pytest.fixture
def int_log(tmp_path: Path) -> Iterator[Path]:
    """``-d int`` into a file for the test, the previous mask back afterwards."""
    before = frozenset(name for name in log.CATEGORIES if log.enabled(name))
    path = tmp_path / "int.log"
    stream = log._state.stream
    log.set_file(str(path))
    log.set_mask({"int"})
    try:
        yield path
    finally:
        log.set_mask(before)
        log._state.stream.close()
        log._state.stream = stream


def _run_and_check() -> int:
    """Run PROGRAM; check what the guest saw; return how many events the engine did itself."""
    with prepared(PROGRAM) as machine:
        result = machine.vcpu.run()
        assert isinstance(result, Stopped) and machine.board.exit_device.value == 0x600D, \
            describe(result) if not isinstance(result, Stopped) else machine.vcpu.last_dump
        memory = machine.board.memory
        assert memory.read_u64(DATA + 0x100) == PAGES
        for page in range(PAGES):
            assert memory.read_u64(DATA + page * 8) == FIRST_PAGE + 0x18 + page * 0x1000   # CR2
            assert memory.read_u64(DATA + 0x80 + page * 8) == 0b010   # write, not present, supervisor
            assert memory.read_u64(FIRST_PAGE + 0x18 + page * 0x1000) == page             # the retried store
        assert memory.read_u64(DATA + 0x320) == SYSCALLS
        assert memory.read_u64(DATA + 0x300) == memory.read_u64(DATA + 0x328)
        assert memory.read_u64(DATA + 0x308) & 0x2 == 0x2                               # reserved bit 1
        assert (memory.read_u64(DATA + 0x310), memory.read_u64(DATA + 0x318)) == (KERNEL_CS, KERNEL_DS)
        return machine.vcpu._delivery.delivered  # type: ignore[attr-defined]


def test_page_faults_and_syscalls_are_done_by_the_engine() -> None:
    delivered = _run_and_check()
    assert delivered == (PAGES + SYSCALLS if ENGINE_DELIVERS else 0)


def test_int_logging_hands_them_back_to_the_hooks(int_log: Path) -> None:
    assert _run_and_check() == 0
    text = int_log.read_text()
    assert text.count("exception vector 0xe error 0x2 ") == PAGES, text[:2000]
    assert text.count("syscall at") == SYSCALLS, text[:2000]


VECTOR = 0x31
INTERRUPTS = 3
COUNT = slot_address(0) + 0x48  # recording_handler(0)'s delivery counter

# Spins with IF=1 until the handler counted INTERRUPTS deliveries (raised by a host thread meanwhile).
SPIN_PROGRAM = GuestProgram(
    code=f"""
        mov rbx, {COUNT}
        sti
    spin:
        cmp qword ptr [rbx], {INTERRUPTS}
        jb spin
        cli
        {exit_with(0x600d)}
    """,
    handlers={VECTOR: recording_handler(0, error_code=False)},
)


class _Ram:
    """What read_frame reads: ``u64(address)`` of the test board's RAM."""

    def __init__(self, memory: Any) -> None:
        self._memory = memory

    def u64(self, address: int) -> int:
        return int(self._memory.read_u64(address))


# Waits with STI; HLT until the handler counted INTERRUPTS deliveries: each one wakes a halted vCPU. The
# count is checked with IF=0 and STI's one-instruction shadow covers the HLT, so an interrupt that arrives
# between the check and the HLT is taken after the HLT (it ends the halt). Checked with IF=1, the last
# interrupt could be taken before the HLT, which would then wait for an interrupt that never comes.
HALT_PROGRAM = GuestProgram(
    code=f"""
        mov rbx, {COUNT}
    wait:
        cli
        cmp qword ptr [rbx], {INTERRUPTS}
        jae done
        sti
        hlt
        jmp wait
    done:
        {exit_with(0x600d)}
    """,
    handlers={VECTOR: recording_handler(0, error_code=False)},
)


def _run_while_raising(machine: Any, fire: Callable[[], None]) -> None:
    """Run the vCPU until the program exits while ``fire`` raises interrupts from a host thread."""
    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    while machine.board.exit_device.value is None:
        result = machine.vcpu.run()
        assert isinstance(result, Stopped), describe(result)
    thread.join(30.0)


def _run_spin(program: GuestProgram = SPIN_PROGRAM) -> tuple[int, int, list[int]]:
    """Run ``program`` with INTERRUPTS raised one after another from a host thread; returns (interrupts
    the gate raised in the engine, deliveries made in Python, vectors acknowledged)."""
    controller = FakeInterruptController()
    with prepared(program, interrupts=controller) as machine:
        vcpu = machine.vcpu

        def fire() -> None:
            for count in range(1, INTERRUPTS + 1):
                controller.raise_vector(VECTOR)
                assert controller.wait_acknowledged(count, 30.0)

        _run_while_raising(machine, fire)
        assert machine.board.exit_device.value == 0x600D
        frame = read_frame(_Ram(machine.board.memory), 0)
        assert frame.count == INTERRUPTS
        assert frame.cs == KERNEL_CS and frame.rflags & (1 << 9)   # interrupted with IF=1
        return (vcpu._gate.interrupts_raised,  # type: ignore[attr-defined]
                vcpu._traps.delivered, list(controller.acknowledged))  # type: ignore[attr-defined]


def test_interrupts_are_delivered_by_the_engine() -> None:
    raised, in_python, acknowledged = _run_spin()
    assert acknowledged == [VECTOR] * INTERRUPTS
    if ENGINE_INTERRUPTS:
        assert raised >= INTERRUPTS and in_python == 0
    else:
        assert raised == 0 and in_python == INTERRUPTS


def test_interrupts_that_wake_a_halted_vcpu_are_delivered_by_the_engine() -> None:
    """A vCPU woken from HLT raises the interrupt for the engine's next run, which takes it before its
    first block: no delivery in Python (where each cost a register pull, an IDT walk and a frame push)."""
    raised, in_python, acknowledged = _run_spin(HALT_PROGRAM)
    assert acknowledged == [VECTOR] * INTERRUPTS
    if ENGINE_INTERRUPTS:
        assert raised >= INTERRUPTS and in_python == 0
    else:
        assert raised == 0 and in_python == INTERRUPTS


def test_int_logging_delivers_interrupts_from_python(int_log: Path) -> None:
    raised, in_python, acknowledged = _run_spin()
    assert acknowledged == [VECTOR] * INTERRUPTS
    assert raised == 0 and in_python == INTERRUPTS
    assert int_log.read_text().count("external vector 0x31") == INTERRUPTS


# Faults raised while the engine itself delivers an event: the error code names the IDT entry
# (vector * 8 + 2) with EXT set, as the Python delivery and the CPU do. QEMU 5.0's long-mode delivery said
# vector * 16 + 2 without EXT; an engine patch corrects it (engine_patches.IDT_ERROR_CODE_*).
NP_FRAME = 11


def test_a_page_fault_through_a_not_present_gate_is_a_double_fault() -> None:
    """The engine's own #PF delivery meets a not-present gate: #NP is contributory, so after a page fault
    it becomes #DF (error code 0), as through the Python delivery (Intel SDM vol. 3A, table 6-5)."""
    program = GuestProgram(
        code=f"""
            mov rbx, {pte_address(FIRST_PAGE)}
            mov qword ptr [rbx], 0
            mov rax, cr3
            mov cr3, rax
            mov rdi, {FIRST_PAGE}
            mov qword ptr [rdi], 1          ; #PF, whose gate is not present
            {exit_with(0xbad)}
        """,
        handlers={8: recording_handler(0, error_code=True, then=exit_with(0xdf))},
        gates={14: Gate(present=False)},
    )
    with prepared(program) as machine:
        result = machine.vcpu.run()
        assert isinstance(result, Stopped), describe(result)
        assert machine.board.exit_device.value == 0xDF, machine.vcpu.last_dump  # type: ignore[attr-defined]
        assert read_frame(_Ram(machine.board.memory), 0).error_code == 0


def test_an_interrupt_taken_in_a_run_through_a_not_present_gate_sets_ext() -> None:
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"""
            sti
        spin:
            jmp spin
        """,
        handlers={NP_FRAME: recording_handler(0, error_code=True, then=exit_with(0x11))},
        gates={VECTOR: Gate(present=False)},
    )
    with prepared(program, interrupts=controller) as machine:
        _run_while_raising(machine, lambda: controller.raise_vector(VECTOR))
        assert machine.board.exit_device.value == 0x11
        assert read_frame(_Ram(machine.board.memory), 0).error_code == VECTOR * 8 + 2 + 1
