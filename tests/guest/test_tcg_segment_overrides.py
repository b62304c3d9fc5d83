"""Segment-override prefixes in 64-bit mode: CS, DS, ES and SS add no base, FS and GS do (the SDM's
segmentation in IA-32e mode).

Why it matters: Linux on one CPU patches its LOCK prefixes into DS prefixes (``ds cmpxchg`` in
``_raw_spin_lock``), and a DS loaded in user mode from a TLS descriptor keeps its base in the kernel.
QEMU 5.0's translator (Unicorn's) added that base for an explicit override, so in the x86 selftest
``ldt_gdt`` a timer interrupt during ``set_thread_area`` took the hrtimer lock at the lock's address plus
the test's TLS base, faulted and hung the guest (engine patch ``long-mode-ignores-cs-ds-es-ss-bases``).
"""

from __future__ import annotations

import struct

import pytest

from pyemu.accel.tcg.block_gate import _uc_library
from pyemu.testing import GuestProgram, describe, run_program
from pyemu.testing.environment import DATA
from pyemu.testing.handlers import exit_with

BASE = 0x10000  # the base the data descriptor gets: a based access would land at DATA + BASE
DATA_DPL3 = 0x20  # the environment's user data descriptor, rewritten below with a base
PYEMU_ENGINE = hasattr(_uc_library(), "pyemu_page_has_code")  # pyemu's libunicorn, not PyPI's


def _data_descriptor(base: int) -> int:
    """A present, writable, accessed data descriptor (DPL 3, 4 GiB, 32-bit) with ``base``."""
    low = 0xFFFF | ((base & 0xFFFF) << 16)
    high = ((base >> 16) & 0xFF) | (0xF3 << 8) | (0xF << 16) | (0xC << 20) | (base & 0xFF000000)
    return int.from_bytes(struct.pack("<II", low, high), "little")


def test_cs_ds_es_ss_overrides_add_no_base_in_64_bit_mode(accel: str, request: pytest.FixtureRequest) -> None:
    if accel == "tcg" and not PYEMU_ENGINE:
        request.applymarker(pytest.mark.xfail(strict=True, reason="PyPI's libunicorn adds the DS/ES base "
                                                                  "(QEMU 5.0's translator)"))
    program = GuestProgram(f"""
        mov rax, {_data_descriptor(BASE):#x}
        mov rbx, gdt
        mov qword ptr [rbx + {DATA_DPL3:#x}], rax
        mov eax, {DATA_DPL3:#x}
        mov ds, eax                          ; DS and ES now carry base {BASE:#x} in their caches
        mov es, eax
        mov rbx, {DATA:#x}
        mov rax, 0x1111
        mov qword ptr [rbx], rax
        xor ecx, ecx
        xor edx, edx
        xor esi, esi
        xor edi, edi
        .byte 0x3e, 0x48, 0x8b, 0x0b         ; ds mov rcx, [rbx]
        .byte 0x26, 0x48, 0x8b, 0x13         ; es mov rdx, [rbx]
        .byte 0x2e, 0x48, 0x8b, 0x33         ; cs mov rsi, [rbx]
        .byte 0x36, 0x48, 0x8b, 0x3b         ; ss mov rdi, [rbx]
        .byte 0x3e, 0xf0, 0x48, 0x0f, 0xb1, 0x0b   ; ds lock cmpxchg [rbx], rcx (rax == [rbx]: stores rcx)
        add rcx, rdx
        add rcx, rsi
        add rcx, rdi
        add rcx, qword ptr [rbx]
        mov eax, 0x10
        mov ds, eax
        mov es, eax
        mov rax, rcx
        {exit_with("eax")}
    """)
    result = run_program(program, accel)
    assert result.exit_value == 5 * 0x1111, describe(result)
