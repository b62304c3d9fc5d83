"""A Linux guest that panics says so through pvpanic: QMP GUEST_PANICKED and the guest-panicked run state,
instead of a VM that merely stops answering. Driven in-process through the Python API."""

from __future__ import annotations

import pytest

import pyemu
from pyemu.system.runstate import RunState

pytestmark = [pytest.mark.slow, pytest.mark.assets]
BOOT_TIMEOUT = 600.0


def test_kernel_panic_reaches_the_host_as_guest_panicked(guest_assets: object) -> None:
    with pyemu.VM("-m", "256M", "-device", "pvpanic", "-no-shutdown") as vm:
        vm.start()
        vm.console.expect("shell on the console", timeout=BOOT_TIMEOUT)
        vm.console.send("echo c > /proc/sysrq-trigger\n")
        panicked = vm.events.wait_for("GUEST_PANICKED", timeout=BOOT_TIMEOUT)
        assert panicked.data == {"action": "pause"}  # -no-shutdown: kept for inspection
        assert vm.state is RunState.GUEST_PANICKED
        vm.console.expect("Kernel panic", timeout=60)
        registers = vm.execute("human-monitor-command", {"command-line": "info registers"})
        assert "RIP=" in registers
        vm.quit()
        assert vm.wait(timeout=60) == 0
