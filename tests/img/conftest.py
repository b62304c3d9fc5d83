"""Fixtures for the pyemu-img tests: run pyemu-img in-process and qemu-img/qemu-io as subprocesses in the
same temporary directory, so outputs that contain file names can be compared byte for byte."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyemu.img.cli import main


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str




@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tmp_path as the current directory (file names in outputs stay short and identical for both tools)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def pimg(workdir: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """``pimg("info", "x.qcow2")`` runs pyemu-img's main() and returns its exit status and output."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        rc = main(list(args))
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)

    return run


@pytest.fixture
def qimg(workdir: Path) -> Callable[..., Result]:
    """``qimg("info", "x.qcow2")`` runs qemu-img in the work directory."""

    def run(*args: str) -> Result:
        proc = subprocess.run(["qemu-img", *args], cwd=workdir, capture_output=True, timeout=60,
                              env={**os.environ, "LC_ALL": "C"})
        # Decoded by hand: text mode would turn the progress lines' carriage returns into newlines.
        return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))

    return run


@pytest.fixture
def qio(workdir: Path) -> Callable[..., None]:
    """``qio("x.qcow2", "write -P 1 0 64k", ...)`` runs qemu-io commands on an image (must succeed)."""

    def run(image: str, *commands: str, fmt: str | None = None) -> None:
        argv = ["qemu-io"] + (["-f", fmt] if fmt else [])
        for command in commands:
            argv += ["-c", command]
        proc = subprocess.run([*argv, image], cwd=workdir, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr

    return run


def _error_line(result: Result) -> str:
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("pyemu-img: "), result.err
    assert "Traceback" not in result.err
    return lines[0][len("pyemu-img: "):]


@pytest.fixture
def error_line() -> Callable[[Result], str]:
    """``error_line(result)``: the single ``pyemu-img: ...`` line a failed command prints, without the prefix
    (asserts there is exactly one line and no traceback)."""
    return _error_line
