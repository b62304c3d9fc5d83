"""Halt polling of the software CPU: the gate's spin ends on any flag and lets other Python threads run,
the adaptive window follows KVM's rule, and a halted guest is woken by an interrupt both while its vCPU
spins and after it went to sleep."""

from __future__ import annotations

import threading
import time

import pytest
from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

from pyemu.accel.tcg import halt_poll
from pyemu.accel.tcg.block_gate import BlockGate
from pyemu.accel.tcg.halt_poll import MAX_POLL_NS, default_max_poll_ns
from pyemu.system.poll_window import GROW_START_NS, PollWindow
from pyemu.testing import FakeInterruptController, GuestProgram, prepared
from pyemu.testing.handlers import exit_with, recording_handler, slot_address

VECTOR = 0x30
COUNT = slot_address(0) + 0x48  # recording_handler(0)'s delivery counter
LONG_NS = 20_000_000_000         # longer than any test waits: a poll that returns was ended by a flag


@pytest.fixture
def gate():
    gate = BlockGate(Uc(UC_ARCH_X86, UC_MODE_64))
    yield gate
    gate.close()


def test_poll_ends_when_another_thread_signals_and_releases_the_gil(gate: BlockGate) -> None:
    gate.begin_wait()
    result: list[bool] = []
    poller = threading.Thread(target=lambda: result.append(gate.poll(LONG_NS)))
    poller.start()
    spins = 0
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:  # Python runs here while the poller spins in C
        spins += 1
    assert poller.is_alive(), "the poll ended with no flag set"
    gate.signal_interrupt()
    poller.join(timeout=10)
    assert not poller.is_alive()
    assert result == [True]
    assert spins > 1000


def test_poll_returns_false_when_its_budget_runs_out(gate: BlockGate) -> None:
    gate.begin_wait()
    started = time.monotonic()
    assert gate.poll(2_000_000) is False
    assert time.monotonic() - started >= 0.002


def test_begin_wait_forgets_flags_set_before_it(gate: BlockGate) -> None:
    gate.request_service()
    gate.begin_wait()
    assert gate.poll(1_000_000) is False
    gate.request_stop()
    assert gate.poll(LONG_NS) is True


def test_window_grows_on_short_halts_and_resets_on_long_ones() -> None:
    polling = PollWindow(MAX_POLL_NS)
    assert polling.budget_ns() == 0                    # an idle guest does not spin at first
    polling.record(50_000, woken_while_polling=False)  # short: the next one would have been caught
    assert polling.budget_ns() == GROW_START_NS
    sizes = []
    for _ in range(8):
        polling.record(150_000, woken_while_polling=False)
        sizes.append(polling.budget_ns())
    assert sizes[:4] == [2 * GROW_START_NS, 4 * GROW_START_NS, 8 * GROW_START_NS, 16 * GROW_START_NS]
    assert sizes[-1] == MAX_POLL_NS
    polling.record(30_000, woken_while_polling=True)   # caught: the window stays
    assert polling.budget_ns() == MAX_POLL_NS and polling.poll_hits == 1
    polling.record(MAX_POLL_NS + 1, woken_while_polling=False)  # idle time: stop spinning
    assert polling.budget_ns() == 0


def test_no_polling_without_a_host_cpu_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(halt_poll.os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_max_poll_ns(1) == MAX_POLL_NS
    assert default_max_poll_ns(2) == 0
    polling = PollWindow(default_max_poll_ns(2))
    polling.record(10_000, woken_while_polling=False)
    assert polling.budget_ns() == 0


def test_cpus_the_process_may_not_use_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM started under ``taskset -c 1`` (or in a container limited to one CPU) on a many-CPU host has
    one CPU: a spinning vCPU would take it from the I/O thread that is to wake it."""
    monkeypatch.setattr(halt_poll.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(halt_poll.os, "sched_getaffinity", lambda pid: {5})
    assert default_max_poll_ns(1) == 0
    monkeypatch.setattr(halt_poll.os, "sched_getaffinity", lambda pid: {5, 9})
    assert default_max_poll_ns(1) == MAX_POLL_NS


HALT_THEN_COUNT = f"""
    sti
    hlt
    cli
    mov rbx, {COUNT}
    mov eax, [rbx]
    {exit_with("eax")}
"""


@pytest.mark.parametrize("spin", [True, False], ids=["woken-while-spinning", "woken-from-sleep"])
def test_interrupt_wakes_a_halted_vcpu(spin: bool) -> None:
    controller = FakeInterruptController()
    program = GuestProgram(HALT_THEN_COUNT, handlers={VECTOR: recording_handler(0, error_code=False)})
    with prepared(program, interrupts=controller) as machine:
        vcpu = machine.vcpu
        polling = vcpu.halt_polling  # type: ignore[attr-defined]
        # Spinning: a window longer than the wait, so the halt ends inside it whatever the host's load.
        polling.max_ns = LONG_NS if spin else 0
        polling.window_ns = LONG_NS if spin else 0

        def fire() -> None:
            time.sleep(0.05)
            controller.raise_vector(VECTOR)

        threading.Thread(target=fire, daemon=True).start()
        vcpu.run()
        assert machine.board.exit_device.value == 1
        assert polling.polls == (1 if spin else 0)
        assert polling.poll_hits == (1 if spin else 0)


def test_an_io_threads_interrupt_reaches_a_polling_vcpu_after_the_thread_lets_the_gil_go() -> None:
    """A handler on an I/O thread raises the interrupt while the vCPU spins: the flags are left to the I/O
    thread, which sets them in C on its way to sleep (system/wake_publish.py), and the spin ends on them."""
    from pyemu.system.iothread import IoThread

    controller = FakeInterruptController()
    program = GuestProgram(HALT_THEN_COUNT, handlers={VECTOR: recording_handler(0, error_code=False)})
    iothread = IoThread("halt-poll-test")
    iothread.start()
    try:
        with prepared(program, interrupts=controller) as machine:
            vcpu = machine.vcpu
            vcpu.halt_polling.max_ns = LONG_NS  # type: ignore[attr-defined]
            vcpu.halt_polling.window_ns = LONG_NS  # type: ignore[attr-defined]

            def fire() -> None:
                time.sleep(0.05)
                iothread.call_soon(lambda: controller.raise_vector(VECTOR))

            threading.Thread(target=fire, daemon=True).start()
            started = time.monotonic()
            vcpu.run()
            # Well inside the 20 s spin: only the published flags can have ended it.
            assert time.monotonic() - started < 10
            assert machine.board.exit_device.value == 1
            assert vcpu.kicks_published == 1  # type: ignore[attr-defined]
            assert vcpu.halt_polling.poll_hits == 1  # type: ignore[attr-defined]
    finally:
        iothread.close()


def test_a_spin_that_ends_before_the_io_thread_sleeps_does_not_sleep_through_the_interrupt() -> None:
    """The handler raises the interrupt and then keeps its thread busy for long after the vCPU's spin has
    run out: the vCPU must see the interrupt the controller holds, not sleep until a wake-up that the
    published flags never give (they end a spin; they do not set the sleeper's event)."""
    from pyemu.system.iothread import IoThread

    controller = FakeInterruptController()
    program = GuestProgram(HALT_THEN_COUNT, handlers={VECTOR: recording_handler(0, error_code=False)})
    iothread = IoThread("halt-poll-race")
    iothread.start()
    handler_done = threading.Event()
    try:
        with prepared(program, interrupts=controller) as machine:
            vcpu = machine.vcpu

            def raise_then_stay_busy() -> None:
                controller.raise_vector(VECTOR)  # published, since the vCPU polls
                time.sleep(3.0)  # the flags are set only after this; the spin runs out long before
                handler_done.set()

            def fire() -> None:
                deadline = time.monotonic() + 10
                while not vcpu.polling and time.monotonic() < deadline:  # type: ignore[attr-defined]
                    time.sleep(0.0002)
                iothread.call_soon(raise_then_stay_busy)

            vcpu.halt_polling.max_ns = 300_000_000  # type: ignore[attr-defined]
            vcpu.halt_polling.window_ns = 300_000_000  # type: ignore[attr-defined]
            threading.Thread(target=fire, daemon=True).start()
            result: list[object] = []
            runner = threading.Thread(target=lambda: result.append(vcpu.run()), daemon=True)
            runner.start()
            runner.join(timeout=30)
            if runner.is_alive():
                vcpu.request_stop()
                runner.join(timeout=10)
            assert machine.board.exit_device.value == 1
            assert vcpu.kicks_published == 1  # type: ignore[attr-defined]
            assert not handler_done.is_set(), "the vCPU waited for the I/O thread to go to sleep"
    finally:
        iothread.close()


HALT_LOOP = f"""
    mov rbx, {COUNT:#x}
    sti
again:
    hlt
    cmp qword ptr [rbx], 20
    jb again
    mov rax, qword ptr [rbx]
    {exit_with("eax")}
"""


@pytest.mark.parametrize("spin", [True, False], ids=["woken-while-spinning", "woken-from-sleep"])
def test_halts_at_one_place_walk_the_page_tables_once(spin: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vCPU checks that a run ended on a HLT by reading the byte before RIP through the guest's page
    tables; a HLT it has halted at before (same CR3, same address) is not walked again."""
    from pyemu.accel.tcg.traps import Traps

    walks: list[int] = []
    original = Traps.linear
    monkeypatch.setattr(Traps, "linear", lambda self, regs: walks.append(regs.cr3) or original(self, regs))
    controller = FakeInterruptController()
    program = GuestProgram(HALT_LOOP, handlers={VECTOR: recording_handler(0, error_code=False)})
    with prepared(program, interrupts=controller) as machine:
        vcpu = machine.vcpu
        vcpu.halt_polling.max_ns = LONG_NS if spin else 0  # type: ignore[attr-defined]
        vcpu.halt_polling.window_ns = LONG_NS if spin else 0  # type: ignore[attr-defined]

        def fire() -> None:
            for count in range(1, 21):
                time.sleep(0.002)
                controller.raise_vector(VECTOR)
                if not controller.wait_acknowledged(count, timeout=10):
                    return

        threading.Thread(target=fire, daemon=True).start()
        vcpu.run()
        assert machine.board.exit_device.value == 20
        in_engine = spin and vcpu._gate.halts_in_engine  # type: ignore[attr-defined]
    # Spinning on pyemu's libunicorn, every halt ends inside the run and none reaches the check.
    expected = 0 if in_engine else 1
    assert len(walks) == expected, f"{len(walks)} page walks for 20 halts at one HLT"


def test_an_interrupt_during_the_spin_is_taken_inside_the_run() -> None:
    """On pyemu's libunicorn a HLT with IF=1 spins inside the run (block_gate.c, pyemu_gate_halt): each of
    20 interrupts, raised while the guest sits in HLT, is delivered there, with the return address after
    the HLT, and the run never ends for a halt. With a window of 0 every halt ends the run as before."""
    controller = FakeInterruptController()
    program = GuestProgram(HALT_LOOP, handlers={VECTOR: recording_handler(0, error_code=False)})
    with prepared(program, interrupts=controller) as machine:
        vcpu = machine.vcpu
        gate = vcpu._gate  # type: ignore[attr-defined]
        if not gate.halts_in_engine:
            pytest.skip("PyPI's libunicorn halts as Unicorn does")
        vcpu.halt_polling.max_ns = LONG_NS  # type: ignore[attr-defined]
        vcpu.halt_polling.window_ns = LONG_NS  # type: ignore[attr-defined]
        runs = 0
        original = vcpu._uc.emu_start  # type: ignore[attr-defined]

        def counting_emu_start(*args: object, **kwargs: object) -> None:
            nonlocal runs
            runs += 1
            original(*args, **kwargs)

        vcpu._uc.emu_start = counting_emu_start  # type: ignore[attr-defined]

        def fire() -> None:
            for count in range(1, 21):
                deadline = time.monotonic() + 10
                while not vcpu.polling and time.monotonic() < deadline:  # type: ignore[attr-defined]
                    time.sleep(0.0002)
                controller.raise_vector(VECTOR)
                if not controller.wait_acknowledged(count, timeout=10):
                    return

        threading.Thread(target=fire, daemon=True).start()
        vcpu.run()
        assert machine.board.exit_device.value == 20
        assert gate.halt_wakes == 20
        assert vcpu.halt_polling.poll_hits == 20  # type: ignore[attr-defined]
        assert runs == 1, f"{runs} runs for 20 halts woken inside the run"
