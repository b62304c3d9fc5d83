"""Tiny multiboot guests for the API tests: no Linux, so a VM starts in about a second."""

from __future__ import annotations

from pathlib import Path

from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

LOAD_ADDR = 0x100000
ENTRY = LOAD_ADDR + 32  # make_multiboot_binary puts the 32-byte header first

# Prints READY, then echoes every byte typed at COM1 upper-cased (so the test sees the guest's work, not
# a loopback). Polls the line status register: no interrupts needed.
ECHO_SOURCE = """
    mov dx, 0x3f8
    mov al, 0x52
    out dx, al
    mov al, 0x45
    out dx, al
    mov al, 0x41
    out dx, al
    mov al, 0x44
    out dx, al
    mov al, 0x59
    out dx, al
    mov al, 0x0a
    out dx, al
poll:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jz poll
    mov dx, 0x3f8
    in al, dx
    cmp al, 0x61
    jb echo
    cmp al, 0x7a
    ja echo
    sub al, 0x20
echo:
    out dx, al
    jmp poll
"""

SPIN = b"\xeb\xfe"  # jmp $


def write_echo_kernel(directory: Path) -> Path:
    path = directory / "echo.bin"
    path.write_bytes(make_multiboot_binary(assemble(ECHO_SOURCE, address=ENTRY, bits=32)))
    return path


def write_spin_kernel(directory: Path) -> Path:
    path = directory / "spin.bin"
    path.write_bytes(make_multiboot_binary(SPIN))
    return path


def write_program_kernel(directory: Path, name: str, source: str) -> Path:
    """A multiboot kernel of 32-bit ``source`` (flat protected mode, as multiboot enters)."""
    path = directory / f"{name}.bin"
    path.write_bytes(make_multiboot_binary(assemble(source, address=ENTRY, bits=32)))
    return path
