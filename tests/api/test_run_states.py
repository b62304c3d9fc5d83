"""Errors end in a reported run state, never a silent hang: a vCPU that cannot go on (internal-error) and a
guest that reports a panic through pvpanic (guest-panicked), with QEMU's events and actions."""

from __future__ import annotations

from pathlib import Path

import pytest

import pyemu
from pyemu.system.runstate import RunState

from guest_programs import write_program_kernel

TIMEOUT = 60.0
PANIC = "mov dx, 0x505\nmov al, 1\nout dx, al\nspin:\njmp spin"
CRASH_LOADED = "mov dx, 0x505\nmov al, 2\nout dx, al\nspin:\njmp spin"
JUMP_OUT_OF_RAM = "mov eax, 0xF0000000\njmp eax"  # device space: no RAM to fetch from


def vm_for(directory: Path, name: str, source: str, *extra: str) -> pyemu.VM:
    kernel = write_program_kernel(directory, name, source)
    return pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", *extra)


def test_vcpu_failure_with_a_monitor_stays_in_internal_error(short_dir: Path) -> None:
    qmp = f"unix:{short_dir / 'qmp.sock'},server=on,wait=off"
    with vm_for(short_dir, "jump", JUMP_OUT_OF_RAM, "-qmp", qmp) as vm:
        vm.start()
        assert vm.events.wait_for("STOP", TIMEOUT).data == {}
        assert vm.state is RunState.INTERNAL_ERROR
        registers = vm.execute("human-monitor-command", {"command-line": "info registers"})
        assert "EIP=f0000000" in registers  # the failing state is there to inspect
        with pytest.raises(pyemu.CommandError, match="Resetting the Virtual Machine is required"):
            vm.resume()
        vm.reset()
        vm.events.wait_for("RESET", TIMEOUT)
        assert vm.state is RunState.PRELAUNCH
        vm.quit()
        assert vm.wait(TIMEOUT) == 0


def test_vcpu_failure_without_a_monitor_ends_pyemu_with_status_1(short_dir: Path) -> None:
    with vm_for(short_dir, "jump", JUMP_OUT_OF_RAM) as vm:
        vm.start()
        assert vm.wait(TIMEOUT) == 1
        shutdown = vm.events.wait_for("SHUTDOWN", TIMEOUT)
        assert shutdown.data == {"guest": False, "reason": "host-error"}


def test_guest_panic_powers_off_by_default(short_dir: Path) -> None:
    with vm_for(short_dir, "panic", PANIC, "-device", "pvpanic") as vm:
        vm.start()
        assert vm.wait(TIMEOUT) == 0  # QEMU's -action panic=shutdown: a clean exit, the reason says panic
        names = [(event.name, event.data) for event in vm.events]
        assert names == [("GUEST_PANICKED", {"action": "poweroff"}), ("STOP", {}),
                         ("SHUTDOWN", {"guest": True, "reason": "guest-panic"})]


def test_guest_panic_with_no_shutdown_pauses_until_reset(short_dir: Path) -> None:
    with vm_for(short_dir, "panic", PANIC, "-device", "pvpanic,id=panic0", "-no-shutdown") as vm:
        vm.start()
        assert vm.events.wait_for("GUEST_PANICKED", TIMEOUT).data == {"action": "pause"}
        assert vm.events.get(TIMEOUT).name == "STOP"
        assert vm.status() == {"status": "guest-panicked", "running": False, "singlestep": False}
        with pytest.raises(pyemu.CommandError, match="Resetting the Virtual Machine is required"):
            vm.resume()
        vm.reset()  # served by the main loop, as QEMU's: RESET says it is done
        vm.events.wait_for("RESET", TIMEOUT)
        assert vm.state is RunState.PRELAUNCH
        vm.resume()  # the guest runs from its entry again and panics again
        assert vm.events.wait_for("GUEST_PANICKED", TIMEOUT).data == {"action": "pause"}
        vm.quit()
        assert vm.wait(TIMEOUT) == 0


def test_crash_kernel_loaded_is_reported_and_the_vm_runs_on(short_dir: Path) -> None:
    with vm_for(short_dir, "crash", CRASH_LOADED, "-device", "pvpanic") as vm:
        vm.start()
        assert vm.events.wait_for("GUEST_CRASHLOADED", TIMEOUT).data == {"action": "run"}
        assert vm.running


def test_pvpanic_offers_only_the_configured_events(short_dir: Path) -> None:
    # crash-loaded, then isa-debug-exit: the VM ends right after the write, so the event list is complete
    source = "mov dx, 0x505\nmov al, 2\nout dx, al\nmov dx, 0x501\nmov al, 0\nout dx, al\nspin:\njmp spin"
    with vm_for(short_dir, "crash", source, "-device", "pvpanic,events=1", "-device", "isa-debug-exit") as vm:
        vm.start()
        assert vm.wait(TIMEOUT) == 1  # isa-debug-exit status (0 << 1) | 1
        assert [event.name for event in vm.events] == ["SHUTDOWN"]


def test_pvpanic_bad_properties_are_config_errors(short_dir: Path) -> None:
    with vm_for(short_dir, "panic", PANIC, "-device", "pvpanic,iobase=1") as vm:
        with pytest.raises(pyemu.errors.ConfigError, match="unknown property 'iobase'"):
            vm.start()
