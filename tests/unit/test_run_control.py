"""Machine life cycle with a fake accelerator: prelaunch, pause that cannot complete, reset of a stopped VM,
and the guest-TSC calls the board makes at each step. Fast and deterministic: the fake vCPU runs nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pyemu.accel.exits import Exit, Stopped
from pyemu.machines.base import Machine
from pyemu.monitor.control import ControlApi, ControlError
from pyemu.system.runstate import RunState, ShutdownCause, VcpuStopTimeout
from pyemu.target.x86.cpu_state import X86CpuState


class FakeVcpu:
    """Runs until asked to stop; a ``stuck`` vCPU ignores stop requests until released."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.runs = 0
        self.stuck = False
        self.released = threading.Event()
        self._stop = threading.Event()
        self.loaded: list[X86CpuState] = []

    def run(self) -> Exit:
        self.runs += 1
        self._stop.wait()
        if self.stuck:
            self.released.wait()
        self._stop.clear()
        return Stopped()

    def request_stop(self) -> None:
        self._stop.set()

    def kick(self) -> None:
        pass

    def load_state(self, state: X86CpuState) -> None:
        self.loaded.append(state)

    def save_state(self) -> X86CpuState:
        return X86CpuState()

    def close(self) -> None:
        self.released.set()
        self._stop.set()


class FakeTsc:
    """Records what the board asks of the guest TSC."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def value(self) -> int:
        return 0

    def stop(self) -> None:
        self.calls.append("stop")

    def start(self) -> None:
        self.calls.append("start")

    def reset(self) -> None:
        self.calls.append("reset")


class FakeAccel:
    name = "fake"
    needs_userspace_lapic = False

    def __init__(self) -> None:
        self.tsc_calls: list[str] = []
        self.tsc = FakeTsc(self.tsc_calls)

    def cpu_features(self) -> frozenset[str]:
        return frozenset()

    def close(self) -> None:
        pass


class FakeBoard(Machine):
    def __init__(self) -> None:
        self.fake_accel = FakeAccel()
        super().__init__([(0, 0x10000)], self.fake_accel, 1)  # type: ignore[arg-type]
        self.fake = FakeVcpu(0)
        self.vcpus.append(self.fake)  # type: ignore[arg-type]
        self.boots = 0
        self.load_boot()

    def load_boot(self) -> None:
        self.boots += 1
        self.boot_states = [X86CpuState()]


@pytest.fixture
def board():
    machine = FakeBoard()
    yield machine
    machine.fake.released.set()
    machine.close()


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached")


def test_prelaunch_creates_threads_but_runs_nothing_and_time_stands_at_zero(board: FakeBoard) -> None:
    board.start(paused=True)
    assert board.runstate.state is RunState.PRELAUNCH
    assert board.vcpu_thread_ids() and all(board.vcpu_thread_ids())
    threading.Event().wait(0.1)
    assert board.fake.runs == 0 and board.clock.now() == 0 and not board.clock.running
    assert board.fake_accel.tsc_calls == ["stop", "reset"]  # frozen at 0 until the first resume
    board.resume()
    wait_until(lambda: board.fake.runs == 1)
    assert board.clock.running and board.fake_accel.tsc_calls[-1] == "start"


def test_pause_stops_the_clock_and_the_tsc(board: FakeBoard) -> None:
    board.start()
    wait_until(lambda: board.fake.runs == 1)
    board.pause()
    assert board.runstate.state is RunState.PAUSED
    assert not board.clock.running and board.fake_accel.tsc_calls[-1] == "stop"
    frozen = board.clock.now()
    threading.Event().wait(0.05)
    assert board.clock.now() == frozen


def test_a_pause_whose_vcpu_does_not_stop_is_an_error_not_a_silent_success(board: FakeBoard) -> None:
    board.start()
    wait_until(lambda: board.fake.runs == 1)
    board.fake.stuck = True
    control = ControlApi(board)
    with pytest.raises(VcpuStopTimeout, match="vcpu0 did not stop within 0.2 s"):
        board.pause(timeout=0.2)
    assert board.runstate.state is RunState.INTERNAL_ERROR
    assert control.status()["status"] == "internal-error"
    with pytest.raises(ControlError, match="Resetting the Virtual Machine is required"):
        control.cont()


def test_reset_of_a_paused_vm_leaves_it_stopped_in_prelaunch(board: FakeBoard) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    control = ControlApi(board)
    control.subscribe(lambda name, data: events.append((name, data)))
    control.start(paused=False)
    wait_until(lambda: board.fake.runs == 1)
    control.stop()
    board.reset(ShutdownCause.HOST_QMP_SYSTEM_RESET)
    assert board.runstate.state is RunState.PRELAUNCH  # QEMU 7.2: stop + system_reset -> prelaunch
    assert board.boots == 2 and len(board.fake.loaded) == 1
    assert board.fake_accel.tsc_calls[-2:] == ["stop", "reset"]
    threading.Event().wait(0.1)
    assert board.fake.runs == 1 and not board.clock.running
    assert events[-1] == ("RESET", {"guest": False, "reason": "host-qmp-system-reset"})
    control.cont()
    wait_until(lambda: board.fake.runs >= 2)
    assert board.runstate.state is RunState.RUNNING


def test_reset_of_a_running_vm_runs_on_without_stop_or_resume_events(board: FakeBoard) -> None:
    events: list[str] = []
    control = ControlApi(board)
    control.subscribe(lambda name, data: events.append(name))
    control.start(paused=False)
    wait_until(lambda: board.fake.runs == 1)
    board.reset(ShutdownCause.GUEST_RESET)
    assert board.runstate.state is RunState.RUNNING and board.clock.running
    wait_until(lambda: board.fake.runs >= 2)
    assert events == ["RESET"]


def test_system_reset_over_qmp_uses_qemus_cause() -> None:
    assert ShutdownCause.HOST_QMP_SYSTEM_RESET.value == "host-qmp-system-reset"
