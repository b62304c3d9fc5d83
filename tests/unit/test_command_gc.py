"""The ``pyemu`` command builds its VM with the cyclic garbage collector off and turns it back on, with
start-up's objects frozen, once the VM runs (pyemu.system.main.command)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pyemu.system.main import main
from pyemu.target.x86.boot.synthetic import make_multiboot_binary
from pyemu.testing.asm import assemble

ENTRY = 0x100000 + 32  # make_multiboot_binary puts the code right after the 32-byte header
DEBUG_EXIT = ["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


def kernel(tmp_path: Path) -> str:
    """A multiboot kernel that ends the VM at once through isa-debug-exit (status 0x21 * 2 + 1)."""
    path = tmp_path / "exit-kernel.bin"
    path.write_bytes(make_multiboot_binary(assemble("mov dx, 0xf4\n mov eax, 0x21\n out dx, eax\n hlt",
                                                    address=ENTRY, bits=32)))
    return str(path)


def test_started_is_called_once_the_vm_runs(tmp_path: Path) -> None:
    calls: list[str] = []
    status = main(["-accel", "tcg", "-m", "64M", "-display", "none", "-serial", "none", *DEBUG_EXIT,
                   "-kernel", kernel(tmp_path)], started=lambda: calls.append("started"))
    assert status == (0x21 << 1) | 1
    assert calls == ["started"]


def test_command_collects_only_once_the_vm_runs(tmp_path: Path) -> None:
    probe = textwrap.dedent("""
        import gc, sys
        import pyemu.system.main as command_module
        resume = command_module._collect_from_now_on
        def reporting_resume():
            print("while building: enabled", gc.isenabled(), file=sys.stderr)
            resume()
            print("running: enabled", gc.isenabled(), "frozen", gc.get_freeze_count() > 1000, file=sys.stderr)
        command_module._collect_from_now_on = reporting_resume
        sys.argv[0] = "pyemu"
        command_module.command()
    """)
    proc = subprocess.run([sys.executable, "-c", probe, "-accel", "tcg", "-m", "64M", "-display", "none",
                           "-serial", "none", *DEBUG_EXIT, "-kernel", kernel(tmp_path)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == (0x21 << 1) | 1, proc.stderr
    assert "while building: enabled False" in proc.stderr
    assert "running: enabled True frozen True" in proc.stderr
