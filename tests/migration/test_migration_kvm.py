"""Save and restore of the counting guest program under KVM (the in-kernel LAPIC travels inside the vCPU
state), and a stream saved under the software CPU loads under KVM while other devices stay a typed mismatch
(the whole TCG -> KVM -> TCG move is test_migration_cross_accel.py). Skipped where /dev/kvm cannot run a VM."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import pyemu
from pyemu.accel.base import AcceleratorUnavailable
from pyemu.migration.errors import StreamMismatch
from pyemu.migration.vmstate import load_vm
from pyemu.system.runstate import RunState

from migration_programs import write_counter_kernel
from test_migration_guest import BASE, counter, machine_of, stop_vm, wait_counting, wait_migration

KVM = tuple("kvm" if word == "tcg" else word for word in BASE)


@pytest.fixture
def kvm_usable() -> None:
    from pyemu.accel.kvm.accel import KvmAccelerator

    try:
        KvmAccelerator().close()
    except AcceleratorUnavailable as error:
        pytest.skip(f"KVM is not usable here: {error}")


@pytest.mark.kvm
def test_counter_guest_saved_and_restored_under_kvm(kvm_usable: None, short_dir: Path) -> None:
    kernel = write_counter_kernel(short_dir)
    state_file = short_dir / "kvm.state"
    vm = pyemu.VM("-kernel", str(kernel), *KVM)
    vm.start()
    try:
        wait_counting(vm, 10_000)
        vm.execute("migrate", {"uri": f"file:{state_file}"})
        assert wait_migration(vm)["status"] == "completed"
        value = counter(vm)
        ebx = machine_of(vm).vcpus[0].save_state().regs["rbx"]
        assert value - ebx in (0, 1)  # KVM may stop the loop between its `inc [edi]` and `inc ebx`
    finally:
        assert stop_vm(vm) == 0

    vm = pyemu.VM("-kernel", str(kernel), *KVM, "-incoming", f"file:{state_file}", "-S")
    vm.start()
    try:
        assert vm.state is RunState.PAUSED
        state = machine_of(vm).vcpus[0].save_state()
        assert counter(vm) == value and state.regs["rbx"] == ebx
        assert state.lapic is not None  # the in-kernel LAPIC page came back with the vCPU
        vm.resume()
        wait_counting(vm, value + 10_000)
    finally:
        assert stop_vm(vm) == 0  # the program's own checks passed (a mismatch exits 0xab)


@pytest.mark.kvm
def test_stream_of_the_other_accelerator_converts_other_devices_stay_a_typed_mismatch(
        kvm_usable: None, short_dir: Path) -> None:
    """A software-CPU stream loads under KVM (its userspace LAPIC becomes the in-kernel one, see
    pyemu.migration.cross_accel and test_migration_cross_accel.py); a board with other devices is still
    refused by name, and the refused destination stays in inmigrate."""
    kernel = write_counter_kernel(short_dir)
    vm = pyemu.VM("-kernel", str(kernel), *BASE, "-S")
    vm.start()
    try:
        out = io.BytesIO()
        from pyemu.migration.vmstate import save_vm

        save_vm(machine_of(vm), out, "prelaunch")
    finally:
        stop_vm(vm)
    vm = pyemu.VM("-kernel", str(kernel), *KVM, "-incoming", "defer")
    vm.start()
    try:
        assert load_vm(machine_of(vm), io.BytesIO(out.getvalue())) == "prelaunch"
        assert machine_of(vm).vcpus[0].save_state().lapic is not None
    finally:
        stop_vm(vm)
    assert KVM[-2:] == ("-device", "isa-debug-exit")
    vm = pyemu.VM("-kernel", str(kernel), *KVM[:-2], "-incoming", "defer")  # no isa-debug-exit
    vm.start()
    try:
        with pytest.raises(StreamMismatch, match="devices differ"):
            load_vm(machine_of(vm), io.BytesIO(out.getvalue()))
        assert vm.state is RunState.INMIGRATE
    finally:
        stop_vm(vm)
