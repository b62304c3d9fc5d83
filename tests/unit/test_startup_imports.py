"""What a VM imports to start: only what its command line uses.

Why it matters: Python imports are most of pyemu's start-up (a dataclass costs ~0.5 ms to create on this
host), and start-up is part of every boot's wall time, where QEMU's is ~20 ms. Modules for devices and
backends the command line does not name are imported by their first user; this test keeps it so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pyemu.target.x86.boot.synthetic import make_pvh_elf

PROBE = """
import sys
from pyemu.system.instance import VmInstance
from pyemu.system.options import parse_args

instance = VmInstance(parse_args(sys.argv[1:]))
try:
    print(" ".join(sorted(m for m in sys.modules if m.startswith("pyemu."))))
finally:
    instance.close()
"""

NOT_FOR_A_PLAIN_BOOT = (
    "pyemu.hw.virtio.mmio", "pyemu.hw.virtio.blk", "pyemu.block.backend", "pyemu.system.iothread",
    "pyemu.target.x86.boot.bzimage_host", "pyemu.chardev.socket", "pyemu.chardev.file", "pyemu.chardev.options",
    "pyemu.monitor.server",
)


def _modules_after_build(tmp_path: Path, *extra: str) -> set[str]:
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(make_pvh_elf())
    argv = ["-machine", "microvm", "-accel", "tcg", "-m", "64M", "-kernel", str(kernel), "-nographic",
            "-serial", "null", "-S", *extra]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_a_plain_boot_imports_no_device_or_backend_it_does_not_use(tmp_path: Path) -> None:
    modules = _modules_after_build(tmp_path)
    assert "pyemu.machines.microvm" in modules and "pyemu.target.x86.boot.pvh" in modules
    assert sorted(modules.intersection(NOT_FOR_A_PLAIN_BOOT)) == []


def test_the_modules_come_with_the_devices_that_need_them(tmp_path: Path) -> None:
    drive = tmp_path / "disk.raw"
    drive.write_bytes(bytes(1 << 20))
    modules = _modules_after_build(tmp_path, "-drive", f"file={drive},format=raw,if=virtio",
                                   "-chardev", f"file,id=log,path={tmp_path / 'log'}")
    assert {"pyemu.hw.virtio.mmio", "pyemu.hw.virtio.blk", "pyemu.block.backend", "pyemu.system.iothread",
            "pyemu.chardev.file", "pyemu.chardev.options"} <= modules
