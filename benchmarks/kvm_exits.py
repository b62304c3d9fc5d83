"""Round-trip cost of a port-I/O exit and of an MMIO exit under KVM: pyemu against QEMU.

Both VMMs run the very same guest: a multiboot (v1) ELF32 built here, whose entry writes "S" to the
debug console port 0xe9, loops N times over ``out dx, al`` to an unused port (or a 32-bit store to an
unused MMIO address), writes "E" to port 0xe9, then writes to QEMU's ``isa-debug-exit`` port 0xf4. QEMU 7.2
boots it with ``-kernel`` on the ``pc`` machine (``isa-debugcon`` on stdio); pyemu loads the same ELF
segment and enters it in the multiboot state (flat 32-bit protected mode).

Timing: the wall time between the "S" and the "E" marker (QEMU: when each byte arrives on its stdout pipe;
pyemu: when its port-0xe9 device sees it), so QEMU's start-up and firmware are not counted; best of
``--repeat``. Exits per second = N / that time. QEMU's whole-process time is reported separately.

Also measured: the cost of issuing one cheap vCPU ioctl (KVM_GET_MP_STATE) through libc's ``ioctl`` via
cffi (what accel/kvm uses) versus ``fcntl.ioctl`` on a bytearray, and a "floor" run loop that only calls
KVM_RUN and reads the exit reason (no dispatch), which bounds what any Python run loop can reach here.

Everything is bounded in time: each pyemu run has a stop deadline, each QEMU run a subprocess timeout,
and a SIGALRM ends the whole benchmark. Results are printed and written to
``benchmarks/results/kvm_exits.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from keystone import KS_ARCH_X86, KS_MODE_32, Ks

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.exits import Stopped
from pyemu.accel.kvm import abi
from pyemu.accel.kvm.abi import ffi, libc
from pyemu.accel.kvm.accel import KvmAccelerator
from pyemu.accel.kvm.vcpu import KvmVcpu
from pyemu.system.bus import mmio_bus, pio_bus
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_state import DescriptorTable, X86CpuState
from pyemu.target.x86.cpuid import default_cpuid

LOAD_ADDR = 0x100000
BENCH_PORT = 0x0B00  # unassigned on QEMU's pc machine
BENCH_MMIO = 0xD0000000  # PCI hole of the pc machine: no device, no RAM
DEBUG_EXIT_PORT = 0xF4
MARKER_PORT = 0xE9  # QEMU isa-debugcon
RESULTS = Path(__file__).resolve().parent / "results" / "kvm_exits.json"
QEMU = "qemu-system-x86_64"


# -- the guest ----------------------------------------------------------------------------------------------
def guest_code(kind: str, count: int) -> str:
    """Loop ``count`` times over one exit of ``kind`` ("pio" or "mmio"), then leave via isa-debug-exit."""
    body = {"pio": f"mov dx, {BENCH_PORT:#x}\nout dx, al", "mmio": "mov dword ptr [ebx], eax"}[kind]
    loop = f"mov ecx, {count}\nagain:\n{body}\ndec ecx\njnz again\n" if count else ""
    marker = f"mov dx, {MARKER_PORT:#x}\nmov al, {{}}\nout dx, al\nxor eax, eax\n"
    return (
        f"mov ebx, {BENCH_MMIO:#x}\n" + marker.format(ord("S")) + loop + marker.format(ord("E"))
        + f"mov dx, {DEBUG_EXIT_PORT:#x}\nout dx, al\ncli\nhlt"
    )


def multiboot_elf(code: bytes) -> tuple[bytes, int]:
    """A minimal multiboot v1 ELF32 (one PT_LOAD at LOAD_ADDR): returns the file and its entry address."""
    ehdr_size, phdr_size = 52, 32
    mb_offset = 0x60
    code_offset = mb_offset + 12
    magic, flags = 0x1BADB002, 0
    multiboot = struct.pack("<III", magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    image = bytearray(code_offset + len(code))
    entry = LOAD_ADDR + code_offset
    image[0:16] = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)  # ELFCLASS32, little endian, version 1
    image[16:ehdr_size] = struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 40, 0, 0
    )  # ET_EXEC, EM_386
    image[ehdr_size : ehdr_size + phdr_size] = struct.pack(
        "<IIIIIIII", 1, 0, LOAD_ADDR, LOAD_ADDR, len(image), len(image), 7, 0x1000
    )  # PT_LOAD RWX
    image[mb_offset:code_offset] = multiboot
    image[code_offset:] = code
    return bytes(image), entry


def build_guest(kind: str, count: int) -> tuple[bytes, int]:
    encoding, _ = Ks(KS_ARCH_X86, KS_MODE_32).asm(guest_code(kind, count), LOAD_ADDR + 0x60 + 12)
    return multiboot_elf(bytes(encoding))


def load_elf_segment(image: bytes) -> tuple[int, bytes]:
    """(physical address, bytes) of the ELF's single PT_LOAD, read back from the file we built."""
    _, offset, _vaddr, paddr, filesz = struct.unpack_from("<IIIII", image, 52)
    return paddr, image[offset : offset + filesz]


# -- pyemu -------------------------------------------------------------------------------------------------
class NullDevice:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class Marker:
    """The debug-console port: remembers when each marker byte arrived."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.times[chr(value & 0xFF)] = time.perf_counter()


class DebugExit:
    """isa-debug-exit for pyemu: ends the run (the vCPU returns Stopped) and records when."""

    def __init__(self) -> None:
        self.vcpu: KvmVcpu | None = None
        self.when = 0.0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.when = time.perf_counter()
        if self.vcpu is not None:
            self.vcpu.request_stop()


@dataclass
class PyemuVm:
    accel: KvmAccelerator
    memory: GuestMemory
    vcpu: KvmVcpu
    debug_exit: DebugExit
    marker: Marker

    def close(self) -> None:
        self.accel.close()
        self.memory.close()


def pyemu_vm(image: bytes, entry: int) -> PyemuVm:
    memory = GuestMemory([(0, 64 << 20)])
    pio, mmio = pio_bus(), mmio_bus()
    pio.register(BENCH_PORT, 1, NullDevice(), "bench")
    mmio.register(BENCH_MMIO, 0x1000, NullDevice(), "bench")
    debug_exit = DebugExit()
    pio.register(DEBUG_EXIT_PORT, 4, debug_exit, "isa-debug-exit")
    marker = Marker()
    pio.register(MARKER_PORT, 1, marker, "debugcon")
    accel = KvmAccelerator()
    accel.attach(memory, ExitDispatcher(pio, mmio), default_cpuid())
    vcpu = accel.create_vcpu(0)
    debug_exit.vcpu = vcpu
    paddr, segment = load_elf_segment(image)
    memory.write(paddr, segment)
    for i, descriptor in enumerate((0, 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)):
        memory.write_u64(0x1000 + 8 * i, descriptor)
    state = X86CpuState()
    state.set_flat_protected32(entry)
    state.gdt = DescriptorTable(0x1000, 31)
    state.regs["rax"] = 0x2BADB002  # multiboot magic; EBX (info) unused by this guest
    vcpu.load_state(state)
    return PyemuVm(accel, memory, vcpu, debug_exit, marker)


def time_pyemu_run(kind: str, count: int, timeout: float) -> float:
    """Seconds between the S and E markers in one fresh VM."""
    image, entry = build_guest(kind, count)
    vm = pyemu_vm(image, entry)
    try:
        timer = threading.Timer(timeout, vm.vcpu.request_stop)
        timer.start()
        result = vm.vcpu.run()
        timer.cancel()
        if result != Stopped() or not vm.debug_exit.when:
            raise RuntimeError(f"pyemu {kind} run did not reach isa-debug-exit within {timeout}s: {result}")
        return vm.marker.times["E"] - vm.marker.times["S"]
    finally:
        vm.close()


def time_floor_loop(kind: str, count: int, timeout: float) -> float:
    """KVM_RUN in the tightest Python loop that still completes exits (no dispatcher, no exit decoding
    beyond the reason): the floor for a Python run loop on this host."""
    image, entry = build_guest(kind, count)
    vm = pyemu_vm(image, entry)
    try:
        run = vm.vcpu._run  # noqa: SLF001 - deliberately bypassing the run loop
        fd, request, no_arg = vm.vcpu._fd.fd, abi.KVM_RUN, ffi.cast("unsigned long", 0)  # noqa: SLF001
        deadline = time.perf_counter() + timeout
        start = 0.0
        while time.perf_counter() < deadline:
            if libc.ioctl(fd, request, no_arg) < 0:
                continue
            if run.exit_reason == abi.KVM_EXIT_IO and run.io.port == MARKER_PORT:
                if start:
                    return time.perf_counter() - start
                start = time.perf_counter()
        raise RuntimeError("floor loop did not reach the end marker")
    finally:
        vm.close()


def ioctl_call_rates(calls: int = 200_000) -> dict[str, float]:
    """Calls/s of KVM_GET_MP_STATE through cffi's libc ioctl and through fcntl.ioctl."""
    vm = pyemu_vm(*build_guest("pio", 0))
    try:
        fd = vm.vcpu._fd.fd  # noqa: SLF001
        mp = ffi.new("struct kvm_mp_state *")
        start = time.perf_counter()
        for _ in range(calls):
            libc.ioctl(fd, abi.KVM_GET_MP_STATE, mp)
        cffi_rate = calls / (time.perf_counter() - start)
        buffer = bytearray(4)
        start = time.perf_counter()
        for _ in range(calls):
            fcntl.ioctl(fd, abi.KVM_GET_MP_STATE, buffer, True)
        fcntl_rate = calls / (time.perf_counter() - start)
        return {"cffi_libc_ioctl_per_s": cffi_rate, "fcntl_ioctl_per_s": fcntl_rate}
    finally:
        vm.close()


# -- QEMU --------------------------------------------------------------------------------------------------
def time_qemu(kind: str, count: int, timeout: float, workdir: Path) -> tuple[float, float]:
    """(seconds between the S and E markers on QEMU's debugcon, whole-process seconds)."""
    image, _ = build_guest(kind, count)
    path = workdir / f"{kind}-{count}.elf"
    path.write_bytes(image)
    command = [
        QEMU, "-accel", "kvm", "-M", "pc", "-m", "64", "-display", "none", "-nodefaults", "-no-user-config",
        "-no-reboot", "-kernel", str(path), "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4",
        "-chardev", "stdio,id=bench", "-device", f"isa-debugcon,iobase={MARKER_PORT:#x},chardev=bench",
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    killer = threading.Timer(timeout, process.kill)
    killer.start()
    times: dict[str, float] = {}
    try:
        while True:
            byte = os.read(process.stdout.fileno(), 1)
            if not byte:
                break
            times[byte.decode("latin-1")] = time.perf_counter()
        returncode = process.wait()
    finally:
        killer.cancel()
        process.stdout.close()
        stderr = process.stderr.read().decode(errors="replace")
        process.stderr.close()
    total = time.perf_counter() - start
    if returncode != 1 or "S" not in times or "E" not in times:  # isa-debug-exit value 0 -> exit code 1
        raise RuntimeError(f"QEMU run failed (exit code {returncode}, markers {sorted(times)}): {stderr[-300:]}")
    return times["E"] - times["S"], total


# -- driver ------------------------------------------------------------------------------------------------
def best(samples: list[float]) -> float:
    return min(samples)


def measure(kind: str, count: int, repeat: int, timeout: float, workdir: Path | None) -> dict:
    pyemu = best([time_pyemu_run(kind, count, timeout) for _ in range(repeat)])
    floor = best([time_floor_loop(kind, count, timeout) for _ in range(repeat)])
    entry = {
        "exits": count,
        "pyemu_seconds": pyemu,
        "pyemu_exits_per_s": count / pyemu,
        "python_floor_exits_per_s": count / floor,
    }
    if workdir is not None:
        runs = [time_qemu(kind, count, timeout, workdir) for _ in range(repeat)]
        qemu = best([loop for loop, _ in runs])
        entry.update(
            qemu_seconds=qemu,
            qemu_exits_per_s=count / qemu,
            qemu_process_seconds=best([total for _, total in runs]),
        )
        entry["pyemu_vs_qemu"] = entry["pyemu_exits_per_s"] / entry["qemu_exits_per_s"]
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exits", type=int, default=100_000, help="exits per measured run (default 100000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration, best taken (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound per run in seconds (default 60)")
    parser.add_argument("--no-qemu", action="store_true", help="measure pyemu only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    total_bound = int(args.timeout * args.repeat * 10 + 60)
    signal.signal(signal.SIGALRM, lambda *_: (print("benchmark exceeded its time bound", file=sys.stderr),
                                              os._exit(3)))
    signal.alarm(total_bound)

    use_qemu = not args.no_qemu and shutil.which(QEMU) is not None
    results: dict = {
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "kvm_pvm": os.path.exists("/sys/module/kvm_pvm")},
        "method": "wall time between guest markers around N exits (best of repeat); same multiboot ELF guest",
        "ioctl": ioctl_call_rates(),
    }
    with tempfile.TemporaryDirectory(prefix="pyemu-kvm-bench-") as tmp:
        for kind in ("pio", "mmio"):
            results[kind] = measure(kind, args.exits, args.repeat, args.timeout, Path(tmp) if use_qemu else None)
    if not use_qemu:
        results["qemu"] = "not measured (--no-qemu or qemu-system-x86_64 missing)"

    rates = results["ioctl"]
    print(f"ioctl KVM_GET_MP_STATE: cffi libc {rates['cffi_libc_ioctl_per_s']:,.0f}/s, "
          f"fcntl.ioctl {rates['fcntl_ioctl_per_s']:,.0f}/s")
    for kind in ("pio", "mmio"):
        entry = results[kind]
        line = (f"{kind.upper():4} exits: pyemu {entry['pyemu_exits_per_s']:>10,.0f}/s "
                f"({1e6 / entry['pyemu_exits_per_s']:.2f} us/exit), python floor "
                f"{entry['python_floor_exits_per_s']:>10,.0f}/s")
        if "qemu_exits_per_s" in entry:
            line += (f", QEMU {entry['qemu_exits_per_s']:>10,.0f}/s ({1e6 / entry['qemu_exits_per_s']:.2f} us/exit)"
                     f", pyemu/QEMU {entry['pyemu_vs_qemu']:.2f}")
        print(line)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {args.output}")
    signal.alarm(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
