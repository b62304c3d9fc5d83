"""Run-loop details: stray signals, fatal-exit reports, the kick handler, kvmclock and the TSC rate."""

from __future__ import annotations

import signal
import threading

import pytest

from pyemu.accel.base import AcceleratorUnavailable
from pyemu.accel.exits import Halt, Shutdown
from pyemu.accel.kvm import abi
from pyemu.accel.kvm.kick import KICK_SIGNAL, install_kick_handler

from kvm_guest_kit import CODE_ADDR, Recorder, assemble, host_kvm_is_pvm, run_bounded


def test_stray_kick_signals_do_not_stop_the_vcpu(kvm_machine):
    """EINTR without a stop request just re-enters the guest."""
    out = Recorder()
    kvm_machine.pio.register(0x500, 1, out)
    kvm_machine.load("mov ecx, 50000\nagain:\nmov dx, 0x500\nout dx, al\ndec ecx\njnz again\ncli\nhlt")
    vcpu_thread = threading.get_ident()
    stop = threading.Event()

    def pester() -> None:
        while not stop.wait(0.01):
            if kvm_machine.vcpu.running:
                signal.pthread_kill(vcpu_thread, KICK_SIGNAL)

    pest = threading.Thread(target=pester)
    pest.start()
    try:
        result, _ = run_bounded(kvm_machine.vcpu, timeout=20.0)
    finally:
        stop.set()
        pest.join()
    assert (result, len(out.writes)) == (Halt(), 50000)


def fake_exit(vcpu, reason: int, **fields) -> None:
    """Write an exit into the vCPU's kvm_run page as KVM would, for the decoding paths that a healthy guest
    cannot trigger on demand."""
    run = vcpu._run
    run.exit_reason = reason
    for path, value in fields.items():
        target = run
        *parents, leaf = path.split("__")
        for part in parents:
            target = getattr(target, part)
        if isinstance(value, list):
            for i, item in enumerate(value):
                getattr(target, leaf)[i] = item
        else:
            setattr(target, leaf, value)


@pytest.mark.parametrize(
    "reason,fields,expected",
    [
        (abi.KVM_EXIT_SHUTDOWN, {}, "triple fault"),
        (abi.KVM_EXIT_SYSTEM_EVENT, {"system_event__type": abi.KVM_SYSTEM_EVENT_RESET}, "guest requested reset"),
        (abi.KVM_EXIT_SYSTEM_EVENT, {"system_event__type": abi.KVM_SYSTEM_EVENT_SHUTDOWN},
         "guest requested shutdown"),
        (abi.KVM_EXIT_FAIL_ENTRY, {"fail_entry__hardware_entry_failure_reason": 0x21},
         "KVM could not enter the guest (hardware entry failure reason 0x21)"),
        (abi.KVM_EXIT_INTERNAL_ERROR,
         {"internal__suberror": abi.KVM_INTERNAL_ERROR_EMULATION, "internal__ndata": 3,
          "internal__data": [1, 0x0F0B02, 0]},
         "KVM internal error: instruction emulation failed at rip 0x10000 (instruction bytes 0b 0f)"),
        (abi.KVM_EXIT_INTERNAL_ERROR,
         {"internal__suberror": abi.KVM_INTERNAL_ERROR_DELIVERY_EV, "internal__ndata": 1, "internal__data": [0x80]},
         "KVM internal error: event delivery failed at rip 0x10000 (data 0x80)"),
        (abi.KVM_EXIT_DEBUG, {}, "unexpected KVM exit KVM_EXIT_DEBUG"),
    ],
)
def test_fatal_exits_become_a_shutdown_with_a_readable_reason_and_dump(kvm_machine, reason, fields, expected):
    kvm_machine.load("cli\nhlt")
    fake_exit(kvm_machine.vcpu, reason, **fields)
    assert kvm_machine.vcpu._fatal_exit(reason) == Shutdown(expected)
    assert "RIP=0000000000010000" in kvm_machine.vcpu.last_fatal_dump


@pytest.mark.skipif(not host_kvm_is_pvm(), reason="only this PVM host's KVM fails to emulate INT n")
def test_a_real_internal_error_is_a_shutdown_naming_the_instruction(kvm_machine):
    kvm_machine.load("int 0x40\nhlt", idt_vectors=256)
    result, _ = run_bounded(kvm_machine.vcpu)
    assert result == Shutdown(
        f"KVM internal error: instruction emulation failed at rip {CODE_ADDR:#x} "
        "(instruction bytes cd 40 f4 00 00 00 00 00 00 00 00 00 00 00 00)"
    )


def test_kick_handler_cannot_be_installed_off_the_main_thread():
    previous = signal.getsignal(KICK_SIGNAL)
    signal.signal(KICK_SIGNAL, signal.SIG_DFL)
    errors: list[BaseException] = []
    try:
        thread = threading.Thread(target=lambda: _capture(install_kick_handler, errors))
        thread.start()
        thread.join()
        assert len(errors) == 1 and isinstance(errors[0], AcceleratorUnavailable)
        assert "main thread" in str(errors[0])
        install_kick_handler()  # main thread: installs
        assert callable(signal.getsignal(KICK_SIGNAL))
        thread = threading.Thread(target=lambda: _capture(install_kick_handler, errors))
        thread.start()
        thread.join()
        assert len(errors) == 1  # already installed: fine from any thread
    finally:
        signal.signal(KICK_SIGNAL, previous)


def _capture(function, errors: list) -> None:
    try:
        function()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


def test_cpuid_frequency_leaves_match_the_vcpu_tsc_rate(kvm_machine):
    vcpu = kvm_machine.vcpu
    leaves = {(e.function, e.index): e for e in vcpu.cpuid}
    eax, ebx, ecx, _ = leaves[(0x15, 0)].regs
    assert ecx == kvm_machine.accel.vm.apic_bus_hz
    assert ecx * ebx // eax == vcpu.tsc_khz() * 1000
    assert leaves[(0x16, 0)].eax == vcpu.tsc_khz() // 1000


def test_the_guest_can_enable_kvmclock(kvm_machine):
    """Writing MSR_KVM_SYSTEM_TIME_NEW makes KVM fill a pvclock structure in guest memory."""
    out = Recorder()
    kvm_machine.pio.register(0x500, 1, out)
    code = """
        mov ecx, 0x4b564d01
        mov eax, 0x20001
        xor edx, edx
        wrmsr
        mov dx, 0x500
        out dx, al
        out dx, al
        cli
        hlt
    """
    kvm_machine.memory.write(CODE_ADDR, assemble(code, CODE_ADDR, 64))
    kvm_machine.vcpu.load_state(kvm_machine.state64())
    assert run_bounded(kvm_machine.vcpu)[0] == Halt()
    version = kvm_machine.memory.read_u32(0x20000)
    tsc_to_system_mul = kvm_machine.memory.read_u32(0x20000 + 24)
    assert version != 0 and version % 2 == 0
    assert tsc_to_system_mul != 0
    assert kvm_machine.vcpu.save_state().msrs[0x4B564D01] == 0x20001
