"""Small multiboot kernels that exercise several CPUs on a real board (``-smp 2``), for any accelerator.

Each kernel is entered by the boot processor (BSP) in flat 32-bit protected mode with paging off. The BSP
copies a real-mode trampoline to :data:`TRAMPOLINE`, enables its xAPIC at 0xfee00000, sends INIT and a
start-up IPI to APIC ID 1 and then runs its part of the scenario; the application processor (AP) runs the
trampoline in real mode (DS = 0, so addresses below 64 KiB are linear). The BSP ends the run through
``isa-debug-exit`` at port :data:`EXIT_PORT` with a status that says what happened, and gives up after a
bounded number of polls so a broken AP start ends the run instead of hanging it.

Scenarios:

* :func:`ap_startup_kernel` -- the AP prints its CPUID APIC ID on COM1 and answers through a mailbox.
* :func:`shared_memory_kernel` -- both CPUs increment one counter with ``lock inc`` and another inside a
  PAUSE-spinning ``xchg`` spinlock; lost updates mean the CPUs did not run as atomically as real ones.
* :func:`code_patch_kernel` -- the AP calls a function the BSP then rewrites (cross-modifying code); the
  AP must run the new code, not a stale translation.
"""

from __future__ import annotations

from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

ENTRY = 0x100000 + 32  # make_multiboot_binary puts the code right after the 32-byte header
TRAMPOLINE = 0x8000    # below 1 MiB, page aligned, unused by the boot loaders
MAILBOX = 0x9000       # AP -> BSP: non-zero once the AP answered
FLAG = 0x9004          # BSP -> AP: the next step may start
COUNTER = 0x9100       # incremented with lock inc by both CPUs
LOCKED_COUNTER = 0x9104  # incremented non-atomically inside the spinlock
SPINLOCK = 0x9200
FUNCTION = 0xA000      # the patched function (its own page)
EXIT_PORT = 0xF4
GAVE_UP = 0x7F         # the AP never answered
POLLS = 3_000_000


def exit_status(value: int) -> int:
    """The process exit status isa-debug-exit gives for ``value``."""
    return ((value << 1) | 1) & 0xFF


def _bsp_prologue(trampoline_at: int, trampoline_len: int) -> str:
    return f"""
    mov esi, {trampoline_at:#x}
    mov edi, {TRAMPOLINE:#x}
    mov ecx, {trampoline_len:#x}
    cld
    rep movsb
    mov dword ptr [{MAILBOX:#x}], 0
    mov dword ptr [{FLAG:#x}], 0
    mov ebx, 0xfee000f0
    mov dword ptr [ebx], 0x1ff
    mov ebx, 0xfee00310
    mov dword ptr [ebx], 0x01000000
    mov ebx, 0xfee00300
    mov dword ptr [ebx], 0xc500
    mov dword ptr [ebx], 0x8500
    mov dword ptr [ebx], {0x4600 | TRAMPOLINE >> 12:#x}
    mov dword ptr [ebx], {0x4600 | TRAMPOLINE >> 12:#x}
"""


def _wait_mailbox(label: str) -> str:
    """Poll the mailbox (with PAUSE) until non-zero; give up with GAVE_UP after POLLS polls."""
    return f"""
    mov ecx, {POLLS:#x}
{label}:
    mov eax, [{MAILBOX:#x}]
    test eax, eax
    jnz {label}_done
    pause
    dec ecx
    jnz {label}
    mov dx, {EXIT_PORT:#x}
    mov eax, {GAVE_UP:#x}
    out dx, eax
{label}_done:
"""


def _exit_with_eax() -> str:
    return f"""
    mov dx, {EXIT_PORT:#x}
    out dx, eax
    cli
stop:
    hlt
    jmp stop
"""


def _kernel(bsp_body: str, ap_code: str, setup: str = "") -> bytes:
    """BSP: ``setup``, start the AP, ``bsp_body``; the AP runs ``ap_code`` (16-bit, at TRAMPOLINE)."""
    trampoline = assemble(ap_code, address=0, bits=16)
    # Instruction sizes do not depend on the immediates (imm32 forms), so two passes place the trampoline
    # right after the BSP code.
    first = assemble(setup + _bsp_prologue(0, len(trampoline)) + bsp_body, address=ENTRY, bits=32)
    code = assemble(setup + _bsp_prologue(ENTRY + len(first), len(trampoline)) + bsp_body, address=ENTRY,
                    bits=32)
    if len(code) != len(first):
        raise AssertionError("BSP code size changed between passes")
    return make_multiboot_binary(code + trampoline)


def ap_startup_kernel() -> bytes:
    """Output on COM1: ``B`` (BSP up), ``AP<id>`` (from the AP's CPUID), ``OK``; exit value 0x10 | AP ID."""
    ap = f"""
    xor ax, ax
    mov ds, ax
    mov eax, 1
    cpuid
    shr ebx, 24
    mov dx, 0x3f8
    mov al, 0x41
    out dx, al
    mov al, 0x50
    out dx, al
    mov al, bl
    add al, 0x30
    out dx, al
    mov al, 0x0a
    out dx, al
    or bl, 0x80
    mov si, {MAILBOX:#x}
    mov byte ptr [si], bl
    cli
halt:
    hlt
    jmp halt
"""
    setup = """
    mov dx, 0x3f8
    mov al, 0x42
    out dx, al
    mov al, 0x0a
    out dx, al
"""
    bsp = f"""
{_wait_mailbox("wait")}
    mov dx, 0x3f8
    mov al, 0x4f
    out dx, al
    mov al, 0x4b
    out dx, al
    mov al, 0x0a
    out dx, al
    mov eax, [{MAILBOX:#x}]
    and eax, 0x7f
    or eax, 0x10
{_exit_with_eax()}
"""
    return _kernel(bsp, ap, setup)


SHARED_OK = 0x21
SHARED_ATOMIC_LOST = 0x22
SHARED_LOCK_BROKEN = 0x23


def _increment_loops(iterations: int, prefix: str) -> str:
    """``iterations`` x (lock inc COUNTER; spinlock-protected non-atomic inc of LOCKED_COUNTER)."""
    reg = "ecx"
    return f"""
    mov {reg}, {iterations:#x}
{prefix}_loop:
    lock inc dword ptr [{COUNTER:#x}]
{prefix}_acquire:
    mov eax, 1
    xchg eax, dword ptr [{SPINLOCK:#x}]
    test eax, eax
    jz {prefix}_locked
{prefix}_spin:
    pause
    cmp dword ptr [{SPINLOCK:#x}], 0
    jne {prefix}_spin
    jmp {prefix}_acquire
{prefix}_locked:
    mov eax, dword ptr [{LOCKED_COUNTER:#x}]
    inc eax
    mov dword ptr [{LOCKED_COUNTER:#x}], eax
    mov dword ptr [{SPINLOCK:#x}], 0
    dec {reg}
    jnz {prefix}_loop
"""


def shared_memory_kernel(iterations: int) -> bytes:
    """Both CPUs run :func:`_increment_loops`; exit value SHARED_OK when both counters are exactly
    2 x ``iterations``, SHARED_ATOMIC_LOST or SHARED_LOCK_BROKEN otherwise, GAVE_UP if the AP never
    finished."""
    ap = f"""
    xor ax, ax
    mov ds, ax
{_increment_loops(iterations, "ap")}
    mov dword ptr [{MAILBOX:#x}], 1
    cli
halt:
    hlt
    jmp halt
"""
    setup = f"""
    mov dword ptr [{COUNTER:#x}], 0
    mov dword ptr [{LOCKED_COUNTER:#x}], 0
    mov dword ptr [{SPINLOCK:#x}], 0
"""
    bsp = f"""
{_increment_loops(iterations, "bsp")}
{_wait_mailbox("wait")}
    mov eax, {SHARED_ATOMIC_LOST:#x}
    cmp dword ptr [{COUNTER:#x}], {2 * iterations:#x}
    jne done
    mov eax, {SHARED_LOCK_BROKEN:#x}
    cmp dword ptr [{LOCKED_COUNTER:#x}], {2 * iterations:#x}
    jne done
    mov eax, {SHARED_OK:#x}
done:
{_exit_with_eax()}
"""
    return _kernel(bsp, ap, setup)


PATCH_OK = 0x31
PATCH_STALE = 0x32
PATCH_WRONG_FIRST = 0x33
_OLD_VALUE = 0x11
_NEW_VALUE = 0x22


def code_patch_kernel() -> bytes:
    """Cross-modifying code. The BSP writes ``mov al, 0x11; ret`` at FUNCTION (so it holds a write
    mapping of that page from before any CPU ran code there), starts the AP, which calls the function and
    posts the result in the mailbox; the BSP then patches the immediate to 0x22 and raises FLAG; the AP
    calls the function again and posts the new result. Exit value PATCH_OK if the AP saw 0x11 then 0x22,
    PATCH_STALE if it ran the old code after the patch."""
    call_offset = FUNCTION - TRAMPOLINE  # the AP's CS base is TRAMPOLINE
    ap = f"""
    xor ax, ax
    mov ds, ax
    call {call_offset:#x}
    movzx ebx, al
    or ebx, 0x100
    mov dword ptr [{MAILBOX:#x}], ebx
wait_flag:
    pause
    cmp dword ptr [{FLAG:#x}], 0
    je wait_flag
    call {call_offset:#x}
    movzx ebx, al
    or ebx, 0x200
    mov dword ptr [{MAILBOX:#x}], ebx
    cli
halt:
    hlt
    jmp halt
"""
    bsp = f"""
{_wait_mailbox("first")}
    mov eax, {PATCH_WRONG_FIRST:#x}
    cmp dword ptr [{MAILBOX:#x}], {0x100 | _OLD_VALUE:#x}
    jne done
    mov dword ptr [{MAILBOX:#x}], 0
    mov byte ptr [{FUNCTION + 1:#x}], {_NEW_VALUE:#x}
    mov dword ptr [{FLAG:#x}], 1
{_wait_mailbox("second")}
    mov eax, {PATCH_STALE:#x}
    cmp dword ptr [{MAILBOX:#x}], {0x200 | _NEW_VALUE:#x}
    jne done
    mov eax, {PATCH_OK:#x}
done:
{_exit_with_eax()}
"""
    # mov al, 0x11; ret; nop -- written before the AP starts, so the BSP's TLB maps the page writable.
    setup = f"""
    mov dword ptr [{FUNCTION:#x}], {0xB0 | _OLD_VALUE << 8 | 0xC3 << 16 | 0x90 << 24:#x}
"""
    return _kernel(bsp, ap, setup)
