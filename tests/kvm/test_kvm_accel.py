"""KvmAccelerator as a board sees it: availability, the Accelerator/Vcpu protocols, memory slots, close."""

from __future__ import annotations

import threading

import pytest

from pyemu.accel.base import AcceleratorUnavailable, create_accelerator
from pyemu.accel.exits import Stopped
from pyemu.errors import ConfigError

from kvm_guest_kit import requires_kvm, run_bounded


def test_missing_device_is_accelerator_unavailable_with_a_tcg_hint(tmp_path):
    from pyemu.accel.kvm.accel import KvmAccelerator

    with pytest.raises(AcceleratorUnavailable) as info:
        KvmAccelerator(device=str(tmp_path / "kvm"))
    message = str(info.value)
    assert "does not exist" in message and "-accel tcg" in message and "\n" not in message


def test_a_device_that_is_not_kvm_is_accelerator_unavailable():
    from pyemu.accel.kvm.accel import KvmAccelerator

    with pytest.raises(AcceleratorUnavailable) as info:
        KvmAccelerator(device="/dev/null")
    assert "KVM_GET_API_VERSION" in str(info.value) and "-accel tcg" in str(info.value)


@requires_kvm
def test_create_accelerator_kvm_follows_the_protocol():
    accel = create_accelerator("kvm")
    try:
        assert accel.name == "kvm" and accel.needs_userspace_lapic is False
        assert hasattr(accel.msi_sink(), "deliver_msi")
        with pytest.raises(ConfigError):
            accel.create_vcpu(0)  # not attached yet
    finally:
        accel.close()


@requires_kvm
def test_close_stops_running_vcpus(kvm_machine):
    kvm_machine.load("spin: jmp spin")
    result: list = []
    thread = threading.Thread(target=lambda: result.append(run_bounded(kvm_machine.vcpu, timeout=10.0)))
    thread.start()
    threading.Event().wait(0.2)
    assert kvm_machine.vcpu.running
    kvm_machine.accel.close()
    thread.join(timeout=3.0)
    assert not thread.is_alive()
    assert result[0][0] == Stopped() and result[0][1] < 3.0
    kvm_machine.vcpu.request_stop()  # harmless after close
    kvm_machine.accel.close()  # idempotent


@requires_kvm
def test_vcpus_run_on_their_own_threads_and_stop_independently(kvm_machine):
    second = kvm_machine.accel.create_vcpu(1)
    state = kvm_machine.load("spin: jmp spin")
    second.load_state(state)
    results: dict = {}
    threads = [
        threading.Thread(target=lambda v=v, i=i: results.__setitem__(i, run_bounded(v, timeout=10.0)[0]))
        for i, v in enumerate((kvm_machine.vcpu, second))
    ]
    for thread in threads:
        thread.start()
    threading.Event().wait(0.2)
    second.request_stop()
    threads[1].join(timeout=3.0)
    assert results == {1: Stopped()} and kvm_machine.vcpu.running
    kvm_machine.vcpu.request_stop()
    threads[0].join(timeout=3.0)
    assert results == {0: Stopped(), 1: Stopped()}
