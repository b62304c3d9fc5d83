"""The block gate looks for a PAUSE spin only in a burst after each "contended" from the scheduler: a spin
that begins after the burst is not seen (the gate is not even called then, which is the point) until the
next "contended", which the scheduler repeats while a vCPU waits (``RoundRobin.spin_look_s``)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from pyemu.accel.tcg.block_gate import SPIN_BURST, track_block_starts
from pyemu.testing import GuestProgram, prepared

# A busy loop without PAUSE, long enough to use up a burst many times over (it is found to be "not a
# spin" and left alone), then a PAUSE spin that never ends.
PROGRAM = GuestProgram(f"""
    mov rcx, {400 * SPIN_BURST}
warm:
    dec rcx
    jnz warm
spin:
    pause
    jmp spin
""")
SPIN_LOOP = bytes([0xF3, 0x90, 0xEB, 0xFC])   # pause; jmp spin


@pytest.fixture(autouse=True)
def _block_starts_tracked() -> Iterator[None]:
    """These tests follow the guest through the gate's ``last_block``, kept current only on request."""
    previous = track_block_starts(True)
    yield
    track_block_starts(previous)


def _wait_for(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.001)
    return False


def _without_pause_hook(vcpu: object) -> None:
    """Leave only the spin detector (as on PyPI's library): pyemu's libunicorn would end the turn at the
    spin's first PAUSE (see the PAUSE test below)."""
    gate = vcpu._gate  # type: ignore[attr-defined]
    register = getattr(gate.library, "uc_pyemu_on_pause", None)
    if register is not None:
        assert register(vcpu._uc._uch, None, None) == 0  # type: ignore[attr-defined]


@contextmanager
def _running(machine: Any) -> Iterator[tuple[Any, Any, int, int]]:
    """The vCPU running PROGRAM on a thread of its own: (vcpu, its gate, main, the spin loop's address);
    stopped and joined on the way out."""
    vcpu = machine.vcpu
    main = machine.symbols["main"]
    spin = main + machine.board.memory.read(main, 0x40).index(SPIN_LOOP)
    runner = threading.Thread(target=vcpu.run, daemon=True)
    runner.start()
    try:
        yield vcpu, vcpu._gate, main, spin
    finally:
        vcpu.request_stop()
        runner.join(timeout=10)
    assert not runner.is_alive()


def test_a_spin_after_the_burst_is_found_at_the_next_contended_mark() -> None:
    with prepared(PROGRAM) as machine:
        _without_pause_hook(machine.vcpu)
        with _running(machine) as (vcpu, gate, main, spin):
            assert _wait_for(lambda: main < gate.last_block < main + 0x40), "the guest never ran its busy loop"
            gate.set_contended(True)          # one mark, while the guest is in the loop without PAUSE
            assert _wait_for(lambda: spin <= gate.last_block < spin + 0x10), "the guest never reached its spin"
            time.sleep(0.2)
            assert vcpu.spin_yields == 0  # type: ignore[attr-defined]  # the burst went on the busy loop

            marking = threading.Event()

            def mark() -> None:               # what a waiting vCPU's scheduler does
                while not marking.is_set():
                    gate.set_contended(True)
                    time.sleep(0.0005)

            marker = threading.Thread(target=mark, daemon=True)
            marker.start()
            try:
                assert _wait_for(lambda: vcpu.spin_yields > 0), "a marked spin never gave up the turn"  # type: ignore[attr-defined]
            finally:
                marking.set()
                marker.join()


def test_with_pyemus_engine_a_contended_pause_ends_the_turn_at_once() -> None:
    """The engine calls the gate at every PAUSE (engine patch ``pause-hook``): one "contended", long used up
    by the busy loop's burst, is enough for the spin's first PAUSE to end the turn; without a waiter the
    guest spins on."""
    with prepared(PROGRAM) as machine:
        gate = machine.vcpu._gate  # type: ignore[attr-defined]
        if not gate.conditional:
            pytest.skip("PyPI's libunicorn has none of pyemu's engine patches (PYEMU_UNICORN=pypi)")
        assert gate.pause_yields, "pyemu's libunicorn without uc_pyemu_on_pause"
        with _running(machine) as (vcpu, gate, main, spin):
            assert _wait_for(lambda: main < gate.last_block < main + 0x40), "the guest never ran its busy loop"
            assert vcpu.spin_yields == 0  # type: ignore[attr-defined]  # no waiter yet: PAUSE changes nothing
            gate.set_contended(True)          # one mark, while the guest is in the loop without PAUSE
            assert _wait_for(lambda: vcpu.spin_yields == 1), "a contended PAUSE did not end the turn"  # type: ignore[attr-defined]
            # The turn came back uncontended (no one else queued): the guest spins on, past the PAUSE.
            assert _wait_for(lambda: spin <= gate.last_block < spin + 0x10)
            time.sleep(0.1)
            assert vcpu.spin_yields == 1  # type: ignore[attr-defined]
