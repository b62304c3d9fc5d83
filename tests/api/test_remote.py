"""``pyemu.connect`` and ``pyemu-remote``: the same operations as the embedded VM, over QMP.

The VM under control runs inside the test process (``pyemu.VM`` with ``-qmp``); the remote side is a
real socket client — RemoteVM in-process, and the ``pyemu-remote`` command as a child process.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import pyemu
from pyemu.system.runstate import RunState

TIMEOUT = 60.0


@pytest.fixture
def served_vm(echo_kernel: Path, short_dir: Path) -> Iterator[tuple[pyemu.VM, str]]:
    qmp = str(short_dir / "qmp.sock")
    with pyemu.VM("-kernel", str(echo_kernel), "-m", "32", "-accel", "tcg",
                  "-qmp", f"unix:{qmp},server=on,wait=off") as vm:
        vm.start()
        vm.console.expect("READY", timeout=TIMEOUT)
        yield vm, qmp


def remote(qmp: str, *words: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyemu.remote.cli", "--qmp", qmp, *words],
                          capture_output=True, text=True, timeout=timeout + 30)


def test_remote_vm_offers_the_embedded_operations(served_vm: tuple[pyemu.VM, str]) -> None:
    vm, qmp = served_vm
    with pyemu.connect(qmp) as handle:
        assert handle.state is RunState.RUNNING
        handle.pause()
        assert vm.state is RunState.PAUSED and handle.status()["status"] == "paused"
        assert handle.events.wait_for("STOP", TIMEOUT).name == "STOP"
        handle.resume()
        handle.reset()
        vm.console.expect("READY", timeout=TIMEOUT)
        handle.powerdown()  # the guest program ignores the button, as a guest without ACPI support would
        assert handle.events.wait_for("POWERDOWN", TIMEOUT).data == {}
        assert vm.running
        with pytest.raises(pyemu.CommandError) as caught:
            handle.execute("no-such-command")
        assert caught.value.error_class == "CommandNotFound"
        handle.quit()
        assert handle.events.wait_for("SHUTDOWN", TIMEOUT).data["reason"] == "host-qmp-quit"
    assert vm.wait(TIMEOUT) == 0


def test_cli_status_pause_resume_raw(served_vm: tuple[pyemu.VM, str]) -> None:
    vm, qmp = served_vm
    assert remote(qmp, "status").stdout == "running\n"
    done = remote(qmp, "pause")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert vm.state is RunState.PAUSED
    as_json = remote(qmp, "status", "--json")
    assert json.loads(as_json.stdout) == {"status": "paused", "running": False, "singlestep": False}
    assert remote(qmp, "resume").returncode == 0 and vm.running
    raw = remote(qmp, "raw", '{"execute": "query-status"}')
    assert raw.returncode == 0 and json.loads(raw.stdout)["return"]["status"] == "running"


def test_cli_exit_codes(served_vm: tuple[pyemu.VM, str], short_dir: Path) -> None:
    vm, qmp = served_vm
    refused = remote(qmp, "raw", '{"execute": "no-such-command"}')
    assert refused.returncode == 1 and json.loads(refused.stdout)["error"]["class"] == "CommandNotFound"
    bad_args = remote(qmp, "raw", '{"execute": "stop", "arguments": {"bogus": 1}}')
    assert bad_args.returncode == 1 and "GenericError" in bad_args.stdout
    malformed = remote(qmp, "raw", "{not json")
    assert malformed.returncode == 2 and "not valid JSON" in malformed.stderr
    assert remote(qmp, "frobnicate").returncode == 2  # unknown command word: argparse usage error
    unreachable = remote(str(short_dir / "nobody.sock"), "status")
    assert unreachable.returncode == 3 and "cannot connect" in unreachable.stderr
    quiet = remote(qmp, "--timeout", "1", "events", "--count", "1")
    assert quiet.returncode == 4 and quiet.stdout == ""
    vm.quit()
    vm.wait(TIMEOUT)


def test_cli_events_follow_the_vm(served_vm: tuple[pyemu.VM, str]) -> None:
    vm, qmp = served_vm
    watcher = subprocess.Popen([sys.executable, "-m", "pyemu.remote.cli", "--qmp", qmp, "events",
                                "--until", "SHUTDOWN"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert watcher.stdout is not None
        # The watcher says nothing until an event reaches it, and only events after it connected do:
        # pause and resume until it prints one, then end the VM.
        deadline = time.monotonic() + TIMEOUT
        while not select.select([watcher.stdout], [], [], 0.2)[0]:
            assert time.monotonic() < deadline and watcher.poll() is None, "the watcher saw no event"
            vm.pause()
            vm.resume()
        vm.quit()
        out, err = watcher.communicate(timeout=TIMEOUT)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    names = [json.loads(line)["event"] for line in out.splitlines()]
    assert names[-1] == "SHUTDOWN" and set(names[:-1]) <= {"STOP", "RESUME"}
    assert all(set(json.loads(line)["timestamp"]) == {"seconds", "microseconds"} for line in out.splitlines())


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_cli_drives_qemu_too(short_dir: Path) -> None:
    """The commands are plain QMP: pyemu-remote controls QEMU itself."""
    qmp = str(short_dir / "qemu.sock")
    qemu = subprocess.Popen(["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-display", "none",
                             "-nodefaults", "-S", "-qmp", f"unix:{qmp},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not Path(qmp).exists():
            assert qemu.poll() is None and time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.05)
        assert remote(qmp, "status").stdout == "prelaunch\n"
        assert remote(qmp, "quit").returncode == 0
        assert qemu.wait(TIMEOUT) == 0
    finally:
        if qemu.poll() is None:
            qemu.kill()
