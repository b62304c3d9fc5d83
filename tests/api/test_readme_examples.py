"""The README's code examples run as written: a user who copies them gets what the README promises.

Each example is the fenced block after an ``<!-- example: NAME -->`` marker, so editing the README is
editing the test input.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)\n```", text, re.S)
    assert match is not None, f"README.md has no '{name}' example"
    return match.group(1) + "\n"


def test_device_model_example_passes_under_pytest(tmp_path: Path) -> None:
    test_file = tmp_path / "test_doubler.py"
    test_file.write_text(readme_example("device-test"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b[12] passed", run.stdout), run.stdout  # tcg ran; kvm ran or skipped


def test_device_model_example_fails_when_the_device_is_wrong(tmp_path: Path) -> None:
    """The example is a real test: a device that triples instead of doubling makes it fail."""
    test_file = tmp_path / "test_doubler.py"
    test_file.write_text(readme_example("device-test").replace("(2 * self.value)", "(3 * self.value)"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "tcg",
                          str(test_file)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 1 and "1 failed" in run.stdout, run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.assets
def test_api_example_boots_runs_a_command_and_powers_off(guest_assets: object, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(readme_example("api"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "guest exited with 0"
