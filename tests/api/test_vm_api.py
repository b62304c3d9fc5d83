"""``pyemu.VM``: a VM inside the test process, driven by method calls (no child process, no daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pyemu
from pyemu.errors import ConfigError
from pyemu.system.runstate import RunState
from pyemu.testing import kvm_unavailable_reason

TIMEOUT = 60.0  # generous: CI hosts are busy; nothing here asserts on speed


def tiny_vm(kernel: Path, *extra: str, accel: str = "tcg") -> pyemu.VM:
    return pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", accel, *extra)


def test_console_round_trip_through_the_guest(echo_kernel: Path) -> None:
    with tiny_vm(echo_kernel) as vm:
        vm.start()
        vm.console.expect("READY", timeout=TIMEOUT)
        vm.console.send("hello, pyemu\n")
        match = vm.console.expect("HELLO, PYEMU", timeout=TIMEOUT)  # upper-cased by the guest program
        assert match.string[:match.start()] == "READY\n"
        assert vm.state is RunState.RUNNING


def test_run_control_emits_qmp_events(echo_kernel: Path) -> None:
    with tiny_vm(echo_kernel) as vm:
        vm.start()
        vm.console.expect("READY", timeout=TIMEOUT)
        vm.pause()
        assert vm.state is RunState.PAUSED and vm.status() == {"status": "paused", "running": False,
                                                               "singlestep": False}
        vm.pause()  # already paused: nothing happens, no second STOP (as QEMU)
        vm.resume()
        assert vm.running
        vm.reset()
        vm.console.expect("READY", timeout=TIMEOUT)  # the guest program ran again from its entry
        vm.quit()
        assert vm.wait(TIMEOUT) == 0
        assert vm.state is RunState.SHUTDOWN
        names = [event.name for event in vm.events]  # the stream ends with the VM
        assert names == ["STOP", "RESUME", "RESET", "SHUTDOWN"]


def test_events_carry_qemu_data(spin_kernel: Path) -> None:
    with tiny_vm(spin_kernel, "-serial", "none") as vm:
        vm.start()
        vm.reset()
        reset = vm.events.wait_for("RESET", TIMEOUT)
        assert reset.data == {"guest": False, "reason": "host-qmp-system-reset"} and reset.timestamp > 0
        vm.quit()
        shutdown = vm.events.wait_for("SHUTDOWN", TIMEOUT)
        assert shutdown.data == {"guest": False, "reason": "host-qmp-quit"}
        assert shutdown.to_qmp()["event"] == "SHUTDOWN"


def test_prelaunch_runs_nothing_until_resume(echo_kernel: Path) -> None:
    with tiny_vm(echo_kernel, "-S") as vm:
        vm.start()
        assert vm.state is RunState.PRELAUNCH
        with pytest.raises(pyemu.ConsoleTimeout) as caught:
            vm.console.expect("READY", timeout=0.5)
        assert caught.value.output == ""  # a vCPU that ran would have printed READY at once
        vm.resume()
        vm.console.expect("READY", timeout=TIMEOUT)
        assert vm.events.get(TIMEOUT).name == "RESUME"


def test_two_vms_in_one_process_are_independent(echo_kernel: Path) -> None:
    with tiny_vm(echo_kernel) as first, tiny_vm(echo_kernel) as second:
        first.start()
        second.start()
        first.console.expect("READY", timeout=TIMEOUT)
        second.console.expect("READY", timeout=TIMEOUT)
        first.pause()
        second.console.send("b\n")
        second.console.expect("B\n", timeout=TIMEOUT)
        assert first.state is RunState.PAUSED and second.state is RunState.RUNNING
        first.quit()
        assert first.wait(TIMEOUT) == 0
        assert second.running


def test_errors_are_typed(echo_kernel: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        pyemu.VM("-no-such-option")
    with pytest.raises(ConfigError):
        pyemu.VM("-m", "lots")
    with pytest.raises(ConfigError, match="-daemonize"):
        pyemu.VM("-daemonize")
    missing = pyemu.VM("-kernel", str(tmp_path / "absent.bin"), "-accel", "tcg")
    with pytest.raises(pyemu.errors.PyemuError):
        missing.start()  # nothing is left running: the VM can be closed and forgotten
    missing.close()
    vm = tiny_vm(echo_kernel)
    with pytest.raises(pyemu.VmStateError):
        vm.pause()
    with pytest.raises(pyemu.VmStateError):
        vm.wait(1)
    with vm:
        vm.start()
        with pytest.raises(pyemu.VmStateError):
            vm.start()
        with pytest.raises(pyemu.VmTimeout):
            vm.wait(0.2)
        with pytest.raises(pyemu.ConsoleTimeout) as caught:
            vm.console.expect("never printed", timeout=0.5)
        assert "never printed" in str(caught.value)
        vm.quit()
        vm.wait(TIMEOUT)
        with pytest.raises(pyemu.CommandError, match="Resetting the Virtual Machine is required") as refused:
            vm.resume()
        assert refused.value.error_class == "GenericError"
        with pytest.raises(pyemu.ConsoleClosed):
            vm.console.expect("anything", timeout=TIMEOUT)


def test_any_qmp_command_runs_in_process_with_the_schema_checks(spin_kernel: Path) -> None:
    with tiny_vm(spin_kernel, "-serial", "none", "-name", "api-test") as vm:
        vm.start()
        assert vm.execute("query-name") == {"name": "api-test"}
        assert "query-status" in [entry["name"] for entry in vm.execute("query-commands")]
        with pytest.raises(pyemu.CommandError) as unknown:
            vm.execute("no-such-command")
        assert unknown.value.error_class == "CommandNotFound"
        with pytest.raises(pyemu.CommandError) as bad:
            vm.execute("stop", {"bogus": 1})
        assert bad.value.error_class == "GenericError" and "bogus" in bad.value.desc
        with pytest.raises(pyemu.CommandError):
            vm.execute("qmp_capabilities")  # negotiation is a socket thing, not a VM command
        vm.execute("quit")
        assert vm.wait(TIMEOUT) == 0


def test_serial_redirected_means_no_console_object(spin_kernel: Path) -> None:
    with tiny_vm(spin_kernel, "-serial", "null") as vm:
        vm.start()
        with pytest.raises(pyemu.ConsoleError, match="-serial"):
            vm.console
    with tiny_vm(spin_kernel, "-nodefaults") as bare:
        bare.start()
        assert "serial0" not in bare.execute("human-monitor-command", {"command-line": "info chardev"})
        with pytest.raises(pyemu.ConsoleError, match="-nodefaults"):
            bare.console


@pytest.mark.kvm
def test_pause_and_resume_under_kvm(spin_kernel: Path) -> None:
    reason = kvm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with tiny_vm(spin_kernel, "-serial", "none", accel="kvm") as vm:
        vm.start()
        vm.pause()
        assert vm.state is RunState.PAUSED
        vm.resume()
        assert vm.running
        vm.quit()
        assert vm.wait(TIMEOUT) == 0
        assert [event.name for event in vm.events] == ["STOP", "RESUME", "SHUTDOWN"]


def test_unused_chardevs_are_opened_and_listed_as_qemu_does(spin_kernel: Path, short_dir: Path) -> None:
    spare = short_dir / "spare.sock"
    log = short_dir / "spare.log"
    with tiny_vm(spin_kernel, "-serial", "null",
                 "-chardev", f"socket,id=spare,path={spare},server=on,wait=off",
                 "-chardev", f"file,id=trace,path={log}") as vm:
        vm.start()
        listed = {entry["label"]: entry for entry in vm.execute("query-chardev")}
        assert listed["spare"] == {"label": "spare", "filename": f"disconnected:unix:{spare},server=on",
                                   "frontend-open": False}
        assert listed["trace"]["frontend-open"] is False
        assert listed["serial0"]["frontend-open"] is True
        assert spare.exists() and log.exists()  # opened like QEMU: listening, created
