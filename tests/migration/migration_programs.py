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


def window_pass(address: int, pages: int) -> str:
    """One pass of stores of the rising count (EBX) into the first word of each page of a window (labels
    ``outer``, at its start, and ``inner``)."""
    return f"""outer:
    mov edi, {address:#x}
    mov ecx, {pages}
inner:
    inc ebx
    mov [edi], ebx
    add edi, 0x1000
    dec ecx
    jnz inner
"""


BUFFER_ADDR = 0x400000
BUFFER_SIZE = 20 << 20
WINDOW_PAGES = 256
FILL = 0x5A5A5A5A
DIRTY_SOURCE = f"""
    mov edi, {BUFFER_ADDR:#x}
    mov ecx, {BUFFER_SIZE // 4:#x}
    mov eax, {FILL:#x}
    cld
    rep stosd
    xor ebx, ebx
{window_pass(BUFFER_ADDR, WINDOW_PAGES)}    jmp outer
"""
"""Fills 20 MiB with a pattern, then keeps writing a rising count into the first word of each page of
a 1 MiB window: the memory a live migration must send once, and a set of pages it must keep resending."""


def write_dirty_kernel(directory: Path) -> Path:
    path = directory / "dirty.bin"
    path.write_bytes(make_multiboot_binary(assemble(DIRTY_SOURCE, address=ENTRY, bits=32)))
    return path


PAGING_PD = 0x200000
PAGING_WINDOW = 0x800000
PAGING_WINDOW_PAGES = 64
PAGING_SOURCE = f"""
    mov edi, {PAGING_PD + 0x1000:#x}
    mov eax, 0x3
    mov ecx, 4096
ptes:
    mov [edi], eax
    add eax, 0x1000
    add edi, 4
    dec ecx
    jnz ptes
    mov edi, {PAGING_PD:#x}
    mov eax, {PAGING_PD + 0x1003:#x}
    mov ecx, 4
pdes:
    mov [edi], eax
    add eax, 0x1000
    add edi, 4
    dec ecx
    jnz pdes
    mov eax, {PAGING_PD:#x}
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    xor ebx, ebx
{window_pass(PAGING_WINDOW, PAGING_WINDOW_PAGES)}    mov esi, ebx
    and esi, 0x3f000
    mov eax, {PAGING_WINDOW + 0x100000:#x}
    add eax, esi
    mov [eax + 8], ebx
    jmp outer
"""
"""Identity-maps 16 MiB with 4 KiB pages (32-bit paging, accessed/dirty bits clear), then keeps writing
a count into the first word of each page of a 256 KiB window, and now and then one page of the 256 KiB
after the next MiB: stores through page tables whose accessed/dirty bits the CPU sets as it goes."""


def write_paging_kernel(directory: Path) -> Path:
    path = directory / "paging.bin"
    path.write_bytes(make_multiboot_binary(assemble(PAGING_SOURCE, address=ENTRY, bits=32)))
    return path
