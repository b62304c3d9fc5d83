"""``-cpu MODEL`` under KVM: the features this host's KVM cannot present are dropped with QEMU's warnings,
the same lines QEMU 7.2 prints for the same model on the same host."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from kvm_guest_kit import kvm_unusable_reason
from pyemu.target.x86.cpu_models import recognized_flags

COMMON = ["-M", "microvm", "-accel", "kvm", "-display", "none", "-S", "-serial", "none", "-qmp", "stdio"]
QUIT = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
LOCATION = re.compile(r"CPUID\.[0-9A-F]+H:[A-Z]+\.(\S+) \[bit \d+\]")


def _warnings(command: list[str]) -> list[str]:
    """The "doesn't support requested feature" lines of a start-up, ended at once over QMP."""
    done = subprocess.run(command, input=QUIT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line.split("warning: ", 1)[1] for line in done.stderr.splitlines()
            if "doesn't support requested feature" in line]


@pytest.mark.parametrize("model", ["Westmere", "Nehalem"])
def test_missing_host_features_warn_as_qemu_does(model: str) -> None:
    reason = kvm_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed: no reference")
    ours = _warnings([sys.executable, "-m", "pyemu.system.main", "-cpu", model, *COMMON])
    theirs = _warnings(["qemu-system-x86_64", "-cpu", model, *COMMON])
    known = set(recognized_flags())
    # QEMU's models also carry bits pyemu has no name for (e.g. spec-ctrl): compare the features both know.
    comparable = [line for line in theirs if (found := LOCATION.search(line)) and found.group(1) in known]
    assert ours == comparable
    if not comparable:
        pytest.skip(f"this host's KVM provides every feature of {model}: nothing to warn about")
