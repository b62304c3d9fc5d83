"""Software-CPU speed: guest instructions per second in a tight loop, and the cost of one injected interrupt.

Measured here:

1. ``loop64``: ``dec rcx; jnz`` (2 instructions per iteration) in 64-bit long mode under pyemu's TCG vCPU
   (Unicorn + the C block gate), timed between two debug-console markers; and the same loop on a bare
   Unicorn engine without any hook, for the cost of the gate (one call per translation block, which in
   this loop is every second instruction: the worst case).
2. ``loop32``: the same loop in flat 32-bit protected mode, under pyemu and under
   ``qemu-system-x86_64 -accel tcg`` booting the very same code as a multiboot ELF32 built here. Both
   sides are timed between two debug-console markers ("S" before the loop, "E" after it, port 0xe9), so
   QEMU's start-up and firmware are not counted; QEMU is timed by when each byte arrives on its stdout pipe.
3. ``interrupt``: N interrupts raised up front on the fake interrupt controller; the guest (``sti``, spin
   until its handler counted N) takes them back to back, each one a block-gate stop, an IDT delivery in
   Python and a resume. Cost per interrupt = (time - time of the same spin without interrupts) / N.
4. ``interrupt_latency``: a host thread raises one interrupt, waits for its acknowledgement, raises the
   next; per-interrupt round trip including the thread hand-off (GIL) latency.
5. ``syscall``: a CPL3 loop of SYSCALL with a kernel entry that only does SYSRET; per round trip.

With pyemu's libunicorn built (the default then), the loops of 1. and 2. also run on PyPI's library in a
child process (``PYEMU_UNICORN=pypi``), in the same run.

Prints the figures and writes them to ``benchmarks/results/tcg_cpu.json``. Everything is bounded in time
(a stop deadline per pyemu run, a subprocess timeout for QEMU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyemu.accel import tcg  # first: chooses the libunicorn before anything imports unicorn
from pyemu.accel.exits import Stopped
from pyemu.accel.tcg.engine_library import CHOICE_VARIABLE, loaded_library
from pyemu.testing import FakeInterruptController, GuestProgram, assemble, prepared
from pyemu.testing.handlers import recording_handler, slot_address

RESULTS = Path(__file__).with_name("results") / "tcg_cpu.json"
DEBUG_EXIT = 0xF4
DEBUGCON = 0xE9


def loop_source(iterations: int, bits: int) -> str:
    counter = "rcx" if bits == 64 else "ecx"
    return f"""
        mov dx, {DEBUGCON}
        mov al, 0x53
        out dx, al
        mov {counter}, {iterations}
    spin:
        dec {counter}
        jnz spin
        mov al, 0x45
        out dx, al
        mov dx, {DEBUG_EXIT}
        xor eax, eax
        out dx, eax
    """


class MarkerClock:
    """Timestamps of the 'S' and 'E' bytes the guest writes to the debug console."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def read(self, offset: int, size: int) -> int:
        return 0xE9

    def write(self, offset: int, size: int, value: int) -> None:
        self.marks.setdefault(chr(value & 0xFF), time.perf_counter())

    @property
    def elapsed(self) -> float:
        return self.marks["E"] - self.marks["S"]


def pyemu_loop(iterations: int, bits: int, deadline: float) -> float:
    """Seconds between the markers for ``iterations`` loop iterations under pyemu."""
    program = GuestProgram(loop_source(iterations, bits), mode="long" if bits == 64 else "protected")
    with prepared(program) as machine:
        clock = MarkerClock()
        machine.board.pio.unregister(machine.board.console)
        machine.board.pio.register(DEBUGCON, 1, clock, "marker-clock")
        timer = threading.Timer(deadline, machine.vcpu.request_stop)
        timer.start()
        try:
            result = machine.vcpu.run()
        finally:
            timer.cancel()
        if not isinstance(result, Stopped) or "E" not in clock.marks:
            raise RuntimeError(f"pyemu loop did not finish: {result!r}")
        return clock.elapsed


def raw_unicorn_loop(iterations: int) -> float:
    """The same 64-bit loop on a bare Unicorn engine (no hooks, no paging): the engine's own speed, to
    show what the block gate and the vCPU's hooks cost."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x200000)
    code = assemble(f"mov rcx, {iterations}\nspin:\ndec rcx\njnz spin\nhlt", address=0x1000)
    uc.mem_write(0x1000, code)
    start = time.perf_counter()
    uc.emu_start(0x1000, 0xFFFF_FFFF_FFFF_FFFF)
    return time.perf_counter() - start


def multiboot_elf(code: bytes, load: int = 0x100000) -> bytes:
    """A minimal multiboot (v1) ELF32: one PT_LOAD segment holding the headers, the multiboot header
    and ``code``; QEMU's -kernel loads it and enters ``code`` in flat 32-bit protected mode."""
    ehdr_size, phdr_size = 52, 32
    header_offset = ehdr_size + phdr_size
    magic, flags = 0x1BADB002, 0
    mb_header = struct.pack("<III", magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    code_offset = header_offset + len(mb_header)
    image_size = code_offset + len(code)
    ehdr = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8) + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, load + code_offset, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 40, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, 0, load, load, image_size, image_size, 7, 0x1000)
    return ehdr + phdr + mb_header + code


def qemu_loop(iterations: int, timeout: float) -> tuple[float, float]:
    """(seconds between the markers, whole process wall time) for the loop under QEMU TCG."""
    code = assemble(loop_source(iterations, 32), address=0x100000 + 96, bits=32) + b"\xf4\xeb\xfd"
    with tempfile.TemporaryDirectory(prefix="pyemu-bench-") as directory:
        kernel = Path(directory) / "loop.elf"
        kernel.write_bytes(multiboot_elf(code))
        command = ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64", "-display", "none",
                   "-nodefaults", "-no-reboot", "-kernel", str(kernel),
                   "-chardev", "stdio,id=con", "-device", "isa-debugcon,iobase=0xe9,chardev=con",
                   "-device", f"isa-debug-exit,iobase={DEBUG_EXIT:#x},iosize=4"]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        marks: dict[str, float] = {}
        assert process.stdout is not None
        try:
            while len(marks) < 2:
                byte = process.stdout.read(1)
                if not byte:
                    break
                marks.setdefault(byte.decode("latin-1"), time.perf_counter())
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        total = time.perf_counter() - start
        if "S" not in marks or "E" not in marks:
            errors = process.stderr.read().decode()[:400] if process.stderr is not None else ""
            raise RuntimeError(f"QEMU did not print both markers: {errors}")
        return marks["E"] - marks["S"], total


def interrupt_program(count: int) -> GuestProgram:
    return GuestProgram(
        code=f"""
            mov rbx, {slot_address(0) + 0x48}
            sti
        spin:
            cmp qword ptr [rbx], {count}
            jb spin
            cli
            mov dx, {DEBUG_EXIT}
            out dx, eax
        """,
        handlers={0x30: recording_handler(0, error_code=False)},
    )


def interrupt_back_to_back(count: int) -> float:
    """Seconds for ``count`` back-to-back interrupts (raised up front)."""
    controller = FakeInterruptController()
    with prepared(interrupt_program(count), interrupts=controller) as machine:
        for _ in range(count):
            controller.raise_vector(0x30)
        start = time.perf_counter()
        result = machine.vcpu.run()
        elapsed = time.perf_counter() - start
        if not isinstance(result, Stopped) or machine.board.exit_device.value is None:
            raise RuntimeError(f"interrupt benchmark did not finish: {result!r}")
        return elapsed


def interrupt_spin_baseline() -> float:
    """The same program with the count already reached (no interrupt): per-run fixed cost."""
    controller = FakeInterruptController()
    with prepared(interrupt_program(0), interrupts=controller) as machine:
        start = time.perf_counter()
        machine.vcpu.run()
        return time.perf_counter() - start


def interrupt_latency(count: int) -> float:
    """Seconds per raise -> delivery round trip with a host thread raising one at a time."""
    controller = FakeInterruptController()
    with prepared(interrupt_program(count), interrupts=controller) as machine:
        def raiser() -> None:
            for index in range(count):
                controller.raise_vector(0x30)
                if not controller.wait_acknowledged(index + 1, timeout=5):
                    machine.vcpu.request_stop()
                    return

        thread = threading.Thread(target=raiser, daemon=True)
        start = time.perf_counter()
        thread.start()
        machine.vcpu.run()
        elapsed = time.perf_counter() - start
        thread.join()
        return elapsed / count


def syscall_round_trip(count: int) -> float:
    """Seconds per SYSCALL -> SYSRET round trip from CPL3 (SYSCALL is performed by the vCPU in Python,
    SYSRET natively by Unicorn)."""
    program = GuestProgram(
        code="""
            mov rax, user_ds
            push rax
            mov rax, user_stack_top
            push rax
            push 0x3002
            mov rax, user_cs
            push rax
            mov rax, user
            push rax
            iretq
        """,
        sections={
            "user": f"""
                mov rbx, {count}
            again:
                syscall
                dec rbx
                jnz again
                mov dx, {DEBUG_EXIT}
                out dx, eax
            """,
            "syscall_entry": "sysret",
        },
    )
    with prepared(program) as machine:
        start = time.perf_counter()
        result = machine.vcpu.run()
        elapsed = time.perf_counter() - start
        if not isinstance(result, Stopped) or machine.board.exit_device.value is None:
            raise RuntimeError(f"syscall benchmark did not finish: {result!r}")
        return elapsed / count


def loop_figures(iterations: int, repeat: int) -> dict[str, float]:
    """The three tight loops (best of ``repeat``) on the libunicorn this process loaded, in M instr/s."""
    instructions = 2 * iterations + 1
    loop64 = min(pyemu_loop(iterations, 64, 60) for _ in range(repeat))
    loop32 = min(pyemu_loop(iterations, 32, 60) for _ in range(repeat))
    raw = min(raw_unicorn_loop(iterations) for _ in range(repeat))
    print(f"pyemu TCG  64-bit dec/jnz loop: {instructions / loop64 / 1e6:7.1f} M instr/s ({loop64:.3f} s)",
          file=sys.stderr)
    print(f"bare Unicorn 64-bit loop (no hooks): {instructions / raw / 1e6:7.1f} M instr/s", file=sys.stderr)
    print(f"pyemu TCG  32-bit dec/jnz loop: {instructions / loop32 / 1e6:7.1f} M instr/s ({loop32:.3f} s)",
          file=sys.stderr)
    return {"raw_unicorn_loop64_minstr_per_s": round(instructions / raw / 1e6, 1),
            "pyemu_loop64_minstr_per_s": round(instructions / loop64 / 1e6, 1),
            "pyemu_loop32_minstr_per_s": round(instructions / loop32 / 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150_000_000, help="loop iterations (2 instr each)")
    parser.add_argument("--interrupts", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument("--loops-only", action="store_true",
                        help="print the loop figures as JSON and stop (the PyPI-library run in a child process)")
    args = parser.parse_args()
    instructions = 2 * args.iterations + 1
    figures: dict[str, object] = {"host": platform.node(), "python": sys.version.split()[0],
                                  "iterations": args.iterations, "cpus": os.cpu_count(),
                                  "engine_library": loaded_library()}
    loops = loop_figures(args.iterations, args.repeat)
    if args.loops_only:
        print(json.dumps(loops))
        return 0
    figures.update(loops)
    loop32 = instructions / (loops["pyemu_loop32_minstr_per_s"] * 1e6)
    if tcg.ENGINE_LIBRARY == "pyemu":  # the same loops on PyPI's library, in a process that loads it
        child = subprocess.run([sys.executable, __file__, "--loops-only", "--iterations", str(args.iterations),
                                "--repeat", str(args.repeat)], env={**os.environ, CHOICE_VARIABLE: "pypi"},
                               capture_output=True, text=True, timeout=600, check=True)
        pypi = json.loads(child.stdout.splitlines()[-1])
        figures["pypi_engine"] = pypi
        print(f"  on PyPI's libunicorn: pyemu 64-bit {pypi['pyemu_loop64_minstr_per_s']} M instr/s, "
              f"bare {pypi['raw_unicorn_loop64_minstr_per_s']} M instr/s")

    if not args.no_qemu and shutil.which("qemu-system-x86_64"):
        runs = [qemu_loop(args.iterations, 120) for _ in range(args.repeat)]
        qemu32, qemu_total = min(r[0] for r in runs), min(r[1] for r in runs)
        figures["qemu_loop32_minstr_per_s"] = round(instructions / qemu32 / 1e6, 1)
        figures["qemu_process_seconds"] = round(qemu_total, 3)
        figures["pyemu_over_qemu_loop32"] = round(qemu32 / loop32, 3)
        print(f"QEMU 7.2 TCG 32-bit dec/jnz loop: {instructions / qemu32 / 1e6:7.1f} M instr/s ({qemu32:.3f} s, "
              f"process {qemu_total:.2f} s)")
        print(f"pyemu / QEMU speed ratio (32-bit loop): {qemu32 / loop32:.2f}")

    baseline = min(interrupt_spin_baseline() for _ in range(args.repeat))
    burst = min(interrupt_back_to_back(args.interrupts) for _ in range(args.repeat))
    per_interrupt = (burst - baseline) / args.interrupts
    latency = min(interrupt_latency(min(args.interrupts, 2000)) for _ in range(args.repeat))
    figures["interrupt_cost_us"] = round(per_interrupt * 1e6, 2)
    figures["interrupt_round_trip_us"] = round(latency * 1e6, 2)
    print(f"injected interrupt, back to back: {per_interrupt * 1e6:7.2f} µs each ({args.interrupts} in {burst:.3f} s)")
    print(f"injected interrupt, host thread round trip: {latency * 1e6:7.2f} µs each")

    syscall = min(syscall_round_trip(args.interrupts) for _ in range(args.repeat))
    figures["syscall_round_trip_us"] = round(syscall * 1e6, 2)
    print(f"SYSCALL/SYSRET round trip from CPL3: {syscall * 1e6:7.2f} µs")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
