"""What a board needs from an accelerator, and what a vCPU offers.

Both accelerators implement these two protocols, so a board (:mod:`pyemu.machines`) and the guest-program
test kit (:mod:`pyemu.testing`) are written once. The software CPU needs pyemu's userspace local APIC as its
interrupt controller; KVM keeps the LAPIC in the kernel and takes MSIs (``needs_userspace_lapic``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pyemu.accel.dispatch import ExitDispatcher
from pyemu.errors import PyemuError
from pyemu.accel.exits import Exit
from pyemu.hw.intc.api import InterruptController, MsiSink
from pyemu.system.memory import GuestMemory
from pyemu.target.x86.cpu_state import X86CpuState
from pyemu.target.x86.cpuid import CpuidTable


class Vcpu(Protocol):
    index: int

    def load_state(self, state: X86CpuState) -> None:
        """Replace the vCPU's architectural state (boot entry state, snapshot restore, reset)."""
        ...

    def save_state(self) -> X86CpuState:
        ...

    def run(self) -> Exit:
        """Run guest code on the calling thread until something the board must act on:
        ``Halt`` (HLT that no interrupt can end: IF=0, or no interrupt source), ``Shutdown`` (triple fault
        or an unrecoverable CPU state; ``reason`` says which), ``Stopped`` (after :meth:`request_stop`).
        Port and MMIO accesses are handled inside, through the dispatcher. A HLT with IF=1 and an
        interrupt source waits inside ``run`` until an interrupt arrives or a stop is requested. After
        ``Halt`` the vCPU stays halted: running it again does not go past the HLT until an NMI, INIT or SIPI
        ends it, as on hardware (the software CPU waits inside ``run`` until then or a stop request; KVM
        waits in the kernel and returns ``Halt`` again at each halt probe)."""
        ...

    def kick(self) -> None:
        """Thread-safe: an external interrupt may have become pending; notice it promptly, and wake a HLT."""
        ...

    def request_stop(self) -> None:
        """Thread-safe: make :meth:`run` return ``Stopped`` at the next instruction boundary."""
        ...

    def inject_nmi(self) -> None:
        """Thread-safe: a non-maskable interrupt for this vCPU (QMP ``inject-nmi``), taken before its next
        instruction (or when it runs again, if paused)."""
        ...

    def close(self) -> None:
        ...


class GuestTscControl(Protocol):
    """The guest TSC follows the machine's virtual clock: it reads ~0 after creation and after a reset and
    stands still while the VM is stopped. The board calls these while every vCPU is parked."""

    def value(self) -> int:
        """The guest TSC now (vCPU 0's)."""
        ...

    def stop(self) -> None:
        """Freeze the guest TSC of every vCPU (the VM stops)."""
        ...

    def start(self) -> None:
        """Let the guest TSC count on from where :meth:`stop` froze it (the VM runs again)."""
        ...

    def reset(self) -> None:
        """The guest TSC reads 0 now (machine reset); frozen at 0 if stopped."""
        ...


class Accelerator(Protocol):
    name: str
    needs_userspace_lapic: bool

    @property
    def tsc(self) -> GuestTscControl:
        """The guest TSC of every vCPU (read-only in the protocol, so each accelerator keeps its own type)."""
        ...

    def cpu_features(self) -> frozenset[str]:
        """The CPUID features (pyemu's keys) this accelerator can present to a guest on this host: what
        ``-cpu`` checks a model against (QEMU's "... doesn't support requested feature" warning)."""
        ...

    def attach(self, memory: GuestMemory, dispatcher: ExitDispatcher, cpuid: CpuidTable) -> None:
        """Bind guest RAM and the I/O dispatcher (create the VM, register memory slots)."""
        ...

    def create_vcpu(self, index: int, interrupts: InterruptController | None = None) -> Vcpu:
        ...

    def msi_sink(self) -> MsiSink | None:
        """Where MSIs go when the LAPIC lives in the accelerator (KVM); None for the software CPU."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class DirtyLogging(Protocol):
    """An accelerator that can tell which guest pages were written (live migration's dirty tracking),
    so migration code never imports accelerator internals. Pages are guest-physical addresses of 4 KiB
    pages; RAM written by devices through :class:`~pyemu.hw.core.dma.DmaMemory` (``wrote``) counts too."""

    def start_dirty_log(self) -> None:
        """Begin recording written pages (from now on; earlier writes are not reported)."""
        ...

    def fetch_dirty_pages(self) -> set[int]:
        """The pages written since the start or the previous fetch; recording goes on."""
        ...

    def stop_dirty_log(self) -> None:
        ...


class AcceleratorUnavailable(PyemuError):
    """Raised by an accelerator's constructor when the host cannot provide it (no /dev/kvm, ...)."""


def create_accelerator(name: str) -> Accelerator:
    """Instantiate the accelerator called ``name`` ("tcg" or "kvm")."""
    if name == "tcg":
        from pyemu.accel.tcg.accel import TcgAccelerator

        return TcgAccelerator()
    if name == "kvm":
        from pyemu.accel.kvm.accel import KvmAccelerator

        return KvmAccelerator()
    from pyemu.errors import ConfigError

    raise ConfigError(f"-accel: invalid accelerator {name}", option="-accel")
