"""Delivery corner cases on the software CPU: faults raised by the delivery itself (#TS from a short TSS,
#SS from a non-canonical IST stack, #GP for a bad gate type or a null code selector) and the EXT bit
in error codes of faults caused while delivering an external interrupt."""

from __future__ import annotations

import struct

from pyemu.accel.exits import Stopped
from pyemu.target.x86.cpu_state import DescriptorTable, Segment
from pyemu.testing import FakeInterruptController, Gate, GuestProgram, describe, prepared, pte_address, run_program
from pyemu.testing.environment import IDT, TSS, TSS_SEL
from pyemu.testing.handlers import exit_with, read_frame, recording_handler


def run_prepared(program: GuestProgram, edit=None, interrupts=None):
    """Run with a hook to edit memory/state after the environment is built."""
    with prepared(program, interrupts=interrupts) as machine:
        if edit is not None:
            edit(machine)
        result = machine.vcpu.run()
        assert isinstance(result, Stopped), result
        return machine.board.exit_device.value, machine.board.memory.read(0, 0x100000)


class _Frames:
    def __init__(self, ram: bytes) -> None:
        self.ram = ram

    def u64(self, address: int) -> int:
        return int(struct.unpack_from("<Q", self.ram, address)[0])


def test_tss_too_short_for_ist_raises_ts() -> None:
    program = GuestProgram(
        code=f"ud2\n{exit_with(0xbad)}",
        handlers={10: recording_handler(0, error_code=True, then=exit_with(0x10))},
        gates={6: Gate(ist=2)},
    )

    def shorten_tss(machine) -> None:
        state = machine.vcpu.save_state()
        state.tr = Segment.tss64(TSS_SEL, TSS, 0x2B)   # IST2 lives at 0x2c..0x33
        machine.vcpu.load_state(state)

    value, ram = run_prepared(program, shorten_tss)
    assert value == 0x10
    frame = read_frame(_Frames(ram), 0)
    assert frame.error_code == TSS_SEL | 1     # TSS selector, EXT (a CPU exception was being delivered)


def test_non_canonical_ist_stack_raises_ss() -> None:
    program = GuestProgram(
        code=f"ud2\n{exit_with(0xbad)}",
        handlers={12: recording_handler(0, error_code=True, then=exit_with(0x12))},
        gates={6: Gate(ist=4)},
    )

    def poison_ist(machine) -> None:
        machine.board.memory.write_u64(TSS + 0x24 + 8 * 3, 0x0100_0000_0000_0000)

    value, ram = run_prepared(program, poison_ist)
    assert value == 0x12
    assert read_frame(_Frames(ram), 0).error_code == 1


def test_bad_gate_type_and_null_selector_raise_gp() -> None:
    program = GuestProgram(
        code=f"ud2\n{exit_with(0x600d)}",
        handlers={13: recording_handler(0, error_code=True, then=exit_with(0x13))},
    )

    def break_gate(machine) -> None:
        raw = bytearray(machine.board.memory.read(IDT + 16 * 6, 16))
        raw[5] = (raw[5] & 0xF0) | 0x6           # a 16-bit interrupt gate: invalid in long mode
        machine.board.memory.write(IDT + 16 * 6, bytes(raw))

    value, ram = run_prepared(program, break_gate)
    assert value == 0x13
    assert read_frame(_Frames(ram), 0).error_code == 6 * 8 + 2 + 1

    program.gates = {6: Gate(selector=0)}
    value, ram = run_prepared(program)
    assert value == 0x13
    assert read_frame(_Frames(ram), 0).error_code == 1


def test_external_interrupt_through_not_present_gate_sets_ext() -> None:
    controller = FakeInterruptController()
    program = GuestProgram(
        code=f"sti\nhlt\n{exit_with(0xbad)}",
        handlers={11: recording_handler(0, error_code=True, then=exit_with(0x11))},
        gates={0x30: Gate(present=False)},
    )
    controller.raise_vector(0x30)
    result = run_program(program, interrupts=controller)
    assert result.exit_value == 0x11, describe(result)
    assert read_frame(result, 0).error_code == 0x30 * 8 + 2 + 1


def test_page_fault_on_idt_read_during_page_fault_is_double_fault() -> None:
    """The #PF handler's gate lives in an IDT page that is not mapped: reading it faults (#PF during
    #PF delivery) -> #DF, delivered through a second IDT mapping that is intact."""
    program = GuestProgram(
        code=f"""
            mov rdi, 0x48000
            mov rax, [rdi]
            {exit_with(0xbad)}
        """,
        handlers={8: recording_handler(0, error_code=True, then=exit_with(0xdf))},
    )

    def unmap(machine) -> None:
        memory = machine.board.memory
        memory.write_u64(pte_address(0x48000), 0)
        # Copy the IDT so that entry 8 ends exactly at the end of mapped page 0x47000 and entry 14
        # (0x60 bytes later) lies on the unmapped page 0x48000.
        base = 0x48000 - 0x90
        memory.write(base, memory.read(IDT, 16 * 32))
        state = machine.vcpu.save_state()
        state.idt = DescriptorTable(base, 16 * 32 - 1)
        machine.vcpu.load_state(state)

    value, ram = run_prepared(program, unmap)
    assert value == 0xDF
    assert read_frame(_Frames(ram), 0).error_code == 0
