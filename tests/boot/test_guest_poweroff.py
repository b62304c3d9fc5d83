"""The default guest shuts down the way a user expects: ``poweroff``/``reboot``/``halt`` typed at its shell
and the ACPI power button (QMP ``system_powerdown``, driven by QEMU's own client library) all go through
busybox init's clean shutdown, and pyemu reports and ends the VM as QEMU does.

Each test boots the Debian guest once under the software CPU (about 10 s here); timeouts are generous
because the host is shared, and nothing asserts on timing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Iterator

import pytest

from pyemu.guest.initscripts import POWER_BUTTON_MARKER, SHUTDOWN_MARKER

pytestmark = [pytest.mark.slow, pytest.mark.assets]

qmp_legacy = pytest.importorskip("qemu.qmp.legacy")

BOOT_TIMEOUT = 240
QMP_TIMEOUT = 60
SHUTDOWN_TIMEOUT = 90.0  # a float: qemu.qmp's pull_event(wait=) treats an int as "wait forever"
BUSYBOX_INIT_DOWN = b"The system is going down NOW!"


@pytest.fixture
def power_button_guest(guest_assets):
    """The guest assets, if their initramfs carries the ACPI power-button modules (a cache fetched
    before they were added has the new scripts but not the modules until 'pyemu-guest fetch')."""
    if not {"evdev", "button"} <= set(guest_assets.module_order):
        pytest.skip("the cached guest lacks the button/evdev modules: run 'pyemu-guest fetch'")
    return guest_assets


@pytest.fixture
def qmp_path() -> Iterator[str]:
    """A short socket path (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    directory = tempfile.mkdtemp(prefix="pyemu-pwr-", dir="/tmp")
    yield os.path.join(directory, "qmp.sock")
    shutil.rmtree(directory, ignore_errors=True)


def boot_to_shell(console, guest_assets, *extra: str):
    """The default guest (no -kernel: what ``pyemu`` alone boots) at its shell prompt."""
    vm = console(["-accel", "tcg", "-m", "256M", "-nographic", *extra])
    vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    vm.expect(b"# ", 60)
    return vm


@contextlib.contextmanager
def qmp_client(path: str) -> Iterator[Any]:
    client = qmp_legacy.QEMUMonitorProtocol(path)
    client.connect()
    client.settimeout(QMP_TIMEOUT)
    try:
        yield client
    finally:
        with contextlib.suppress(EOFError, OSError):  # the server hangs up when pyemu exits
            client.close()


def events_until(client: Any, name: str) -> list[dict[str, Any]]:
    """Every event up to and including the first ``name`` (each wait bounded)."""
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["event"] != name:
        event = client.pull_event(wait=SHUTDOWN_TIMEOUT)
        assert event is not None, f"no {name} event; saw {seen}"
        seen.append(event)
    return seen


def test_poweroff_typed_at_the_shell_powers_the_vm_off(console, guest_assets):
    vm = boot_to_shell(console, guest_assets)
    mark = len(vm.output)
    vm.send("poweroff\n")  # no -f: busybox signals PID 1, init shuts down cleanly
    assert vm.wait(SHUTDOWN_TIMEOUT) == 0
    vm.expect(b"reboot: Power down", 10, after=mark)
    tail = vm.output[mark:]
    for line in (SHUTDOWN_MARKER.encode(), BUSYBOX_INIT_DOWN, b"Requesting system poweroff",
                 b"ACPI: PM: Preparing to enter system sleep state S5"):
        assert line in tail, tail.decode(errors="replace")
    assert tail.index(SHUTDOWN_MARKER.encode()) < tail.index(b"Requesting system poweroff")


def test_reboot_typed_at_the_shell_with_no_reboot_exits_0(console, guest_assets):
    vm = boot_to_shell(console, guest_assets, "-no-reboot")
    mark = len(vm.output)
    vm.send("reboot\n")
    assert vm.wait(SHUTDOWN_TIMEOUT) == 0
    vm.expect(b"reboot: Restarting system", 10, after=mark)
    tail = vm.output[mark:]
    assert SHUTDOWN_MARKER.encode() in tail and b"Requesting system reboot" in tail, tail.decode(errors="replace")


def test_system_powerdown_shuts_the_guest_down(console, power_button_guest, qmp_path):
    """QMP system_powerdown presses the GED power button: POWERDOWN, the guest's acpid runs a clean
    poweroff, and pyemu reports SHUTDOWN (guest: true, reason: guest-shutdown, as QEMU for an ACPI S5)
    and exits 0."""
    vm = boot_to_shell(console, power_button_guest, "-qmp", f"unix:{qmp_path},server=on,wait=off")
    with qmp_client(qmp_path) as client:
        assert client.cmd("query-status")["status"] == "running"
        mark = len(vm.output)
        assert client.cmd("system_powerdown") == {}
        events = events_until(client, "SHUTDOWN")
        assert [e["event"] for e in events] == ["POWERDOWN", "SHUTDOWN"]
        assert events[-1]["data"] == {"guest": True, "reason": "guest-shutdown"}
        assert vm.wait(SHUTDOWN_TIMEOUT) == 0
    vm.expect(b"reboot: Power down", 10, after=mark)
    tail = vm.output[mark:]
    for line in (POWER_BUTTON_MARKER.encode(), SHUTDOWN_MARKER.encode(), b"Requesting system poweroff"):
        assert line in tail, tail.decode(errors="replace")


def test_power_button_with_no_shutdown_keeps_the_vm_until_quit(console, power_button_guest, qmp_path):
    vm = boot_to_shell(console, power_button_guest, "-no-shutdown",
                       "-qmp", f"unix:{qmp_path},server=on,wait=off")
    with qmp_client(qmp_path) as client:
        assert client.cmd("system_powerdown") == {}
        shutdown = events_until(client, "SHUTDOWN")[-1]
        assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
        vm.expect(b"reboot: Power down", 30)
        status = client.cmd("query-status")
        assert (status["status"], status["running"]) == ("shutdown", False)
        assert vm.proc.poll() is None  # still there, as QEMU with -no-shutdown
        assert client.cmd("quit") == {}
        assert vm.wait(SHUTDOWN_TIMEOUT) == 0


def test_halt_stops_the_guest_and_the_vm_stays_until_quit(console, guest_assets, qmp_path):
    """``halt`` halts the CPU after the clean shutdown; as under QEMU the VM is not powered off."""
    vm = boot_to_shell(console, guest_assets, "-qmp", f"unix:{qmp_path},server=on,wait=off")
    with qmp_client(qmp_path) as client:
        mark = len(vm.output)
        vm.send("halt\n")
        vm.expect(b"reboot: System halted", SHUTDOWN_TIMEOUT, after=mark)
        assert SHUTDOWN_MARKER.encode() in vm.output[mark:]
        assert vm.proc.poll() is None
        assert client.cmd("query-status")["status"] == "running"
        assert client.cmd("quit") == {}
        assert vm.wait(SHUTDOWN_TIMEOUT) == 0


def test_exit_from_the_console_shell_powers_off(console, guest_assets):
    vm = boot_to_shell(console, guest_assets)
    mark = len(vm.output)
    vm.send("exit\n")
    assert vm.wait(SHUTDOWN_TIMEOUT) == 0
    vm.expect(b"reboot: Power down", 10, after=mark)
    assert b"pyemu-guest: shell exited, powering off" in vm.output[mark:]
