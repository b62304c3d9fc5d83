"""Register shortcuts for tests that drive a :class:`pyemu.hw.intc.lapic.LocalApic` as a guest would."""

from __future__ import annotations

from pyemu.hw.intc.lapic import REG_SVR, LocalApic


class ApicRegisters:
    """Mixin: 32-bit register reads/writes on ``self.apic`` and a kick counter for its ``kick``."""

    apic: LocalApic
    kicks: int = 0

    def _kick(self) -> None:
        self.kicks += 1

    def rd(self, offset: int) -> int:
        return self.apic.read(offset, 4)

    def wr(self, offset: int, value: int) -> None:
        self.apic.write(offset, 4, value)

    def enable(self) -> None:
        """Software-enable the APIC (SVR bit 8, spurious vector 0xff), as an OS does first."""
        self.wr(REG_SVR, 0x1FF)
