"""Helpers for the KVM tests: a tiny machine (RAM, PIO/MMIO buses, vCPUs), guest assembly, bounded runs.

Every run is bounded: ``run_bounded`` asks the vCPU to stop after a deadline, so a guest that never exits
makes the test fail instead of hanging (``conftest.py`` adds a process-wide faulthandler watchdog on top).
Kept in its own uniquely named module rather than in conftest so test files can import it by name.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import pytest

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.accel.exits import Exit
from pyemu.system.bus import Bus
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_state import DescriptorTable, Segment, X86CpuState

GDT_ADDR = 0x1000
IDT_ADDR = 0x2000
PML4_ADDR = 0x3000  # PML4, PDPT and four page directories: 0x3000-0x8fff
CODE_ADDR = 0x10000
STACK_TOP = 0x80000
RAM_SIZE = 2 << 20

GDT = [
    0,
    0,
    0x00CF9B000000FFFF,  # 0x10: flat 32-bit code
    0x00CF93000000FFFF,  # 0x18: flat data
    0x00AF9B000000FFFF,  # 0x20: 64-bit code
]


def kvm_unusable_reason() -> str | None:
    """Why KVM tests cannot run here, or None."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm unusable: {exc.strerror}"
    os.close(fd)
    return None


def host_kvm_is_pvm() -> bool:
    """The host's KVM is the PVM flavour (kvm_pvm module): ring-0 code emulated, known gaps (DESIGN.md)."""
    return os.path.exists("/sys/module/kvm_pvm")


requires_kvm = pytest.mark.skipif(kvm_unusable_reason() is not None, reason=str(kvm_unusable_reason()))


class Recorder:
    """A bus device that records accesses and answers reads from a dict (default ``fill``)."""

    def __init__(self, answers: dict[int, int] | None = None, fill: int = 0) -> None:
        self.accesses: list[tuple[str, int, int, int]] = []
        self.answers = answers or {}
        self.fill = fill

    def read(self, offset: int, size: int) -> int:
        value = self.answers.get(offset, self.fill)
        self.accesses.append(("r", offset, size, value))
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", offset, size, value))

    @property
    def writes(self) -> list[tuple[int, int, int]]:
        return [(o, s, v) for kind, o, s, v in self.accesses if kind == "w"]


def assemble(code: str, addr: int, bits: int = 32) -> bytes:
    from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks

    mode = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}[bits]
    encoding, _ = Ks(KS_ARCH_X86, mode).asm(code, addr)
    return bytes(encoding)


def run_bounded(vcpu, timeout: float = 3.0) -> tuple[Exit, float]:
    """Run ``vcpu`` on this thread; a timer thread requests a stop after ``timeout``. Returns the exit and
    the elapsed time."""
    import time

    timer = threading.Timer(timeout, vcpu.request_stop)
    timer.daemon = True
    timer.start()
    start = time.monotonic()
    try:
        result = vcpu.run()
    finally:
        timer.cancel()
    return result, time.monotonic() - start


@dataclass
class KvmMachine:
    memory: GuestMemory
    pio: Bus
    mmio: Bus
    dispatcher: ExitDispatcher
    accel: object
    vcpus: list = field(default_factory=list)

    @property
    def vcpu(self):
        return self.vcpus[0]

    def write_gdt(self) -> None:
        for i, descriptor in enumerate(GDT):
            self.memory.write_u64(GDT_ADDR + 8 * i, descriptor)

    def state32(self, entry: int = CODE_ADDR) -> X86CpuState:
        """Flat 32-bit protected mode, paging off, GDT loaded, stack at STACK_TOP."""
        self.write_gdt()
        state = X86CpuState()
        state.set_flat_protected32(entry)
        state.gdt = DescriptorTable(GDT_ADDR, len(GDT) * 8 - 1)
        state.idt = DescriptorTable(IDT_ADDR, 0)
        state.regs["rsp"] = STACK_TOP
        return state

    def state64(self, entry: int = CODE_ADDR) -> X86CpuState:
        """64-bit long mode, the first 4 GiB identity-mapped with 2 MiB pages (MMIO windows included)."""
        self.write_gdt()
        pdpt = PML4_ADDR + 0x1000
        self.memory.write_u64(PML4_ADDR, pdpt | 3)
        for gib in range(4):
            pd = PML4_ADDR + 0x2000 + 0x1000 * gib
            self.memory.write_u64(pdpt + 8 * gib, pd | 3)
            for i in range(512):
                self.memory.write_u64(pd + 8 * i, (gib << 30) | (i << 21) | 0x83)
        state = X86CpuState()
        state.set_flat_long64(entry, PML4_ADDR)
        state.cs = Segment.flat_code64(0x20)
        state.gdt = DescriptorTable(GDT_ADDR, len(GDT) * 8 - 1)
        state.idt = DescriptorTable(IDT_ADDR, 0)
        state.regs["rsp"] = STACK_TOP
        return state

    def load(self, code: str, *, bits: int = 32, addr: int = CODE_ADDR, idt_vectors: int = 0) -> X86CpuState:
        """Assemble ``code`` at ``addr`` and load the matching entry state into vCPU 0 (with an IDT of
        ``idt_vectors`` gates at IDT_ADDR; 0 = empty IDT, so any exception triple-faults)."""
        self.memory.write(addr, assemble(code, addr, bits))
        state = self.state64(addr) if bits == 64 else self.state32(addr)
        if idt_vectors:
            state.idt = DescriptorTable(IDT_ADDR, idt_vectors * (16 if bits == 64 else 8) - 1)
        self.vcpu.load_state(state)
        return state

    def set_idt64(self, vector: int, handler: int) -> None:
        """A 64-bit interrupt gate for ``vector`` in the IDT at IDT_ADDR (code selector 0x20)."""
        low = (handler & 0xFFFF) | (0x20 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48)
        self.memory.write_u64(IDT_ADDR + 16 * vector, low)
        self.memory.write_u64(IDT_ADDR + 16 * vector + 8, handler >> 32)

    def set_idt32(self, vector: int, handler: int) -> None:
        """A 32-bit interrupt gate for ``vector`` (and the IDT limit to cover it) in the IDT at IDT_ADDR."""
        low = (handler & 0xFFFF) | (0x10 << 16)
        high = (handler & 0xFFFF0000) | 0x8E00
        self.memory.write_u64(IDT_ADDR + 8 * vector, low | (high << 32))


