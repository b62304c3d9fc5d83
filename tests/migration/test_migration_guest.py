"""Save and restore a running guest program under the software CPU through QMP ``migrate`` and
``-incoming``: its counter in RAM and its registers continue where they were, the guest TSC and the
virtual clock continue without a jump (although seconds pass between save and restore), the run states and
MIGRATION events are QEMU 7.2's, and refusals (blockers, bad URIs, bad streams) leave both sides defined."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

import pyemu
from pyemu.errors import ConfigError
from pyemu.migration.errors import MigrationError
from pyemu.system.runstate import RunState

from migration_programs import COUNTER_ADDR, TSC_ADDR, write_counter_kernel

TIMEOUT = 60.0
BASE = ("-m", "32", "-accel", "tcg", "-serial", "none", "-device", "isa-debug-exit")


def machine_of(vm: pyemu.VM) -> Any:
    return vm._instance.machine


def counter(vm: pyemu.VM) -> int:
    return int(machine_of(vm).memory.read_u32(COUNTER_ADDR))


def wait_migration(vm: pyemu.VM, timeout: float = TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = vm.execute("query-migrate")
        if info.get("status") in ("completed", "failed"):
            return info
        time.sleep(0.05)
    raise AssertionError(f"migration did not finish: {info}")


def wait_counting(vm: pyemu.VM, above: int, timeout: float = TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = counter(vm)
        if value > above:
            return value
        time.sleep(0.02)
    raise AssertionError(f"the counter stayed at {counter(vm)}")


def stop_vm(vm: pyemu.VM) -> int:
    vm.quit()
    status = vm.wait(TIMEOUT)
    vm.close()
    return status


@pytest.fixture
def kernel(short_dir: Path) -> Path:
    return write_counter_kernel(short_dir)


def save_running(kernel: Path, path: Path, *extra: str) -> tuple[int, int, int, dict[str, Any], list[Any]]:
    """Run the counter guest, migrate it to ``path``; (counter, ebx, clock, query-migrate, events)."""
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *extra)
    vm.start()
    try:
        wait_counting(vm, 100_000)
        vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})  # QEMU: MIGRATION events only with it
        vm.execute("migrate", {"uri": f"file:{path}"})
        info = wait_migration(vm)
        assert info["status"] == "completed", info
        assert vm.state is RunState.POSTMIGRATE
        machine = machine_of(vm)
        ebx = machine.vcpus[0].save_state().regs["rbx"]
        saved = (counter(vm), ebx, machine.clock.now(), info,
                 [(e.name, e.data) for e in vm.events.drain()])
        time.sleep(0.2)
        assert counter(vm) == saved[0]  # the source stays stopped after the save
    finally:
        assert stop_vm(vm) == 0  # and its program never saw a mismatch (it would exit 0xab)
    return saved


def test_counter_registers_tsc_and_clock_continue_after_restore(kernel: Path, short_dir: Path) -> None:
    state_file = short_dir / "vm.state"
    value, ebx, clock, info, events = save_running(kernel, state_file)
    assert value == ebx  # the program's invariant, frozen mid-loop
    assert info["ram"]["total"] == 32 << 20 and info["ram"]["remaining"] == 0
    assert info["ram"]["duplicate"] > 7000  # zero pages skipped
    assert info["ram"]["transferred"] == state_file.stat().st_size
    assert events == [("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}), ("STOP", {}),
                      ("MIGRATION", {"status": "completed"})]
    time.sleep(2.0)  # wall time that must not show up in the restored guest's clock or TSC

    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{state_file}", "-S")
    vm.start()
    try:
        machine = machine_of(vm)
        assert vm.state is RunState.PAUSED  # QEMU 7.2: -S leaves an incoming VM paused
        assert vm.execute("query-migrate") == {"status": "completed"}
        assert counter(vm) == value
        assert machine.vcpus[0].save_state().regs["rbx"] == ebx
        assert machine.clock.now() == clock
        tsc_saved = machine.memory.read_u64(TSC_ADDR)
        hz = machine.tsc_hz
        vm.resume()
        wait_counting(vm, value + 1_000_000)
        tsc_now = machine.memory.read_u64(TSC_ADDR)
        elapsed = (tsc_now - tsc_saved) / hz
        assert 0 <= elapsed < 1.5 + TIMEOUT  # moved on from the saved TSC...
        assert machine.clock.now() - clock < (elapsed + 1.0) * 1e9  # ...as did the clock, by run time only
        vm.pause()
        state = machine.vcpus[0].save_state()
        assert state.regs["rbx"] == counter(vm)  # registers and RAM still agree
    finally:
        assert stop_vm(vm) == 0  # the program's own checks (counter == ebx, TSC monotonic) all passed


def test_tsc_does_not_jump_by_the_time_between_save_and_restore(kernel: Path, short_dir: Path) -> None:
    state_file = short_dir / "vm.state"
    save_running(kernel, state_file)
    time.sleep(3.0)
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{state_file}", "-S")
    vm.start()
    try:
        machine = machine_of(vm)
        before = machine.memory.read_u64(TSC_ADDR)
        assert machine.accel.tsc.value() - before < machine.tsc_hz  # restored TSC next to the guest's last read
        vm.resume()
        first = counter(vm)
        wait_counting(vm, first + 1000)
        vm.pause()
        # Run time only: the guest ran well under 3 s in this test's resume window plus load.
        ran_s = (machine.memory.read_u64(TSC_ADDR) - before) / machine.tsc_hz
        ran_clock_s = machine.clock.now() / 1e9
        assert ran_s < 3.0 + ran_clock_s
    finally:
        assert stop_vm(vm) == 0


def test_without_dash_s_the_restored_vm_runs_like_qemu(kernel: Path, short_dir: Path) -> None:
    state_file = short_dir / "vm.state"
    value, *_ = save_running(kernel, state_file)
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{state_file}")
    vm.start()
    try:
        assert vm.state is RunState.RUNNING
        wait_counting(vm, value + 1000)
    finally:
        assert stop_vm(vm) == 0


def test_incoming_defer_then_migrate_incoming_over_exec(kernel: Path, short_dir: Path) -> None:
    state_file = short_dir / "vm.state"
    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        wait_counting(vm, 1000)
        vm.execute("migrate", {"uri": f"exec:cat > {state_file}"})
        assert wait_migration(vm)["status"] == "completed"
        value = counter(vm)
        vm.resume()  # QEMU: cont after a completed migration runs the source again
        wait_counting(vm, value)
    finally:
        assert stop_vm(vm) == 0

    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer")
    vm.start()
    try:
        assert vm.state is RunState.INMIGRATE
        assert vm.execute("query-migrate") == {}
        with pytest.raises(pyemu.CommandError, match="waiting for an incoming migration"):
            vm.execute("migrate", {"uri": f"file:{short_dir / 'x'}"})
        vm.execute("migrate-incoming", {"uri": f"exec:cat {state_file}"})
        assert wait_migration(vm)["status"] == "completed"
        assert vm.state is RunState.RUNNING
        wait_counting(vm, value + 1000)
        with pytest.raises(pyemu.CommandError, match="already been started"):
            vm.execute("migrate-incoming", {"uri": f"file:{state_file}"})
    finally:
        assert stop_vm(vm) == 0


def test_prelaunch_source_restores_to_prelaunch(kernel: Path, short_dir: Path) -> None:
    state_file = short_dir / "vm.state"
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-S")
    vm.start()
    try:
        vm.execute("migrate", {"uri": f"file:{state_file}"})
        assert wait_migration(vm)["status"] == "completed"
        assert vm.state is RunState.POSTMIGRATE
    finally:
        stop_vm(vm)
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{state_file}")
    vm.start()
    try:
        assert vm.state is RunState.PRELAUNCH  # as QEMU 7.2: a never-run source gives a never-run VM
        vm.resume()
        wait_counting(vm, 1000)
    finally:
        assert stop_vm(vm) == 0


def test_bad_stream_over_qmp_fails_and_nothing_runs(kernel: Path, short_dir: Path) -> None:
    bad = short_dir / "bad.state"
    bad.write_bytes(b"PYEMU-VM\x01\x00\x00\x00" + b"\x02" * 64)
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer")
    vm.start()
    try:
        vm.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        vm.execute("migrate-incoming", {"uri": f"file:{bad}"})
        info = wait_migration(vm)
        assert info["status"] == "failed" and "section" in info["error-desc"]
        assert [e.data["status"] for e in vm.events.drain() if e.name == "MIGRATION"] == ["setup", "active", "failed"]
        vm.resume()  # QEMU: cont while inmigrate only asks to run once a stream is loaded
        time.sleep(0.3)
        assert vm.state is RunState.INMIGRATE and counter(vm) == 0
    finally:
        stop_vm(vm)


def test_bad_stream_on_the_command_line_raises_and_leaves_nothing(kernel: Path, short_dir: Path) -> None:
    bad = short_dir / "bad.state"
    bad.write_bytes(b"not a vm state")
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", f"file:{bad}")
    with pytest.raises(MigrationError, match="bad magic"):
        vm.start()
    with pytest.raises(ConfigError, match="not supported yet"):
        pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "fd:3")
    with pytest.raises(ConfigError, match="unknown migration protocol"):
        pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "carrier-pigeon:x")


def test_refusals_leave_the_source_running(kernel: Path, short_dir: Path) -> None:
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-device", "virtio-serial-device,id=vser")
    vm.start()
    try:
        with pytest.raises(pyemu.CommandError, match="device 'vser' blocks migration"):
            vm.execute("migrate", {"uri": f"file:{short_dir / 'x'}"})
        assert vm.state is RunState.RUNNING and vm.execute("query-migrate") == {}
    finally:
        assert stop_vm(vm) == 0

    vm = pyemu.VM("-kernel", str(kernel), *BASE)
    vm.start()
    try:
        wait_counting(vm, 1000)
        with pytest.raises(pyemu.CommandError, match="unknown migration protocol"):
            vm.execute("migrate", {"uri": "nowhere"})
        with pytest.raises(pyemu.CommandError, match="not supported yet"):
            vm.execute("migrate", {"uri": "fd:3"})
        assert vm.execute("query-migrate") == {}
        vm.execute("migrate", {"uri": f"file:{short_dir / 'no' / 'such' / 'dir'}"})
        info = wait_migration(vm)
        assert info["status"] == "failed" and "No such file" in info["error-desc"]
        vm.execute("migrate", {"uri": "exec:exit 3"})
        info = wait_migration(vm)
        assert info["status"] == "failed" and "status 3" in info["error-desc"], info
        assert vm.state is RunState.RUNNING
        wait_counting(vm, counter(vm))
    finally:
        assert stop_vm(vm) == 0


def test_virtio_blk_is_drained_and_moves_with_shared_storage(kernel: Path, short_dir: Path) -> None:
    disk = short_dir / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    drive = ("-drive", f"file={disk},format=raw,if=virtio")
    state_file = short_dir / "vm.state"
    value, *_ = save_running(kernel, state_file, *drive)
    vm = pyemu.VM("-kernel", str(kernel), *BASE, *drive, "-incoming", f"file:{state_file}")
    vm.start()
    try:
        wait_counting(vm, value + 1000)
    finally:
        assert stop_vm(vm) == 0


def test_stop_while_inmigrate_keeps_the_loaded_vm_paused(kernel: Path, short_dir: Path) -> None:
    state_file = short_dir / "vm.state"
    value, *_ = save_running(kernel, state_file)
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-incoming", "defer")
    vm.start()
    try:
        vm.execute("stop")  # QEMU: clears autostart while waiting for the stream
        assert vm.state is RunState.INMIGRATE
        vm.execute("migrate-incoming", {"uri": f"file:{state_file}"})
        assert wait_migration(vm)["status"] == "completed"
        assert vm.state is RunState.PAUSED and counter(vm) == value
        vm.execute("cont")
        wait_counting(vm, value + 1000)
    finally:
        assert stop_vm(vm) == 0
