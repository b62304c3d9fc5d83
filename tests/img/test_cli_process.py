"""pyemu-img as a process: the program ends through ``leave`` (exit handlers, streams flushed, ``_exit``),
so what a command printed reaches a pipe whole and its exit status is the command's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_program(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The program with a block-buffered stdout, as in a pipeline (``PYTHONUNBUFFERED`` left out)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "-m", "pyemu.img.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=env)


def test_output_larger_than_a_pipe_buffer_arrives_whole_before_the_exit(tmp_path: Path) -> None:
    created = run_program("create", "-f", "qcow2", "x.qcow2", "64M", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    # Every other 64 KiB cluster written: 512 data extents and 512 holes, a JSON map well over 64 KiB.
    writes = [arg for offset in range(0, 64 << 20, 128 << 10) for arg in ("-c", f"write -P 0x5a {offset} 64k")]
    wrote = subprocess.run(["qemu-io", "-f", "qcow2", *writes, "x.qcow2"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert wrote.returncode == 0, wrote.stderr
    mapped = run_program("map", "--output=json", "x.qcow2", cwd=tmp_path)
    assert mapped.returncode == 0, mapped.stderr
    extents = json.loads(mapped.stdout)
    assert sum(extent["length"] for extent in extents) == 64 << 20
    assert len(mapped.stdout) > 64 << 10
    assert sum(extent["length"] for extent in extents if extent["data"]) == 32 << 20


def test_the_exit_status_is_the_commands(tmp_path: Path) -> None:
    for name, pattern in (("a.raw", "0x11"), ("b.raw", "0x22")):
        assert run_program("create", "-f", "raw", name, "1M", cwd=tmp_path).returncode == 0
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 4k", name], cwd=tmp_path,
                       check=True, capture_output=True, timeout=60)
    differ = run_program("compare", "-f", "raw", "-F", "raw", "a.raw", "b.raw", cwd=tmp_path)
    assert differ.returncode == 1
    assert differ.stdout.startswith("Content mismatch at offset 0!")
    missing = run_program("info", "no-such-image", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.startswith("pyemu-img: Could not open 'no-such-image'")
    assert run_program("--version", cwd=tmp_path).stdout.startswith("pyemu-img version")
