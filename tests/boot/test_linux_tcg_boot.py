"""Debian's stock 6.1 kernel boots to an interactive busybox shell under the software CPU.

The shell is driven over COM1 exactly as a user would: type a command, read its output, power off.
"""

from __future__ import annotations

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
    assert b"ACPI: RSDP 0x00000000000E0000" in banner  # our tables, found by the kernel
    vm.expect(b"# ", 60)  # the busybox shell prompt
    # The quotes make the typed line differ from the output, so the terminal echo cannot fake it.
    vm.send('echo h""i-from-$((6*7))\n')
    vm.expect(b"hi-from-42", 60)
    vm.send("poweroff -f\n")
    assert vm.wait(60) == 0
