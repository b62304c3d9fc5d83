"""The guest-program kit itself: assembler conventions and guards, environment symbols, fake devices."""

from __future__ import annotations

import pytest

from pyemu.testing import AssemblyError, FakeInterruptController, GuestProgram, LayoutError, assemble, pte_address
from pyemu.testing.asm import decimals_as_hex, strip_comments
from pyemu.testing.environment import PT0, base_symbols
from pyemu.testing.runner import run_program


def test_decimal_literals_mean_decimal() -> None:
    assert assemble("mov eax, 42", address=0) == b"\xb8\x2a\x00\x00\x00"
    assert assemble("mov eax, 0x42", address=0) == b"\xb8\x42\x00\x00\x00"
    assert decimals_as_hex("loop1: mov rax, [rbx + r15*8 + 16]") == "loop1: mov rax, [rbx + r15*8 + 0x10]"


def test_semicolon_starts_a_comment() -> None:
    assert strip_comments("nop ; nop\nnop") == "nop \nnop"
    assert assemble("nop ; int3", address=0) == b"\x90"


def test_absolute_memory_operand_is_refused() -> None:
    with pytest.raises(AssemblyError, match="RIP-relative"):
        assemble("mov rbx, [0x40000]", address=0x100000)
    assert assemble("mov rbx, 0x40000\nmov rax, [rbx]", address=0x100000)


def test_unknown_symbol_is_reported() -> None:
    with pytest.raises(AssemblyError, match="no_such_label"):
        assemble("jmp no_such_label", address=0)


def test_symbols_and_layout_helpers() -> None:
    symbols = base_symbols("long")
    assert symbols["user_cs"] & 3 == 3 and symbols["kernel_cs"] & 3 == 0
    assert pte_address(0x48000) == PT0 + 8 * 0x48
    with pytest.raises(LayoutError):
        pte_address(0x400000)
    with pytest.raises(LayoutError):
        GuestProgram("nop", mode="real")


def test_unexpected_exception_is_reported_by_vector() -> None:
    result = run_program(GuestProgram("xor ecx, ecx\ndiv ecx"))
    assert result.unexpected_vector == 0


def test_fake_controller_orders_by_vector_and_validates() -> None:
    controller = FakeInterruptController()
    controller.raise_vector(0x30)
    controller.raise_vector(0x50)
    controller.raise_vector(0x40)
    assert controller.pending == [0x50, 0x40, 0x30]
    assert [controller.acknowledge_interrupt() for _ in range(4)] == [0x50, 0x40, 0x30, None]
    with pytest.raises(ValueError):
        controller.raise_vector(3)
