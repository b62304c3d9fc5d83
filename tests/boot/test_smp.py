"""``-smp 2`` under KVM on the microvm board: the boot processor starts the second vCPU with INIT/SIPI
through its in-kernel local APIC, and the application processor demonstrably runs.

A second, cheaper-to-read check boots Debian's kernel under ``-smp 2`` until it reports both CPUs from
the board's ACPI MADT (early boot: this host's KVM goes no further, DESIGN.md).

The board gives only vCPU 0 an entry state; vCPU 1 stays in KVM's reset wait-for-SIPI state, as on a PC.
The test kernel (multiboot, 32-bit flat protected mode) copies a real-mode trampoline below 1 MiB,
enables its xAPIC at 0xfee00000, sends INIT and a start-up IPI to APIC ID 1 and waits on a mailbox. The AP
reads its initial APIC ID with CPUID, prints it on COM1 and writes it into the mailbox; the BSP then prints
"OK" and leaves through isa-debug-exit with a status derived from the AP's ID. Bounded twice: the BSP gives
up after a fixed number of polls (its own exit status), and the process has a wall-clock timeout.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyemu.accel.base import AcceleratorUnavailable
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

pytestmark = [pytest.mark.kvm]

ENTRY = 0x100000 + 32  # make_multiboot_binary puts the code right after the 32-byte header
TRAMPOLINE = 0x8000  # below 1 MiB, page aligned, unused by the boot loaders (target/x86/boot/layout.py)
MAILBOX = 0x9000
GAVE_UP = 0x7F  # BSP's exit value when the AP never answered
POLLS = 3_000_000  # ~seconds of emulated ring-0 polling on this PVM host

AP_TRAMPOLINE = f"""
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


def bsp_code(trampoline_at: int, trampoline_len: int) -> str:
    return f"""
    mov dx, 0x3f8
    mov al, 0x42
    out dx, al
    mov al, 0x0a
    out dx, al
    mov esi, {trampoline_at:#x}
    mov edi, {TRAMPOLINE:#x}
    mov ecx, {trampoline_len:#x}
    cld
    rep movsb
    mov ebx, {MAILBOX:#x}
    mov dword ptr [ebx], 0
    mov ebx, 0xfee000f0
    mov dword ptr [ebx], 0x1ff
    mov ebx, 0xfee00310
    mov dword ptr [ebx], 0x01000000
    mov ebx, 0xfee00300
    mov dword ptr [ebx], 0x4500
    mov dword ptr [ebx], {0x4600 | TRAMPOLINE >> 12:#x}
    mov ebx, {MAILBOX:#x}
    mov ecx, {POLLS:#x}
wait:
    mov eax, [ebx]
    test eax, eax
    jnz answered
    dec ecx
    jnz wait
    mov dx, 0xf4
    mov eax, {GAVE_UP:#x}
    out dx, eax
answered:
    mov dx, 0x3f8
    mov al, 0x4f
    out dx, al
    mov al, 0x4b
    out dx, al
    mov al, 0x0a
    out dx, al
    mov eax, [ebx]
    and eax, 0x7f
    or eax, 0x10
    mov dx, 0xf4
    out dx, eax
    cli
stop:
    hlt
    jmp stop
"""


def smp_kernel() -> bytes:
    trampoline = assemble(AP_TRAMPOLINE, address=0, bits=16)
    # Instruction sizes do not depend on the immediates (imm32 forms), so two passes place the trampoline
    # right after the BSP code.
    first = assemble(bsp_code(0, len(trampoline)), address=ENTRY, bits=32)
    code = assemble(bsp_code(ENTRY + len(first), len(trampoline)), address=ENTRY, bits=32)
    assert len(code) == len(first)
    return make_multiboot_binary(code + trampoline)


@pytest.fixture(scope="module")
def kvm_usable():
    from pyemu.accel.kvm.accel import KvmAccelerator

    try:
        KvmAccelerator().close()
    except AcceleratorUnavailable as error:
        pytest.skip(f"KVM unusable on this host: {error}")


def test_bsp_starts_the_ap_with_init_sipi_and_the_ap_runs(tmp_path, kvm_usable):
    image = tmp_path / "smp-kernel.bin"
    image.write_bytes(smp_kernel())
    proc = subprocess.run(
        [sys.executable, "-m", "pyemu.system.main", "-machine", "microvm", "-accel", "kvm", "-smp", "2",
         "-m", "64M", "-kernel", str(image), "-nographic", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
    )
    assert proc.returncode != (GAVE_UP << 1) | 1, f"the AP never answered; stdout {proc.stdout!r}"
    # Exit value 0x10 | APIC ID 1 -> status (0x11 << 1) | 1; "AP1" came from the AP's own CPUID.
    assert proc.returncode == (0x11 << 1) | 1, proc.stderr
    assert proc.stdout == b"B\nAP1\nOK\n"


@pytest.mark.assets
@pytest.mark.slow
def test_linux_finds_two_cpus_in_the_madt(console, guest_assets, kvm_usable):
    vm = console(["-machine", "microvm", "-accel", "kvm", "-smp", "2", "-m", "512M",
                  "-kernel", str(guest_assets.vmlinux), "-initrd", str(guest_assets.initrd),
                  "-append", "console=ttyS0 earlyprintk=ttyS0", "-nographic"])
    out = vm.expect(b"smpboot: Allowing 2 CPUs", 90).decode(errors="replace")
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in out
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in vm.expect(b"hotplug CPUs", 10).decode(errors="replace")
