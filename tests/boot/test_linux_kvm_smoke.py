"""Debian's kernel under KVM on this host: a bounded smoke test of early boot.

The host KVM here emulates ring-0 guest code slowly (DESIGN.md: even QEMU only reaches early boot), so
the test stops after the kernel has printed its banner, the e820 map pyemu built and the ACPI tables it
found; it does not wait for a shell. ``earlyprintk`` makes the kernel print from its first lines on, instead
of replaying its log when the console driver registers, far later on this host.
"""

from __future__ import annotations

import re

import pytest


pytestmark = [pytest.mark.kvm, pytest.mark.assets]


def test_pvh_vmlinux_prints_banner_e820_and_finds_our_acpi_tables(console, guest_assets, kvm_usable):
    vm = console(["-machine", "microvm", "-accel", "kvm", "-m", "512M", "-kernel", str(guest_assets.vmlinux),
                  "-initrd", str(guest_assets.initrd), "-append", "console=ttyS0 earlyprintk=ttyS0", "-nographic"])
    out = vm.expect(b"address 0xfec00000, GSI 0-23", 150).decode(errors="replace")
    assert "Linux version 6.1" in out
    # The e820 map of machines/memmap.py: low RAM, the EBDA/BIOS holes, RAM from 1 MiB to the end of -m.
    assert "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable" in out
    assert "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable" in out
    assert re.search(r"ACPI: RSDP 0x00000000000E0000 000024 \(v02 PYEMU", out)
    assert re.search(r"ACPI: APIC 0x[0-9A-F]+ 000050 \(v05 PYEMU", out)
    assert "IOAPIC[0]: apic_id 0, version 32, address 0xfec00000, GSI 0-23" in out
