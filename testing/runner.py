"""Run a guest program on a fresh fake board under any accelerator and report what happened.

``run_program`` builds the environment (:mod:`pyemu.testing.environment`), creates the accelerator by
name through :func:`pyemu.accel.base.create_accelerator` (so the same test runs under "tcg" and "kvm"),
runs the vCPU until the program writes the exit port, halts with nothing to wake it, shuts down, or the
time limit passes, and returns a :class:`ProgramResult` with a copy of guest RAM and the final registers.
"""

from __future__ import annotations

import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from pyemu.accel.base import Vcpu, create_accelerator
from pyemu.accel.exits import Exit, Stopped
from pyemu.target.x86.cpu_state import X86CpuState
from pyemu.target.x86.cpuid import CpuidTable, default_cpuid
from pyemu.testing.board import DEFAULT_RAM_SIZE, Access, DeviceMapping, TestBoard
from pyemu.testing.environment import UNEXPECTED_VECTOR, GuestProgram, build
from pyemu.testing.interrupts import FakeInterruptController


@dataclass
class RunContext:
    """Handed to ``before_run``: start host threads that raise interrupts, poke devices, ..."""

    vcpu: Vcpu
    board: TestBoard
    symbols: dict[str, int]
    interrupts: FakeInterruptController | None


@dataclass
class ProgramResult:
    exit: Exit                       # the exit that ended the run (Stopped after an exit-port write)
    exit_value: int | None           # value written to the exit port, None if never written
    state: X86CpuState               # registers at the end
    symbols: dict[str, int]
    traffic: list[Access]            # recording-device accesses (pio, then mmio)
    console: str
    ram: bytes                       # guest RAM at the end
    timed_out: bool = False
    elapsed: float = 0.0
    interrupts_acknowledged: list[int] = field(default_factory=list)

    @property
    def regs(self) -> dict[str, int]:
        return self.state.regs

    @property
    def unexpected_vector(self) -> int | None:
        """The vector of an exception that hit a catch-all stub, if that is how the program ended."""
        if self.exit_value is not None and self.exit_value & 0xFFFF0000 == UNEXPECTED_VECTOR:
            return self.exit_value & 0xFF
        return None

    @property
    def exit_code(self) -> int | None:
        """QEMU isa-debug-exit's process exit status for the value written."""
        return None if self.exit_value is None else ((self.exit_value << 1) | 1) & 0xFF

    def read(self, address: int | str, size: int) -> bytes:
        start = self.symbols[address] if isinstance(address, str) else address
        return self.ram[start:start + size]

    def u64(self, address: int | str, index: int = 0) -> int:
        return int(struct.unpack("<Q", self.read(self._address(address) + 8 * index, 8))[0])

    def u32(self, address: int | str, index: int = 0) -> int:
        return int(struct.unpack("<I", self.read(self._address(address) + 4 * index, 4))[0])

    def _address(self, address: int | str) -> int:
        return self.symbols[address] if isinstance(address, str) else address


@dataclass
class PreparedMachine:
    """A board with the program loaded and one vCPU in its entry state, not yet running."""

    board: TestBoard
    accelerator: object
    vcpu: Vcpu
    symbols: dict[str, int]
    interrupts: FakeInterruptController | None


@contextmanager
def prepared(program: GuestProgram, accel: str = "tcg", *, interrupts: FakeInterruptController | None = None,
             cpuid: CpuidTable | None = None, ram_size: int = DEFAULT_RAM_SIZE,
             vcpu_index: int = 0, devices: Iterable[DeviceMapping] = ()) -> Iterator[PreparedMachine]:
    """Build ``program`` on a fresh board and create its vCPU; closes everything on exit. For tests that
    drive ``vcpu.run()`` themselves (stop/resume, kicks at chosen moments)."""
    board = TestBoard(ram_size)
    accelerator = create_accelerator(accel)
    try:
        for mapping in devices:
            board.add_device(mapping)
        built = build(program, board.memory)
        accelerator.attach(board.memory, board.dispatcher, cpuid or default_cpuid())
        vcpu = accelerator.create_vcpu(vcpu_index, interrupts)
        if interrupts is not None:
            interrupts.attach(vcpu)
            board.attach_interrupt_trigger(interrupts)
        board.exit_device.on_exit = vcpu.request_stop
        vcpu.load_state(built.state)
        yield PreparedMachine(board, accelerator, vcpu, built.symbols, interrupts)
    finally:
        accelerator.close()
        board.close()


def run_program(program: GuestProgram, accel: str = "tcg", *, timeout: float = 5.0,
                interrupts: FakeInterruptController | None = None,
                before_run: Callable[[RunContext], None] | None = None,
                cpuid: CpuidTable | None = None, ram_size: int = DEFAULT_RAM_SIZE,
                devices: Iterable[DeviceMapping] = ()) -> ProgramResult:
    """Run ``program`` to its end. ``timeout`` bounds the wall time (then the result is ``timed_out``).
    ``devices`` maps your own device models onto the board (see :class:`DeviceMapping`)."""
    with prepared(program, accel, interrupts=interrupts, cpuid=cpuid, ram_size=ram_size,
                  devices=devices) as machine:
        vcpu, board = machine.vcpu, machine.board
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            vcpu.request_stop()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        if before_run is not None:
            before_run(RunContext(vcpu, board, machine.symbols, interrupts))
        start = time.monotonic()
        timer.start()
        try:
            while True:
                result = vcpu.run()
                if isinstance(result, Stopped) and board.exit_device.value is None and not timed_out.is_set():
                    continue
                break
        finally:
            timer.cancel()
        elapsed = time.monotonic() - start
        state = vcpu.save_state()
        return ProgramResult(
            exit=result, exit_value=board.exit_device.value, state=state, symbols=machine.symbols,
            traffic=board.traffic, console=board.console.output.decode("latin-1"),
            ram=board.memory.read(0, ram_size), timed_out=timed_out.is_set(), elapsed=elapsed,
            interrupts_acknowledged=list(interrupts.acknowledged) if interrupts is not None else [],
        )


def describe(result: ProgramResult) -> str:
    """A one-line summary for assertion messages."""
    parts = [f"exit={result.exit!r}", f"value={result.exit_value!r}"]
    if result.unexpected_vector is not None:
        parts.append(f"unexpected vector {result.unexpected_vector}")
    if result.timed_out:
        parts.append("timed out")
    parts.append(f"rip={result.state.rip:#x}")
    return " ".join(parts)


__all__ = ["PreparedMachine", "ProgramResult", "RunContext", "describe", "prepared", "run_program"]
