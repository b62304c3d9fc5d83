"""pyemu.testing: write small x86 guest programs and run them on any accelerator.

    from pyemu.testing import GuestProgram, run_program

    result = run_program(GuestProgram("mov dx, exit_port\nmov eax, 42\nout dx, eax"), accel="tcg")
    assert result.exit_value == 42

See :mod:`pyemu.testing.environment` for the memory layout and symbols programs can use,
:mod:`pyemu.testing.board` for the devices, :mod:`pyemu.testing.interrupts` for the fake interrupt
controller.
"""

from pyemu.testing.accelerators import ACCELERATORS, kvm_unavailable_reason
from pyemu.testing.asm import assemble
from pyemu.testing.board import Access, DeviceMapping, RecordingDevice, TestBoard
from pyemu.testing.environment import Gate, GuestProgram, build, pte_address, pte_address32
from pyemu.testing.errors import AssemblyError, LayoutError, TestingError
from pyemu.testing.interrupts import FakeInterruptController
from pyemu.testing.runner import PreparedMachine, ProgramResult, RunContext, describe, prepared, run_program

__all__ = [
    "ACCELERATORS", "Access", "DeviceMapping", "AssemblyError", "FakeInterruptController", "Gate", "GuestProgram", "LayoutError",
    "PreparedMachine", "ProgramResult", "RecordingDevice", "RunContext", "TestBoard", "TestingError", "assemble", "build",
    "describe", "kvm_unavailable_reason", "prepared", "pte_address", "pte_address32", "run_program",
]
