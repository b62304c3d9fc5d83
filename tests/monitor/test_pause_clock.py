"""QMP ``stop``/``cont`` through ``qemu.qmp`` stop a booted Linux guest's time: ``/proc/uptime`` read before
the stop and after the ``cont`` advanced by about the time the VM ran, not by the time it was paused.

Why it holds: the guest's clock is its TSC and its timer interrupts (LAPIC timer); the virtual clock the
LAPIC counts on and the guest TSC both stand still while the VM is stopped. The assertion compares the
uptime delta with host time measured around the same reads minus the pause, so a busy host makes it
looser, never false.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

import pyemu

PAUSE_S = 3.0
BOOT_TIMEOUT = 600.0
COMMAND_TIMEOUT = 120.0
_UPTIME = re.compile(r"UPTIME=(\d+\.\d+)")


@pytest.fixture
def short_dir():
    path = tempfile.mkdtemp(prefix="pyemu-clock-", dir="/tmp")  # sun_path is short
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def guest_uptime(vm: pyemu.VM) -> float:
    # printf through the shell so the echo of the typed line cannot match the pattern
    vm.console.send("printf 'UPTIME=%s\\n' $(cut -d' ' -f1 /proc/uptime)\n")
    return float(vm.console.expect(_UPTIME, timeout=COMMAND_TIMEOUT).group(1))


async def pause_over_qmp(path: str, seconds: float) -> tuple[str, str]:
    client = QMPClient("pause-clock-test")
    await client.connect(path)
    try:
        await client.execute("stop")
        paused = (await client.execute("query-status"))["status"]
        await asyncio.sleep(seconds)
        await client.execute("cont")
        running = (await client.execute("query-status"))["status"]
    finally:
        await client.disconnect()
    return str(paused), str(running)


@pytest.mark.slow
@pytest.mark.assets
def test_paused_linux_guest_uptime_does_not_advance(guest_assets: object, short_dir: Path) -> None:
    qmp = str(short_dir / "qmp.sock")
    with pyemu.VM("-m", "256M", "-accel", "tcg", "-qmp", f"unix:{qmp},server=on,wait=off") as vm:
        vm.start()
        vm.console.expect("shell on the console", timeout=BOOT_TIMEOUT)
        before = guest_uptime(vm)
        started = time.monotonic()
        states = asyncio.run(pause_over_qmp(qmp, PAUSE_S))
        after = guest_uptime(vm)
        wall = time.monotonic() - started
        vm.quit()
    assert states == ("paused", "running")
    advanced = after - before
    ran = wall - PAUSE_S  # host time the VM was not paused, at most
    assert advanced < ran + 0.5, (
        f"guest uptime advanced {advanced:.2f} s across a {PAUSE_S} s pause ({wall:.2f} s wall in all)")
