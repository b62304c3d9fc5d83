"""``-drive file=nbd+unix://...`` and ``driver=nbd`` in a real pyemu VM (a tiny spinning guest, no Linux):
the drive opens over NBD (one client connection to the export) and QMP query-block shows it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

import pyemu
from pyemu.block.image import open_image
from pyemu.block.nbd.export import NbdExport
from pyemu.block.nbd.server import NbdServer
from pyemu.target.x86.boot.synthetic import make_multiboot_binary


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pyemu-nbd-", dir="/tmp"))  # sun_path is short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("spelling", ["url", "options"])
def test_vm_drive_over_nbd(short_dir: Path, spelling: str) -> None:
    kernel = short_dir / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))  # jmp $
    image = short_dir / "disk.img"
    image.write_bytes(b"\x42" * (1 << 20))
    sock = short_dir / "s.sock"
    node = open_image(str(image), format="raw", read_only=False)
    server = NbdServer()
    server.add_export(NbdExport("disk", node, writable=True))
    server.listen_unix(str(sock))
    drive = (f"file=nbd+unix:///disk?socket={sock},format=raw,if=virtio,id=d0" if spelling == "url" else
             f"driver=nbd,server.type=unix,server.path={sock},export=disk,reconnect-delay=5,if=virtio,id=d0")
    vm = pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-S", "-drive", drive)
    try:
        vm.start()
        (block,) = vm.execute("query-block", {})
        inserted = block["inserted"]
        assert inserted["file"] == f"nbd+unix:///disk?socket={sock}"
        assert inserted["drv"] == "raw" and inserted["image"]["virtual-size"] == 1 << 20
        assert server.client_count == 1
    finally:
        vm.close()
        server.close()
        node.close()
