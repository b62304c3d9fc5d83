"""A 16550 driven by a guest under the software CPU: LSR reads answered by the engine from the value the
model published, THR writes posted (queued by the engine and handed to the model in order), each only
while the model allows it -- and the model sees the same accesses in the same order as without them."""

from __future__ import annotations

import threading
from typing import Any

from pyemu.accel.exits import Halt, Stopped
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
POLLING = GuestProgram(code=f"""
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


def _out(register: int, value: int) -> str:
    return f"mov dx, {COM1 + register}\nmov al, {value}\nout dx, al"


def _put(text: str) -> str:
    return "\n".join(_out(s.THR, ord(c)) for c in text)


# "hi" (posted), a scratch-register write (not posted: the two bytes must reach the model first), "!"
# (posted), IER.THRI on (not posted, and from then on THR is not either), "?", IER off, "." (posted), then
# HLT with IF=0: the run ends with "." still queued, and the vCPU hands it over as the run ends.
WRITING = GuestProgram(code="\n".join([
    "cli", _put("hi"), _out(s.SCR, 0x5A), _put("!"), _out(s.IER, s.IER_THRI), _put("?"), _out(s.IER, 0),
    _put("."), "hlt",
]))


class RecordingUart:
    """The model behind a log of the accesses that reach it."""

    def __init__(self, uart: Serial16550) -> None:
        self.uart = uart
        self.log: list[tuple[str, int, object]] = []

    def read(self, offset: int, size: int) -> int:
        self.log.append(("read", offset, size))
        return self.uart.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("write", offset, value))
        self.uart.write(offset, size, value)

    def write_burst(self, offset: int, data: bytes) -> None:
        self.log.append(("burst", offset, data))
        self.uart.write_burst(offset, data)


def _uart_on(machine: Any, uart: Serial16550) -> None:
    board = machine.board
    uart.set_fast_paths(board.pio.fast_path(COM1 + s.LSR), board.pio.fast_path(COM1 + s.THR))


def test_lsr_reads_are_answered_by_the_engine_unless_they_must_clear_an_error() -> None:
    uart = Serial16550(IrqLine(), TimerQueue())
    recording = RecordingUart(uart)
    with prepared(POLLING, devices=[DeviceMapping("pio", COM1, 8, recording, "com1")]) as machine:
        board: Any = machine.board
        _uart_on(machine, uart)
        with board.lock:
            uart.receive_break()                  # BI and a zero byte: the first LSR read must clear BI
        result = machine.vcpu.run()
        assert isinstance(result, Stopped), describe(result)
        assert board.exit_device.value == 0x600D
        first, rbr, after, folded_and, folded_or = board.memory.read(DATA, 5)
        statistics = machine.accelerator.port_fast_path_statistics
    idle = s.LSR_THRE | s.LSR_TEMT
    assert first == idle | s.LSR_BI | s.LSR_DR    # the model's answer, with the error it then cleared
    assert rbr == 0
    assert after == idle and folded_and == idle and folded_or == idle
    assert recording.log == [("read", s.LSR, 1), ("read", s.RBR, 1)]   # every other read stayed in the engine
    assert statistics["read_hits"] == POLLS + 1


def test_posted_thr_writes_reach_the_model_in_order_before_any_other_access_and_by_the_run_end() -> None:
    uart = Serial16550(IrqLine(), TimerQueue())
    sent: list[bytes] = []
    uart.transmit = sent.append
    recording = RecordingUart(uart)
    with prepared(WRITING, devices=[DeviceMapping("pio", COM1, 8, recording, "com1")]) as machine:
        _uart_on(machine, uart)
        result = machine.vcpu.run()
        assert isinstance(result, Halt), describe(result)
        statistics = machine.accelerator.port_fast_path_statistics
    assert recording.log == [
        ("burst", s.THR, b"hi"), ("write", s.SCR, 0x5A), ("burst", s.THR, b"!"), ("write", s.IER, s.IER_THRI),
        ("write", s.THR, ord("?")), ("write", s.IER, 0), ("burst", s.THR, b"."),
    ]
    assert b"".join(sent) == b"hi!?."
    assert statistics["posted_writes"] == 4


# "x" posted, then a loop with interrupts off that touches no port: only the watch gets the byte out.
SPINNING = GuestProgram(code="\n".join(["cli", _put("x"), "spin:", "jmp spin"]))


def test_a_posted_byte_reaches_the_model_while_the_guest_computes_on() -> None:
    uart = Serial16550(IrqLine(), TimerQueue())
    arrived = threading.Event()
    uart.transmit = lambda data: arrived.set() if data == b"x" else None
    with prepared(SPINNING, devices=[DeviceMapping("pio", COM1, 8, uart, "com1")]) as machine:
        _uart_on(machine, uart)
        runner = threading.Thread(target=machine.vcpu.run, daemon=True)  # the watch, not the test, must end the spin
        runner.start()
        try:
            assert arrived.wait(10.0), "the posted byte stayed queued"
        finally:
            machine.vcpu.request_stop()
            runner.join(10.0)
        assert machine.accelerator.port_fast_path_statistics["posted_writes"] == 1
