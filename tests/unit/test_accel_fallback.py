"""``-accel kvm:tcg`` falls back to the software CPU when KVM is unusable; ``-accel kvm`` alone fails.

KVM is made unusable without root tricks: ``PYEMU_KVM_DEVICE`` (read by the KVM accelerator's default
device path) points at a path that does not exist. The real ``pyemu`` command runs as a subprocess with a
tiny multiboot kernel that prints "hi" on COM1 and leaves through ``isa-debug-exit``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyemu.accel.kvm.system import DEFAULT_DEVICE, DEVICE_ENV, default_device
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

ENTRY = 0x100000 + 32  # make_multiboot_binary puts the code right after the 32-byte header
EXIT_VALUE = 0x21
EXIT_STATUS = (EXIT_VALUE << 1) | 1  # isa-debug-exit: (value << 1) | 1

HELLO_THEN_EXIT = f"""
    mov dx, 0x3f8
    mov al, 0x68
    out dx, al
    mov al, 0x69
    out dx, al
    mov al, 0x0a
    out dx, al
    mov dx, 0xf4
    mov eax, {EXIT_VALUE:#x}
    out dx, eax
    hlt
"""


@pytest.fixture
def kernel(tmp_path) -> str:
    path = tmp_path / "hello-exit.bin"
    path.write_bytes(make_multiboot_binary(assemble(HELLO_THEN_EXIT, address=ENTRY, bits=32)))
    return str(path)


def pyemu(accel: str, kernel: str, *, kvm_device: str | None, extra: tuple[str, ...] = ()
          ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(DEVICE_ENV, None)
    if kvm_device is not None:
        env[DEVICE_ENV] = kvm_device
    return subprocess.run(
        [sys.executable, "-m", "pyemu.system.main", "-accel", accel, "-m", "64M", "-kernel", kernel,
         "-nographic", "-device", "isa-debug-exit,iobase=0xf4,iosize=4", *extra],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=env,
    )


def test_kvm_colon_tcg_falls_back_to_tcg_with_a_one_line_notice(kernel, tmp_path):
    missing = str(tmp_path / "no-such-kvm")
    proc = pyemu("kvm:tcg", kernel, kvm_device=missing, extra=("-d", "exec"))
    assert proc.returncode == EXIT_STATUS, proc.stderr
    assert proc.stdout == "hi\n"
    notices = [line for line in proc.stderr.splitlines() if line.startswith("pyemu:")]
    assert len(notices) == 1, proc.stderr
    assert "KVM is not available" in notices[0] and missing in notices[0]
    assert "trying the next accelerator" in notices[0]
    assert "starting 1 vCPU(s) on tcg" in proc.stderr  # -d exec: the guest really ran on the software CPU
    assert "Traceback" not in proc.stderr


def test_kvm_alone_fails_with_one_line_suggesting_tcg(kernel, tmp_path):
    missing = str(tmp_path / "no-such-kvm")
    proc = pyemu("kvm", kernel, kvm_device=missing)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pyemu: KVM is not available") and missing in lines[0]
    assert "-accel tcg" in lines[0]


def test_kvm_colon_tcg_uses_kvm_when_it_is_usable(kernel):
    try:
        os.close(os.open(DEFAULT_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        pytest.skip(f"{DEFAULT_DEVICE} unusable: {exc.strerror}")
    proc = pyemu("kvm:tcg", kernel, kvm_device=None, extra=("-d", "exec"))
    assert proc.returncode == EXIT_STATUS, proc.stderr
    assert proc.stdout == "hi\n"
    assert "starting 1 vCPU(s) on kvm" in proc.stderr
    assert "trying the next accelerator" not in proc.stderr


def test_the_default_kvm_device_honours_the_environment(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert default_device() == DEFAULT_DEVICE == "/dev/kvm"
    monkeypatch.setenv(DEVICE_ENV, "/dev/kvm-elsewhere")
    assert default_device() == "/dev/kvm-elsewhere"
    monkeypatch.setenv(DEVICE_ENV, "")  # empty means unset, as in a shell's VAR= prefix
    assert default_device() == DEFAULT_DEVICE
