"""A pyemu process running a tiny multiboot guest (``jmp $``), with QMP sockets, for the QMP tests.

No Linux boot: the guest spins, so stop/cont have real vCPUs to stop under the software CPU, and the
process starts in about a second. Timeouts are generous (busy CI hosts); nothing asserts on timing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pyemu.target.x86.boot.synthetic import make_multiboot_binary

START_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0
SPIN = b"\xeb\xfe"  # jmp $


class PyemuProcess:
    """``pyemu -kernel spin.bin -serial none ARGS``; waits until every socket in ``wait_for`` exists."""

    def __init__(self, kernel: Path, args: list[str], wait_for: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyemu.system.main", "-kernel", str(kernel), "-m", "32", "-accel", "tcg",
             "-serial", "none", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(os.path.exists(path) for path in wait_for):
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"pyemu exited with {self.proc.returncode}: {err.decode(errors='replace')}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("pyemu did not open its QMP socket in time")
            time.sleep(0.05)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def short_dir():
    """A short directory for Unix sockets (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="pyemu-qmp-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spin_kernel(short_dir: Path) -> Path:
    kernel = short_dir / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(SPIN))
    return kernel


@pytest.fixture
def launch(spin_kernel: Path):
    """``launch(args, wait_for=[paths])`` starts pyemu; every process is killed at teardown."""
    started: list[PyemuProcess] = []

    def start(args: list[str], wait_for: list[str]) -> PyemuProcess:
        process = PyemuProcess(spin_kernel, args, wait_for)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
