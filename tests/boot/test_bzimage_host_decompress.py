"""Debian's bzImage through the host-decompressed path, and through its own decompressor when asked.

Both boots must reach /init with the same command line, initrd and memory map; the ``-d boot`` log says
which path ran (target/x86/boot/bzimage_host.py).
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.assets]

BOOT_TIMEOUT = 240  # seconds; the host-decompressed boot takes ~5 s on an idle machine


def boot(console, guest_assets, log_path):  # type: ignore[no-untyped-def]
    vm = console(["-machine", "microvm", "-accel", "tcg", "-m", "512M", "-kernel", str(guest_assets.kernel),
                  "-initrd", str(guest_assets.initrd), "-append", "console=ttyS0 pyemu.poweroff=1",
                  "-nographic", "-no-reboot", "-d", "boot", "-D", str(log_path)])
    out = vm.expect(b"pyemu-guest: init reached", BOOT_TIMEOUT)
    assert vm.wait(120) == 0
    return out, log_path.read_text()


def test_bzimage_host_decompressed_reaches_init(console, guest_assets, tmp_path, monkeypatch):
    monkeypatch.delenv("PYEMU_BZIMAGE_GUEST_DECOMPRESS", raising=False)
    out, log = boot(console, guest_assets, tmp_path / "boot.log")
    assert "entering the host-decompressed kernel proper at 0x1000000" in log
    assert "bzimage (host-decompressed): entry 0x1000000" in log
    assert b"Command line: console=ttyS0 pyemu.poweroff=1" in out
    assert b"RAMDISK: [mem 0x" in out
    assert b"BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable" in out


def test_bzimage_guest_decompressor_on_request(console, guest_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("PYEMU_BZIMAGE_GUEST_DECOMPRESS", "1")
    out, log = boot(console, guest_assets, tmp_path / "boot.log")
    assert "PYEMU_BZIMAGE_GUEST_DECOMPRESS is set" in log
    assert "bzimage: entry 0x1000200" in log
    assert b"Command line: console=ttyS0 pyemu.poweroff=1" in out
