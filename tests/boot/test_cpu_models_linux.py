"""Debian's 6.1 kernel boots under the software CPU with ``-cpu max`` and ``-cpu qemu64`` and sees them.

``-cpu max`` offers far more than pyemu's default table (SMEP, SMAP, PKU, XSAVE, RDTSCP, FSGSBASE...):
Linux enables what it finds (CR4 bits, XSAVE state, alternatives patched to the new instructions) and
must still reach its shell; ``-cpu kvm64`` is QEMU's small Intel model (family 15, no SSE4, no RDTSCP).

``-cpu qemu64`` (AuthenticAMD) is not booted here: Linux takes the TSC rate from CPUID leaf 0x15 only on
Intel, and its PIT calibration fails under pyemu's TCG (each port-0x61 read is a round trip into Python,
so the loop falls below the 1000 reads per 10 ms it requires): "tsc: Unable to calibrate against PIT",
then the boot stalls. Measured once; see the README's CPU models section.
"""

from __future__ import annotations

import pytest

from boot_helpers import shell

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240


@pytest.mark.parametrize("model,present,absent", [
    ("max", ("smep", "smap", "pku", "ospke", "xsave", "xsaveopt", "rdtscp", "fsgsbase", "rdrand", "movbe",
             "aes", "bmi2", "adx", "clwb", "pdpe1gb"), ("x2apic", "avx", "vme")),
    ("kvm64", ("pni", "cx16", "nx", "lm"), ("sse4_2", "rdtscp", "xsave", "smep", "lahf_lm")),
])
def test_linux_boots_and_sees_the_model(console, guest_assets, model, present, absent):
    vm = console(["-machine", "microvm", "-accel", "tcg", "-cpu", model, "-m", "512M",
                  "-kernel", str(guest_assets.kernel), "-initrd", str(guest_assets.initrd),
                  "-append", "console=ttyS0", "-nographic"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)
    status, flags = shell(vm, "grep -m1 '^flags' /proc/cpuinfo")
    assert status == 0, flags
    words = set(flags.split())
    assert set(present) <= words, (sorted(set(present) - words), flags)
    assert not set(absent) & words, flags
    status, vendor = shell(vm, "grep -m1 vendor_id /proc/cpuinfo")
    assert "GenuineIntel" in vendor
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0
