"""``-boot`` and ``-overcommit``: options about how the host runs the VM, which libvirt always writes.

``-boot``: pyemu has no firmware and always loads its kernel directly, which is what QEMU does too when
``-kernel`` is given (the firmware's boot order is not consulted). So ``order=``/``once=`` are validated
with QEMU's rules (drive letters ``a``-``p``, no letter twice) and have the meaning they have in QEMU with
``-kernel``: none. ``strict=`` and ``reboot-timeout=`` only concern a firmware that finds nothing to boot,
which cannot happen here, and are validated and accepted; ``menu=on`` and a splash screen would need a
firmware pyemu does not have and fail with one line.

``-overcommit mem-lock=on`` locks all of pyemu's memory (guest RAM included) with ``mlockall`` before the
guest starts, or fails as QEMU does ("locking memory failed"); ``cpu-pm=on`` (let the guest idle its
vCPU in the host CPU: KVM's disable-exits) has no meaning for the software CPU, where QEMU too accepts
and ignores it, and is refused under KVM, where pyemu does not implement it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from pyemu.errors import ConfigError

MCL_CURRENT = 1
MCL_FUTURE = 2


@dataclass(frozen=True)
class BootOptions:
    order: str = ""
    once: str = ""
    menu: bool = False
    strict: bool = False
    reboot_timeout: int = -1
    splash: str | None = None

    def __post_init__(self) -> None:
        for devices in (self.order, self.once):
            seen: set[str] = set()
            for letter in devices:
                if not "a" <= letter <= "p":
                    raise ConfigError(f"-boot: Invalid boot device '{letter}'", option="-boot")
                if letter in seen:
                    raise ConfigError(f"-boot: Boot device '{letter}' was given twice", option="-boot")
                seen.add(letter)
        if self.menu or self.splash is not None:
            raise ConfigError("-boot: menu=on and splash= need firmware: pyemu boots its kernel directly "
                              "and shows no boot menu", option="-boot")
        if not -1 <= self.reboot_timeout <= 0xFFFF:
            raise ConfigError("-boot: reboot timeout is larger than 65535", option="-boot")


@dataclass(frozen=True)
class OvercommitOptions:
    mem_lock: bool = False
    cpu_pm: bool = False

    def check_accelerator(self, accel_name: str) -> None:
        if self.cpu_pm and accel_name == "kvm":
            raise ConfigError("-overcommit cpu-pm=on is not supported by pyemu with -accel kvm (guest "
                              "HLT/MWAIT/PAUSE exits cannot be disabled yet)", option="-overcommit")

    def lock_memory(self) -> None:
        """``mem-lock=on``: lock every present and future page of the process (guest RAM included)."""
        if not self.mem_lock:
            return
        libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            error = ctypes.get_errno()
            raise ConfigError(f"locking memory failed (mlockall: {os.strerror(error)})", option="-overcommit")
