"""Run control of a real :class:`~pyemu.machines.base.Machine` running a small guest program, under the
software CPU and KVM: pause really stops the vCPU, the guest TSC starts near 0 and stands still while
paused, a reset of a paused VM leaves it stopped (prelaunch, as QEMU), ``-S`` prelaunch runs nothing.

The program counts loop iterations in ``data`` and stores RDTSC after each one in ``data + 8``. Timing
assertions compare guest TSC deltas with host time measured around the same events, so a busy host makes
them looser, never false: the guest TSC may only count while the VM runs, and the pause is 0.5 s.
"""

from __future__ import annotations

import struct
import time

import pytest

from pyemu.accel.base import create_accelerator
from pyemu.accel.dispatch import ExitDispatcher
from pyemu.machines.base import Machine
from pyemu.system.runstate import RunState
from pyemu.target.x86.cpuid import default_cpuid
from pyemu.testing import GuestProgram, build
from pyemu.testing.board import DEFAULT_RAM_SIZE

PAUSE_S = 0.5
SLACK_S = 0.1  # rate rounding and the ioctl/hook latency around a stop, in seconds of guest TSC

LOOP = GuestProgram("""
    mov rdi, data
again:
    inc qword ptr [rdi]
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rdi + 8], rax
    jmp again
""")


class ProgramMachine(Machine):
    """A board with RAM, no devices and one vCPU running :data:`LOOP`."""

    def __init__(self, accel_name: str) -> None:
        accel = create_accelerator(accel_name)
        super().__init__([(0, DEFAULT_RAM_SIZE)], accel, 1)
        accel.attach(self.memory, self.dispatcher, default_cpuid())
        self.vcpus.append(accel.create_vcpu(0))
        self.symbols: dict[str, int] = {}
        self.load_boot()
        self.vcpus[0].load_state(self.boot_states[0])

    def load_boot(self) -> None:
        built = build(LOOP, self.memory)
        self.symbols = built.symbols
        self.boot_states = [built.state]

    def counter(self) -> int:
        return int(struct.unpack("<Q", self.memory.read(self.symbols["data"], 8))[0])

    def tsc(self) -> int:
        return int(struct.unpack("<Q", self.memory.read(self.symbols["data"] + 8, 8))[0])

    def tsc_hz(self) -> int:
        hz = getattr(self.accel, "tsc_hz", None)
        if isinstance(hz, int):
            return hz
        return int(self.vcpus[0].tsc_khz()) * 1000  # type: ignore[attr-defined]

    def wait_counter_above(self, value: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.counter() <= value:
            assert time.monotonic() < deadline, f"the guest loop did not run (counter {self.counter()})"
            time.sleep(0.01)


@pytest.fixture
def machine(accel: str):
    board = ProgramMachine(accel)
    try:
        yield board
    finally:
        board.close()


def tsc_is_controllable(machine: ProgramMachine) -> bool:
    """False on a KVM that ignores guest TSC changes (this host's PVM: RDTSC is the host's)."""
    return getattr(getattr(machine.accel, "tsc", None), "controllable", True) is not False


def test_pause_stops_the_vcpu_and_the_guest_tsc(machine: ProgramMachine, accel: str) -> None:
    started = time.monotonic()
    machine.start()
    machine.wait_counter_above(1000)
    machine.pause()
    ran_s = time.monotonic() - started
    assert machine.runstate.state is RunState.PAUSED
    count, tsc_before = machine.counter(), machine.tsc()
    time.sleep(PAUSE_S)
    assert machine.counter() == count, "a paused vCPU kept running"
    assert machine.clock.now() == machine.clock.now()
    controllable = tsc_is_controllable(machine)
    hz = machine.tsc_hz()
    if controllable:
        # near 0 at start: no more than the host time since the machine started
        assert tsc_before < hz * (ran_s + SLACK_S), f"TSC {tsc_before} at start is not near 0"

    resumed = time.monotonic()
    machine.resume()
    machine.wait_counter_above(count + 1000)
    machine.pause()
    ran_s = time.monotonic() - resumed
    tsc_after = machine.tsc()
    assert tsc_after > tsc_before
    if not controllable:
        pytest.skip("this host's KVM ignores guest TSC changes (measured: PVM, RDTSC is the host's); "
                    "pause/resume of the vCPU itself passed")
    # the guest TSC counted only while the VM ran: the 0.5 s pause is not in it
    assert (tsc_after - tsc_before) < hz * (ran_s + SLACK_S), (
        f"guest TSC advanced {(tsc_after - tsc_before) / hz:.3f} s across a {PAUSE_S} s pause "
        f"and {ran_s:.3f} s of running")


def test_reset_while_paused_stays_stopped_in_prelaunch_with_the_tsc_at_zero(
        machine: ProgramMachine, accel: str) -> None:
    machine.start()
    machine.wait_counter_above(1000)
    machine.pause()
    machine.reset()
    assert machine.runstate.state is RunState.PRELAUNCH  # QEMU 7.2: stop, system_reset -> prelaunch
    assert machine.counter() == 0  # RAM reloaded ...
    time.sleep(0.3)
    assert machine.counter() == 0  # ... and nothing ran
    resumed = time.monotonic()
    machine.resume()
    machine.wait_counter_above(1000)
    machine.pause()
    ran_s = time.monotonic() - resumed
    if not tsc_is_controllable(machine):
        pytest.skip("this host's KVM ignores guest TSC changes (measured: PVM, RDTSC is the host's)")
    assert machine.tsc() < machine.tsc_hz() * (ran_s + SLACK_S), "TSC not near 0 after the reset"


def test_reset_of_a_running_vm_runs_on(machine: ProgramMachine) -> None:
    machine.start()
    machine.wait_counter_above(1000)
    machine.reset()
    assert machine.runstate.state is RunState.RUNNING
    machine.wait_counter_above(0)


def test_prelaunch_runs_nothing_until_the_first_resume(machine: ProgramMachine) -> None:
    machine.start(paused=True)
    assert machine.runstate.state is RunState.PRELAUNCH
    ids = machine.vcpu_thread_ids()
    assert len(ids) == 1 and ids[0] is not None  # the thread exists, as QEMU's in prelaunch
    time.sleep(0.3)
    assert machine.counter() == 0 and machine.clock.now() == 0
    machine.resume()
    assert machine.runstate.state is RunState.RUNNING
    machine.wait_counter_above(0)
    assert machine.clock.now() > 0
