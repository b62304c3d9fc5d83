"""inject-nmi reaches the guest: a small program's NMI handler (vector 2) records the delivery, on the
software CPU and under KVM (skipped where KVM is unusable). The vCPU-level ``inject_nmi`` is what
``Machine.inject_nmi`` calls for each vCPU; the QMP path is covered in test_hmp_integration."""

from __future__ import annotations

import threading
import time

import pytest

from pyemu.testing import GuestProgram, RunContext, describe, kvm_unavailable_reason, run_program
from pyemu.testing.handlers import exit_with, read_frame, recording_handler, slot_address

NMI = 2
COUNT = slot_address(0) + 0x48  # recording_handler(0)'s delivery counter


@pytest.fixture(params=["tcg", "kvm"])
def accel(request: pytest.FixtureRequest) -> str:
    if request.param == "kvm":
        reason = kvm_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    return str(request.param)


def inject_later(delay: float = 0.05):
    def start(context: RunContext) -> None:
        def fire() -> None:
            time.sleep(delay)
            context.vcpu.inject_nmi()

        threading.Thread(target=fire, daemon=True).start()

    return start


def test_nmi_interrupts_a_loop_with_interrupts_disabled(accel: str) -> None:
    program = GuestProgram(
        code=f"""
            cli
            mov rbx, {COUNT}
        spin:
            mov eax, [rbx]
            test eax, eax
            jz spin
            {exit_with("eax")}
        """,
        handlers={NMI: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel, timeout=30.0, before_run=inject_later())
    assert result.exit_value == 1, describe(result)
    frame = read_frame(result, 0)
    assert frame.rflags & (1 << 9) == 0  # taken although IF=0: it is non-maskable


def test_nmi_injected_before_the_run_is_taken_once(accel: str) -> None:
    """A paused vCPU keeps the NMI until it runs again (inject-nmi during `stop`, then `cont`)."""
    program = GuestProgram(
        code=f"""
            cli
            mov rcx, 2000000
        wait:
            dec rcx
            jnz wait
            mov rbx, {COUNT}
            mov eax, [rbx]
            {exit_with("eax")}
        """,
        handlers={NMI: recording_handler(0, error_code=False)},
    )
    result = run_program(program, accel, timeout=60.0, before_run=lambda context: context.vcpu.inject_nmi())
    assert result.exit_value == 1, describe(result)
