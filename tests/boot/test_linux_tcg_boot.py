"""Debian's stock 6.1 kernel boots to an interactive busybox shell under the software CPU.

The shell is driven over COM1 exactly as a user would: type a command, read its output, power off.
"""

from __future__ import annotations

import re
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240  # seconds; a boot takes well under a minute on our machines


@pytest.mark.parametrize("image", ["bzimage", "pvh"])
def test_boot_to_shell_echo_and_poweroff(console, guest_assets, image):
    kernel = guest_assets.kernel if image == "bzimage" else guest_assets.vmlinux
    vm = console(["-machine", "microvm", "-accel", "tcg", "-m", "512M", "-kernel", str(kernel),
                  "-initrd", str(guest_assets.initrd), "-append", "console=ttyS0", "-nographic"])
    banner = vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    assert b"Linux version 6.1" in banner
    # The guest accepts our ACPI tables and finds the devices they describe.
    assert b"ACPI: RSDP 0x00000000000E0000" in banner
    assert b"ACPI: Interpreter enabled" in banner
    assert b"ACPI Error" not in banner and b"ACPI BIOS Error" not in banner
    assert b"ttyS0 at I/O 0x3f8" in banner and b"is a 16550A" in banner
    assert b"rtc_cmos 00:01: setting system clock to" in banner
    # CPUID states the host TSC rate, which the guest's RDTSC runs at under Unicorn.
    from pyemu.accel.tcg.tsc import host_tsc_hz

    detected = re.search(rb"tsc: Detected (\d+)\.000 MHz processor", banner)
    assert detected is not None
    assert abs(int(detected.group(1)) * 1_000_000 - host_tsc_hz()) / host_tsc_hz() < 0.002
    vm.expect(b"# ", 60)  # the busybox shell prompt
    # IA32_ARCH_CAPABILITIES (pyemu's libunicorn) tells Linux the software CPU has no Meltdown: no page-table
    # isolation, whose CR3 switch at every kernel entry flushes the software TLB.
    from pyemu.accel.tcg.block_gate import _uc_library

    vm.send('echo "m""eltdown=$(cat /sys/devices/system/cpu/vulnerabilities/meltdown)"\n')
    out = vm.expect(b"meltdown=", 60)
    vm.expect(b"\n", 10, after=out.rindex(b"meltdown="))
    patched = hasattr(_uc_library(), "uc_pyemu_set_arch_capabilities")
    assert (b"meltdown=Not affected" in vm.output) == patched, vm.output[-300:]
    assert (b"page tables isolation: enabled" in banner) != patched
    # IA32_MISC_ENABLE starts with fast strings off (accel/tcg/msrs.py: the unrolled copies run faster here).
    assert b"Disabled fast string operations" in banner
    # The quotes make the typed line differ from the output, so the terminal echo cannot fake it.
    vm.send('echo h""i-from-$((6*7))\n')
    vm.expect(b"hi-from-42", 60)
    # Time of day comes from the emulated CMOS RTC (rtc_cmos sets the system clock at boot).
    today = {time.strftime("%Y-%m-%d", time.gmtime(time.time() + delta)).encode() for delta in (-60, 60)}
    vm.send('echo "d""ate=$(date -u +%Y-%m-%d)"\n')
    out = vm.expect(b"date=2", 60)
    vm.expect(b"\n", 10, after=out.rindex(b"date=2"))
    assert any(b"date=" + day in vm.output for day in today), vm.output[-300:]
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0


def test_default_guest_without_kernel_option(console, guest_assets):
    """``pyemu`` with no -kernel boots the fetched Debian guest; -append adds to its command line."""
    vm = console(["-nographic", "-append", "pyemu.poweroff=1"])
    out = vm.expect(b"pyemu.poweroff=1, powering off", BOOT_TIMEOUT)
    assert b"Command line: console=ttyS0 pyemu.poweroff=1" in out
    assert vm.wait(60) == 0


def test_guest_reboot_with_no_reboot_exits_0(console, guest_assets):
    vm = console(["-kernel", str(guest_assets.vmlinux), "-initrd", str(guest_assets.initrd),
                  "-append", "console=ttyS0", "-nographic", "-no-reboot"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)
    vm.send("reboot -f\n")
    out = vm.expect(b"reboot: Restarting system", 60)
    assert vm.wait(60) == 0
    assert out.count(b"Linux version") == 1


def test_guest_reboot_resets_the_vm_and_it_boots_again(console, guest_assets):
    vm = console(["-kernel", str(guest_assets.vmlinux), "-initrd", str(guest_assets.initrd),
                  "-append", "console=ttyS0", "-nographic"])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)
    vm.send("reboot -f\n")
    restarted_at = vm.expect(b"reboot: Restarting system", 60).index(b"reboot: Restarting system")
    out = vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT, after=restarted_at)
    assert out.count(b"Linux version") == 2  # the same kernel booted a second time after the reset
    vm.expect(b"# ", 60, after=restarted_at)
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0
