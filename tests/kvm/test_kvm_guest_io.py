"""Small guest programs under KVM: port I/O, MMIO, HLT, triple fault, memory slots, CPUID."""

from __future__ import annotations

import os

import pytest

from pyemu.accel.exits import Halt, Shutdown, Stopped
from pyemu.system.memory import GuestMemory

from kvm_guest_kit import CODE_ADDR, Recorder, assemble, run_bounded


def test_out_and_in_reach_the_pio_bus_with_offsets(kvm_machine):
    device = Recorder(answers={2: 0xBEEF, 4: 0xCAFEF00D})
    kvm_machine.pio.register(0x500, 8, device)
    kvm_machine.load(
        """
        mov dx, 0x501
        mov al, 0x42
        out dx, al
        mov dx, 0x502
        mov ax, 0x1234
        out dx, ax
        in ax, dx
        mov si, ax
        mov dx, 0x504
        in eax, dx
        mov edi, eax
        mov dx, 0x503
        out dx, al
        cli
        hlt
        """
    )
    result, _ = run_bounded(kvm_machine.vcpu)
    assert result == Halt()
    state = kvm_machine.vcpu.save_state()
    assert state.regs["rsi"] & 0xFFFF == 0xBEEF
    assert state.regs["rdi"] == 0xCAFEF00D
    assert device.accesses == [
        ("w", 1, 1, 0x42),
        ("w", 2, 2, 0x1234),
        ("r", 2, 2, 0xBEEF),
        ("r", 4, 4, 0xCAFEF00D),
        ("w", 3, 1, 0x0D),
    ]


def test_string_port_io_moves_every_element(kvm_machine):
    """rep outsb / rep insw reach KVM as one exit with count > 1; every element must reach the device."""
    device = Recorder(fill=0xA55A)
    kvm_machine.pio.register(0x600, 2, device)
    kvm_machine.memory.write(0x20000, b"hello")
    kvm_machine.load(
        """
        cld
        mov esi, 0x20000
        mov ecx, 5
        mov dx, 0x600
        rep outsb
        mov edi, 0x21000
        mov ecx, 3
        rep insw
        cli
        hlt
        """
    )
    result, _ = run_bounded(kvm_machine.vcpu)
    assert result == Halt()
    assert [v for _, _, v in device.writes] == list(b"hello")
    reads = [a for a in device.accesses if a[0] == "r"]
    assert len(reads) == 3 and all(size == 2 for _, _, size, _ in reads)
    assert kvm_machine.memory.read(0x21000, 6) == bytes.fromhex("5aa5") * 3


def test_mmio_reads_and_writes_reach_the_mmio_bus_with_offsets(kvm_machine):
    device = Recorder(answers={0x24: 0x11223344, 0x30: 0x5566, 0x40: 0x1122334455667788})
    kvm_machine.mmio.register(0xD0000000, 0x1000, device)
    kvm_machine.load(
        """
        mov rbx, 0xd0000000
        mov dword ptr [rbx + 0x10], 0xabcd1234
        mov byte ptr [rbx + 0x11], 0x7f
        mov ecx, dword ptr [rbx + 0x24]
        movzx edx, word ptr [rbx + 0x30]
        mov rax, 0x0102030405060708
        mov qword ptr [rbx + 0x38], rax
        mov rsi, qword ptr [rbx + 0x40]
        cli
        hlt
        """,
        bits=64,
    )
    result, _ = run_bounded(kvm_machine.vcpu)
    assert result == Halt()
    state = kvm_machine.vcpu.save_state()
    assert state.regs["rcx"] == 0x11223344
    assert state.regs["rdx"] == 0x5566
    assert state.regs["rsi"] == 0x1122334455667788
    assert device.accesses == [
        ("w", 0x10, 4, 0xABCD1234),
        ("w", 0x11, 1, 0x7F),
        ("r", 0x24, 4, 0x11223344),
        ("r", 0x30, 2, 0x5566),
        ("w", 0x38, 8, 0x0102030405060708),
        ("r", 0x40, 8, 0x1122334455667788),
    ]


def test_hlt_with_interrupts_disabled_returns_halt_after_the_hlt(kvm_machine):
    code = "cli\nhlt\nnop"
    kvm_machine.load(code)
    result, elapsed = run_bounded(kvm_machine.vcpu)
    assert result == Halt()
    assert elapsed < 1.0
    hlt_end = CODE_ADDR + len(assemble("cli\nhlt", CODE_ADDR))
    assert kvm_machine.vcpu.save_state().rip == hlt_end


def test_sti_hlt_with_a_disabled_lapic_and_no_controller_is_halt(kvm_machine):
    """Nothing can deliver a maskable interrupt (LAPIC software-disabled since reset, no ExtINT source)."""
    kvm_machine.load("sti\nhlt")
    result, elapsed = run_bounded(kvm_machine.vcpu)
    assert result == Halt() and elapsed < 1.0


def test_run_again_after_halt_halts_again_and_load_state_resumes(kvm_machine):
    device = Recorder()
    kvm_machine.pio.register(0x500, 1, device)
    kvm_machine.load("cli\nhlt")
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    kvm_machine.load("mov al, 7\nmov dx, 0x500\nout dx, al\ncli\nhlt", addr=0x11000)
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    assert device.writes == [(0, 1, 7)]


def test_triple_fault_is_a_shutdown(kvm_machine):
    """No IDT (limit 0): #DE -> #GP -> #DF -> shutdown."""
    kvm_machine.load("xor ecx, ecx\nxor edx, edx\nmov eax, 1\ndiv ecx\nhlt")
    result, _ = run_bounded(kvm_machine.vcpu)
    assert result == Shutdown("triple fault")
    assert "RIP=" in kvm_machine.vcpu.last_fatal_dump


def test_unassigned_port_reads_all_ones(kvm_machine):
    kvm_machine.load("mov dx, 0x700\nin eax, dx\nmov ebx, eax\ncli\nhlt")
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    assert kvm_machine.vcpu.save_state().regs["rbx"] == 0xFFFFFFFF


def test_guest_writes_land_in_the_registered_memory_slots():
    from kvm_guest_kit import kvm_unusable_reason

    if kvm_unusable_reason():
        pytest.skip(kvm_unusable_reason())
    from pyemu.accel.dispatch import ExitDispatcher
    from pyemu.accel.kvm.accel import KvmAccelerator
    from pyemu.system.bus import mmio_bus, pio_bus
    from pyemu.target.x86.cpuid import default_cpuid

    from kvm_guest_kit import KvmMachine

    memory = GuestMemory([(0, 2 << 20), (0x800000, 1 << 20)])
    accel = KvmAccelerator()
    try:
        machine = KvmMachine(memory, pio_bus(), mmio_bus(), ExitDispatcher(pio_bus(), mmio_bus()), accel)
        accel.attach(memory, machine.dispatcher, default_cpuid())
        assert accel.vm.slots == {
            0: (0, 2 << 20, memory.host_address(memory.regions[0])),
            1: (0x800000, 1 << 20, memory.host_address(memory.regions[1])),
        }
        machine.vcpus.append(accel.create_vcpu(0))
        memory.write_u32(0x800100, 0x600DF00D)
        machine.load(
            "mov ebx, 0x800000\nmov eax, [ebx + 0x100]\nadd eax, 1\nmov [ebx + 0x200], eax\ncli\nhlt"
        )
        assert run_bounded(machine.vcpu)[0] == Halt()
        assert memory.read_u32(0x800200) == 0x600DF00E
    finally:
        accel.close()
        memory.close()


def test_guest_sees_filtered_cpuid_with_apic_id_frequency_and_kvm_leaves(kvm_machine):
    out = Recorder()
    kvm_machine.pio.register(0x500, 16, out)
    kvm_machine.load(
        """
        mov eax, 1
        cpuid
        mov dx, 0x500
        mov eax, ebx
        out dx, eax
        mov eax, 0x40000000
        cpuid
        mov dx, 0x504
        mov eax, ebx
        out dx, eax
        mov eax, 0x40000100
        cpuid
        mov dx, 0x508
        mov eax, ebx
        out dx, eax
        mov eax, 0x15
        cpuid
        mov dx, 0x50c
        mov eax, ecx
        out dx, eax
        cli
        hlt
        """
    )
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    values = {offset: value for offset, _, value in out.writes}
    assert values[0] >> 24 == 0  # APIC ID of vCPU 0
    assert values[4].to_bytes(4, "little") == b"Pyem"
    assert values[8].to_bytes(4, "little") == b"KVMK"
    assert values[0xC] == kvm_machine.accel.vm.apic_bus_hz


def test_ioeventfd_signals_without_an_exit(kvm_machine):
    device = Recorder()
    kvm_machine.pio.register(0x600, 2, device)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        kvm_machine.accel.vm.set_ioeventfd(efd, 0x600, 2, pio=True)
        kvm_machine.load("mov dx, 0x600\nmov ax, 1\nout dx, ax\nout dx, ax\nmov dx, 0x601\nout dx, al\ncli\nhlt")
        assert run_bounded(kvm_machine.vcpu)[0] == Halt()
        assert os.eventfd_read(efd) == 2
        assert device.writes == [(1, 1, 1)]  # only the access the eventfd does not match
    finally:
        os.close(efd)


def test_request_stop_ends_a_busy_loop_promptly(kvm_machine):
    import threading
    import time

    kvm_machine.load("spin: jmp spin")
    stopper = threading.Timer(0.2, kvm_machine.vcpu.request_stop)
    stopper.start()
    start = time.monotonic()
    result, _ = run_bounded(kvm_machine.vcpu, timeout=5.0)
    elapsed = time.monotonic() - start
    stopper.cancel()
    assert result == Stopped()
    assert 0.15 < elapsed < 1.0
    assert kvm_machine.vcpu.save_state().rip == CODE_ADDR


def test_request_stop_wakes_a_halted_vcpu_with_interrupts_enabled(kvm_machine):
    import threading

    enable_lapic = "mov rbx, 0xfee000f0\nmov dword ptr [rbx], 0x1ff\n"  # so an interrupt could wake it
    kvm_machine.load(enable_lapic + "sti\nhlt\nspin: jmp spin", bits=64)
    threading.Timer(0.3, kvm_machine.vcpu.request_stop).start()
    result, elapsed = run_bounded(kvm_machine.vcpu, timeout=5.0)
    assert result == Stopped()
    assert elapsed < 1.5


def test_stop_requested_before_run_returns_at_once(kvm_machine):
    kvm_machine.load("spin: jmp spin")
    kvm_machine.vcpu.request_stop()
    result, elapsed = run_bounded(kvm_machine.vcpu)
    assert result == Stopped() and elapsed < 0.5
    kvm_machine.vcpu.request_stop()
    assert run_bounded(kvm_machine.vcpu)[0] == Stopped()


def test_stop_completes_a_pending_port_read_before_returning(kvm_machine):
    """A stop requested by the device during an IN exit: the value must be in EAX when run() returns."""
    vcpu = kvm_machine.vcpu

    class StopOnRead(Recorder):
        def read(self, offset, size):
            vcpu.request_stop()
            return 0x5A5A5A5A

    kvm_machine.pio.register(0x500, 4, StopOnRead())
    kvm_machine.load("mov dx, 0x500\nin eax, dx\nspin: jmp spin")
    assert run_bounded(vcpu)[0] == Stopped()
    state = vcpu.save_state()
    assert state.regs["rax"] == 0x5A5A5A5A
    assert state.rip == CODE_ADDR + len(assemble("mov dx, 0x500\nin eax, dx", CODE_ADDR))
