"""A guest program that counts and checks itself, for save/restore tests (no Linux: starts in a second).

The loop keeps a counter both in RAM (``COUNTER_ADDR``) and in EBX, and stores the guest TSC next to it;
each iteration checks that RAM and register agree and that the TSC never went backwards. A mismatch (a
restore that lost RAM or registers, or a TSC that jumped back) writes 0x55 to isa-debug-exit, ending the VM
with status 0xab. Register-based addressing only (keystone 0.9.2 miscodes some absolute operands).
"""

from __future__ import annotations

from pathlib import Path

from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

LOAD_ADDR = 0x100000
ENTRY = LOAD_ADDR + 32  # make_multiboot_binary puts the 32-byte header first
COUNTER_ADDR = 0x300000
TSC_ADDR = COUNTER_ADDR + 8
FAIL_STATUS = (0x55 << 1) | 1

COUNTER_SOURCE = f"""
    mov edi, {COUNTER_ADDR:#x}
    xor ebx, ebx
    mov dword ptr [edi], 0
    rdtsc
    mov [edi + 8], eax
    mov [edi + 12], edx
loop:
    inc dword ptr [edi]
    inc ebx
    cmp [edi], ebx
    jne fail
    mov esi, [edi + 8]
    mov ebp, [edi + 12]
    rdtsc
    cmp edx, ebp
    jb fail
    ja store
    cmp eax, esi
    jb fail
store:
    mov [edi + 8], eax
    mov [edi + 12], edx
    jmp loop
fail:
    mov dx, 0xf4
    mov al, 0x55
    out dx, al
spin:
    jmp spin
"""


def write_counter_kernel(directory: Path) -> Path:
    path = directory / "counter.bin"
    path.write_bytes(make_multiboot_binary(assemble(COUNTER_SOURCE, address=ENTRY, bits=32)))
    return path
