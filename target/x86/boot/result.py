"""What a loader hands back to the board: the entry state of vCPU 0 and where everything was put."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyemu.target.x86.boot.layout import Placement
from pyemu.target.x86.cpu_state import X86CpuState


@dataclass
class BootResult:
    """The outcome of loading one kernel.

    ``cpu`` is ready for ``Vcpu.set_state``; the other fields say what was placed where, for the
    ``-d boot`` log, for tests and for boards that need to know (e.g. to keep the initrd out of a
    later memory hot-plug range).
    """

    protocol: str  # "bzimage", "pvh" or "multiboot"
    cpu: X86CpuState
    entry: int
    boot_info_addr: int  # zero page, hvm_start_info or multiboot info
    cmdline_addr: int
    kernel: Placement
    initrd: Placement | None = None
    placements: tuple[Placement, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One line per placement, for the ``boot`` log category."""
        lines = [f"{self.protocol}: entry {self.entry:#x}, boot info at {self.boot_info_addr:#x}"]
        lines += [f"  {placement}" for placement in self.placements]
        return "\n".join(lines)
