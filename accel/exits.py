"""The small set of exit values every accelerator produces.

A vCPU runs until the guest touches something it cannot handle itself and reports it as one of these; one
dispatcher (:mod:`pyemu.accel.dispatch`) routes port and MMIO accesses to the buses. KVM produces them from
``kvm_run`` exits, the software CPU from Unicorn hooks, so device models see identical traffic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IoIn:
    port: int
    size: int


@dataclass(frozen=True, slots=True)
class IoOut:
    port: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class MmioRead:
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    size: int
    value: int


@dataclass(frozen=True, slots=True)
class Halt:
    """The vCPU executed HLT with no interrupt to wake it (IF=0, or nothing pending and no wake source)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The vCPU cannot continue: triple fault, a stop request, or a guest-requested shutdown."""

    reason: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """The vCPU returned because the host asked it to (pause, shutdown elsewhere, reset)."""


Exit = IoIn | IoOut | MmioRead | MmioWrite | Halt | Shutdown | Stopped
