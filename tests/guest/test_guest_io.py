"""Port and MMIO traffic reaches devices with offsets, sizes and values; unassigned space reads all-ones."""

from __future__ import annotations

from pyemu.testing import Access, GuestProgram, describe, run_program
from pyemu.testing.environment import DATA, RECORD_MMIO
from pyemu.testing.handlers import exit_with


def test_port_io_sizes_offsets_and_values(accel: str) -> None:
    program = GuestProgram(f"""
        mov dx, record_port
        mov al, 0x11
        out dx, al
        add dx, 2
        mov ax, 0x2222
        out dx, ax
        add dx, 2
        mov eax, 0x33333333
        out dx, eax
        mov dx, record_port
        add dx, 8
        in al, dx
        movzx r8, al
        in ax, dx
        movzx r9, ax
        in eax, dx
        mov r10, rax
        mov dx, 0x7f0                       ; nothing there
        in eax, dx
        mov r11, rax
        {exit_with(0x600d)}
    """)
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert [a for a in result.traffic if a.space == "pio"] == [
        Access("pio", "write", 0, 1, 0x11),
        Access("pio", "write", 2, 2, 0x2222),
        Access("pio", "write", 4, 4, 0x33333333),
        Access("pio", "read", 8, 1, 0x08),
        Access("pio", "read", 8, 2, 0x1008),
        Access("pio", "read", 8, 4, 0x1008),
    ]
    assert (result.regs["r8"], result.regs["r9"], result.regs["r10"]) == (0x08, 0x1008, 0x1008)
    assert result.regs["r11"] == 0xFFFFFFFF


def test_string_port_output(accel: str) -> None:
    program = GuestProgram(f"""
        mov rdi, data
        mov dword ptr [rdi], 0x44332211
        mov rsi, rdi
        mov rcx, 4
        mov dx, record_port
        cld
        rep outsb
        {exit_with(0x600d)}
    """)
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert [(a.kind, a.offset, a.size, a.value) for a in result.traffic] == [
        ("write", 0, 1, 0x11), ("write", 0, 1, 0x22), ("write", 0, 1, 0x33), ("write", 0, 1, 0x44)]


def test_mmio_sizes_offsets_and_values(accel: str) -> None:
    program = GuestProgram(f"""
        mov rbx, record_mmio
        mov byte ptr [rbx + 0x10], 0x11
        mov word ptr [rbx + 0x22], 0x2222
        mov dword ptr [rbx + 0x34], 0x33333333
        movzx r8, byte ptr [rbx + 0x41]
        movzx r9, word ptr [rbx + 0x52]
        mov r10d, dword ptr [rbx + 0x64]
        mov rbx, 0x30000000                 ; unassigned device space
        mov r11d, dword ptr [rbx]
        mov dword ptr [rbx], 0x1234         ; dropped
        {exit_with(0x600d)}
    """)
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert [a for a in result.traffic if a.space == "mmio"] == [
        Access("mmio", "write", 0x10, 1, 0x11),
        Access("mmio", "write", 0x22, 2, 0x2222),
        Access("mmio", "write", 0x34, 4, 0x33333333),
        Access("mmio", "read", 0x41, 1, 0x41),
        Access("mmio", "read", 0x52, 2, 0x1052),
        Access("mmio", "read", 0x64, 4, 0x1064),
    ]
    assert (result.regs["r8"], result.regs["r9"], result.regs["r10"]) == (0x41, 0x1052, 0x1064)
    assert result.regs["r11"] == 0xFFFFFFFF


def test_ram_written_by_guest_is_visible(accel: str) -> None:
    program = GuestProgram(f"""
        mov rdi, data
        mov rax, 0x1122334455667788
        mov [rdi + 0x40], rax
        {exit_with(0x600d)}
    """)
    result = run_program(program, accel)
    assert result.exit_value == 0x600D, describe(result)
    assert result.u64(DATA + 0x40) == 0x1122334455667788
    assert RECORD_MMIO > len(result.ram)
