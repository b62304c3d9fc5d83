"""Fixtures for the KVM tests: the ``kvm_machine`` fixture and a faulthandler watchdog so that nothing
can hang the test run even if a vCPU stop fails."""

from __future__ import annotations

import faulthandler

import pytest

from kvm_guest_kit import RAM_SIZE, KvmMachine, kvm_unusable_reason

WATCHDOG_S = 30


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def kvm_machine():
    reason = kvm_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    from pyemu.accel.dispatch import ExitDispatcher
    from pyemu.accel.kvm.accel import KvmAccelerator
    from pyemu.system.bus import mmio_bus, pio_bus
    from pyemu.system.memory import GuestMemory
    from pyemu.target.x86.cpuid import default_cpuid

    memory = GuestMemory([(0, RAM_SIZE)])
    pio, mmio = pio_bus(), mmio_bus()
    dispatcher = ExitDispatcher(pio, mmio)
    accel = KvmAccelerator()
    accel.attach(memory, dispatcher, default_cpuid())
    machine = KvmMachine(memory, pio, mmio, dispatcher, accel)
    machine.vcpus.append(accel.create_vcpu(0))
    yield machine
    accel.close()
    memory.close()
