"""The microvm board end to end through the ``pyemu`` command, with tiny multiboot test kernels.

Each kernel is 32-bit code assembled here, loaded by the real multiboot loader, run on the software CPU,
and talks to the board's real devices: COM1, isa-debug-exit, the GED sleep register, the i8042 reset line.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pyemu.machines import memmap
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

ENTRY = 0x100000 + 32  # make_multiboot_binary puts the code right after the 32-byte header

PRINT_HELLO = """
    mov dx, 0x3f8
    mov al, 0x68
    out dx, al
    mov al, 0x69
    out dx, al
    mov al, 0x0a
    out dx, al
"""


def kernel(tmp_path, body: str) -> str:
    code = assemble(PRINT_HELLO + body, address=ENTRY, bits=32)
    path = tmp_path / "test-kernel.bin"
    path.write_bytes(make_multiboot_binary(code))
    return str(path)


def pyemu(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pyemu.system.main", "-accel", "tcg", "-m", "64M", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)


def test_isa_debug_exit_status_and_serial_output(tmp_path):
    image = kernel(tmp_path, "mov dx, 0xf4\n mov eax, 0x21\n out dx, eax\n hlt")
    proc = pyemu("-kernel", image, "-nographic", "-device", "isa-debug-exit,iobase=0xf4,iosize=4")
    assert proc.returncode == (0x21 << 1) | 1, proc.stderr
    assert proc.stdout == b"hi\n"


def test_ged_sleep_register_powers_off_with_status_0(tmp_path):
    # SLP_TYP=5 (S5) in bits 2-4 and SLP_EN (bit 5) of the hardware-reduced sleep control register.
    image = kernel(tmp_path, f"mov edi, {memmap.GED_BASE + 4:#x}\n mov al, 0x34\n mov [edi], al\n"
                             "spin: jmp spin")
    proc = pyemu("-kernel", image, "-nographic")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hi\n"


@pytest.mark.parametrize("how", ["i8042", "triple-fault"])
def test_reset_with_no_reboot_exits_0_and_logs_the_reason(tmp_path, how):
    body = {
        "i8042": "mov al, 0xfe\n out 0x64, al\n spin: jmp spin",
        # An IDT with limit 0: the #UD cannot be delivered (#GP), nor that (#DF): a triple fault.
        "triple-fault": "xor eax, eax\n push eax\n push eax\n mov eax, esp\n lidt [eax+2]\n ud2",
    }[how]
    image = kernel(tmp_path, body)
    proc = pyemu("-kernel", image, "-nographic", "-no-reboot", "-d", "guest_errors,exec")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hi\n"
    if how == "i8042":
        assert b"shutdown requested: guest-reset" in proc.stderr
    else:
        assert b"pyemu: vcpu0: triple fault, exiting (-no-reboot)" in proc.stderr


@pytest.mark.parametrize("how", ["i8042", "triple-fault"])
def test_reset_without_no_reboot_boots_again(tmp_path, how):
    body = {
        "i8042": "mov al, 0xfe\n out 0x64, al\n spin: jmp spin",
        "triple-fault": "xor eax, eax\n push eax\n push eax\n mov eax, esp\n lidt [eax+2]\n ud2",
    }[how]
    image = kernel(tmp_path, body)
    proc = subprocess.Popen([sys.executable, "-m", "pyemu.system.main", "-accel", "tcg", "-m", "64M",
                             "-kernel", image, "-nographic"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 60
        while out.count(b"hi\n") < 3 and time.monotonic() < deadline:
            chunk = proc.stdout.read1(4096)  # type: ignore[union-attr]
            if not chunk:
                break
            out += chunk
        assert out.count(b"hi\n") >= 3, out  # the kernel ran again after each reset
    finally:
        proc.kill()
        proc.communicate()


def test_hlt_with_interrupts_disabled_leaves_the_vm_running_until_killed(tmp_path):
    image = kernel(tmp_path, "cli\n hlt")
    proc = subprocess.Popen([sys.executable, "-m", "pyemu.system.main", "-accel", "tcg", "-m", "64M",
                             "-kernel", image, "-nographic"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(3) == b"hi\n"  # type: ignore[union-attr]
        time.sleep(1.0)
        assert proc.poll() is None  # a dead CPU is not a shutdown, as on hardware and in QEMU
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.communicate()



def test_jump_to_the_bios_reset_vector_resets_the_machine(tmp_path):
    """Linux's last-resort reboot (machine_real_restart) enters real mode at F000:FFF0. There is no
    firmware; the board's reset-vector stub pulses the i8042 reset line as a BIOS would. Without it the
    CPU would run zeros forever and this test would time out."""
    far_jmp_f000_fff0 = bytes([0xEA, 0xF0, 0xFF, 0x00, 0xF0])  # jmp ptr16:16 (keystone cannot encode it)
    trampoline = assemble("mov eax, cr0\n and eax, 0xfffffffe\n mov cr0, eax", address=0x2000, bits=16)
    trampoline += far_jmp_f000_fff0
    trampoline += bytes(-len(trampoline) % 4)
    copy = "".join(f"mov dword ptr [edi+{i}], {int.from_bytes(trampoline[i:i + 4], 'little'):#x}\n"
                   for i in range(0, len(trampoline), 4))
    body = f"""
        mov edi, 0x3000
        mov dword ptr [edi], 0
        mov dword ptr [edi+4], 0
        mov dword ptr [edi+8], 0x0000ffff
        mov dword ptr [edi+12], 0x00009a00
        mov word ptr [edi+16], 15
        mov dword ptr [edi+18], 0x3000
        lgdt [edi+16]
        mov edi, 0x2000
        {copy}
        .byte 0xea, 0x00, 0x20, 0x00, 0x00, 0x08, 0x00
    """  # the last line: jmp 0x08:0x2000 (ptr16:32), into the 16-bit segment
    proc = pyemu("-kernel", kernel(tmp_path, body), "-nographic", "-no-reboot", "-d", "exec", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"hi\n"
    assert b"shutdown requested: guest-reset" in proc.stderr


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_pvh_test_kernel_same_output_and_status_on_both_accelerators(tmp_path, accel):
    """A PVH ELF (32-bit entry, EBX = hvm_start_info) prints the start_info magic's low byte count of
    characters and exits through isa-debug-exit: identical observable behaviour on TCG and KVM."""
    if accel == "kvm":
        from pyemu.testing.accelerators import kvm_unavailable_reason

        reason = kvm_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    from pyemu.target.x86.boot.synthetic import make_pvh_elf

    load = 0x1000000
    code = assemble(PRINT_HELLO + """
        mov eax, [ebx]              /* hvm_start_info.magic = 0x336ec578 */
        cmp eax, 0x336ec578
        jne bad
        mov dx, 0x3f8
        mov al, 0x4f                /* 'O' */
        out dx, al
        mov al, 0x4b                /* 'K' */
        out dx, al
        mov dx, 0xf4
        mov eax, 0x2a
        out dx, eax
    bad:
        mov dx, 0xf4
        mov eax, 0x3
        out dx, eax
    """, address=load, bits=32)
    path = tmp_path / "pvh-test.elf"
    path.write_bytes(make_pvh_elf(code, load_addr=load))
    proc = subprocess.run([sys.executable, "-m", "pyemu.system.main", "-accel", accel, "-m", "64M",
                           "-kernel", str(path), "-nographic", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert proc.returncode == (0x2A << 1) | 1, proc.stderr
    assert proc.stdout == b"hi\nOK"


def test_dash_s_creates_the_vm_paused(tmp_path):
    """The VM is built and waits in prelaunch: QMP answers while not one guest instruction has run (the
    kernel would exit at once with status 3). Ready is what QMP says, not a fixed delay (start-up takes
    seconds on a busy host, and a SIGTERM before the handlers exist ends the process differently)."""
    import json
    import socket as socket_module

    image = kernel(tmp_path, "mov dx, 0xf4\n mov eax, 1\n out dx, eax\n hlt")
    qmp = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pyemu.system.main", "-accel", "tcg", "-m", "64M",
                             "-kernel", image, "-nographic", "-S", "-qmp", f"unix:{qmp},server=on,wait=off",
                             "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not qmp.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.05)
        with socket_module.socket(socket_module.AF_UNIX) as client:
            client.settimeout(60)
            client.connect(str(qmp))
            reader = client.makefile("rb")
            json.loads(reader.readline())  # greeting
            client.sendall(b'{"execute": "qmp_capabilities"}\n')
            json.loads(reader.readline())
            client.sendall(b'{"execute": "query-status"}\n')
            assert json.loads(reader.readline())["return"]["status"] == "prelaunch"
        assert proc.poll() is None
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert out == b""  # not one guest instruction ran
        assert proc.returncode == 0
    finally:
        proc.kill()


def test_board_states_the_accelerators_tsc_rate_in_cpuid_and_the_lapic(tmp_path):
    """Under TCG the guest's RDTSC is the host's, so CPUID 0x15/0x16 and the LAPIC must use the rate the
    accelerator reports, not a fixed one (a fixed rate made guest time drift on other hosts)."""
    from pyemu.accel.tcg.accel import TcgAccelerator
    from pyemu.machines.microvm import BootSource, Microvm
    from pyemu.system.config import VmConfig

    class OddTscAccelerator(TcgAccelerator):
        tsc_hz = 3_123_000_000  # type: ignore[assignment]

    image = kernel(tmp_path, "hlt")
    machine = Microvm.create(VmConfig(ram_size=64 << 20, kernel=image, serial=("null",)),
                             OddTscAccelerator(), BootSource(image, None, ""))
    try:
        eax, ebx, ecx, _ = machine.cpuid.lookup(0x15)
        assert ecx * ebx // eax == 3_123_000_000
        assert machine.cpuid.lookup(0x16)[0] == 3123
        assert machine.lapics[0].timer.tsc_hz == 3_123_000_000
    finally:
        machine.close()


def test_the_only_software_vcpu_runs_pinned(tmp_path):
    """A VM's only software vCPU joins the placement group (one host CPU, moved by the reviewer when others
    keep it busy): unpinned, the scheduler moved it away from its warm caches whenever pyemu's other threads
    woke (vcpu_placement.py)."""
    from pyemu.accel.tcg.accel import TcgAccelerator
    from pyemu.machines.microvm import BootSource, Microvm
    from pyemu.system.config import VmConfig

    image = kernel(tmp_path, "hlt")
    machine = Microvm.create(VmConfig(ram_size=64 << 20, kernel=image, serial=("null",)), TcgAccelerator(),
                             BootSource(image, None, ""))
    try:
        assert machine.accel.placement.enabled
    finally:
        machine.close()
