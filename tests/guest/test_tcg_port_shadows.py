"""A 16550's line status register read by a guest under the software CPU: answered by the engine from the
value the model published (no call into Python) while the read has no side effect, and by the model
itself while it has one (error bits to clear) -- the same values either way."""

from __future__ import annotations

from typing import Any

from pyemu.accel.exits import Stopped
from pyemu.hw.char import serial as s
from pyemu.hw.char.serial import Serial16550
from pyemu.hw.core.irq import IrqLine
from pyemu.system.timers import TimerQueue
from pyemu.testing import DeviceMapping, GuestProgram, describe, prepared
from pyemu.testing.environment import DATA
from pyemu.testing.handlers import exit_with

COM1 = 0x3F8
POLLS = 1000

# LSR (the model clears BI), RBR, LSR, then POLLS reads of LSR folded into AND and OR.
PROGRAM = GuestProgram(code=f"""
    mov rdi, {DATA}
    mov dx, {COM1 + s.LSR}
    in al, dx
    mov byte ptr [rdi], al
    mov dx, {COM1 + s.RBR}
    in al, dx
    mov byte ptr [rdi + 1], al
    mov dx, {COM1 + s.LSR}
    in al, dx
    mov byte ptr [rdi + 2], al
    mov ecx, {POLLS}
    mov bl, 0xff
    mov bh, 0
again:
    in al, dx
    and bl, al
    or bh, al
    dec ecx
    jnz again
    mov byte ptr [rdi + 3], bl
    mov byte ptr [rdi + 4], bh
    {exit_with(0x600d)}
""")


class CountingUart:
    """The model behind a counter of the register reads that reach it."""

    def __init__(self, uart: Serial16550) -> None:
        self.uart = uart
        self.reads: dict[int, int] = {}

    def read(self, offset: int, size: int) -> int:
        self.reads[offset] = self.reads.get(offset, 0) + 1
        return self.uart.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.uart.write(offset, size, value)


def test_lsr_reads_are_answered_from_the_shadow_unless_they_must_clear_an_error() -> None:
    timers = TimerQueue()
    uart = Serial16550(IrqLine(), timers)
    counting = CountingUart(uart)
    with prepared(PROGRAM, devices=[DeviceMapping("pio", COM1, 8, counting, "com1")]) as machine:
        board: Any = machine.board
        uart.set_lsr_shadow(board.pio.read_shadow(COM1 + s.LSR))
        with board.lock:
            uart.receive_break()                  # BI and a zero byte: the first LSR read must clear BI
        result = machine.vcpu.run()
        assert isinstance(result, Stopped), describe(result)
        assert board.exit_device.value == 0x600D
        first, rbr, after, folded_and, folded_or = board.memory.read(DATA, 5)
        hits = machine.accelerator.port_shadow_hits
    idle = s.LSR_THRE | s.LSR_TEMT
    assert first == idle | s.LSR_BI | s.LSR_DR    # the model's answer, with the error it then cleared
    assert rbr == 0
    assert after == idle and folded_and == idle and folded_or == idle
    assert counting.reads == {s.LSR: 1, s.RBR: 1}   # every other LSR read stayed in the engine
    assert hits == POLLS + 1
