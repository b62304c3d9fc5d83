"""Damage found while the image is in use: the request fails with EIO, the image is marked corrupt (QEMU's
header bit, which qemu-img then reports), a read-write open is refused afterwards, a read-only open works,
and ``pyemu-img check -r all`` repairs the image and clears the bit so it can be used again."""

from __future__ import annotations

import errno
import json
import re
import struct
import subprocess

import pytest

from pyemu.block.errors import BlockConfigError, BlockIOError
from pyemu.block.image import open_image
from pyemu.img.cli import main as pyemu_img

pytestmark = pytest.mark.skipif(subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0,
                                reason="qemu-img not installed")


def _qemu_info(path) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                                     capture_output=True, text=True).stdout)


def test_write_into_metadata_marks_image_corrupt_and_repair_clears_it(tmp_path):
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "1M"],
                   check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 4k", str(path)], check=True, capture_output=True)
    data = bytearray(path.read_bytes())
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FF_FFFF_FFFF_FE00
    # Guest cluster 0 now claims to live in the L1 table's cluster (COPIED, so it looks writable in place).
    struct.pack_into(">Q", data, l2_offset, (1 << 63) | l1_offset)
    path.write_bytes(bytes(data))
    l1_before = bytes(data[l1_offset:l1_offset + 4096])

    image = open_image(str(path), read_only=False)
    with pytest.raises(BlockIOError) as info:
        image.pwritev(0, [b"\xee" * 512])
    assert info.value.errno == errno.EIO and "Marking image as corrupt" in str(info.value)
    with pytest.raises(Exception):
        image.pwritev(8192, [b"\xee" * 512])  # no more writes to a corrupt image
    image.close()
    assert path.read_bytes()[l1_offset:l1_offset + 4096] == l1_before, "the write landed on the L1 table"
    assert _qemu_info(path)["format-specific"]["data"]["corrupt"] is True

    with pytest.raises(BlockConfigError, match="Image is corrupt; cannot be opened read/write"):
        open_image(str(path), read_only=False)
    reader = open_image(str(path), read_only=True)
    reader.close()

    assert pyemu_img(["check", "-q", "-r", "all", str(path)]) == 0
    assert _qemu_info(path)["format-specific"]["data"]["corrupt"] is False
    assert subprocess.run(["qemu-img", "check", str(path)], capture_output=True).returncode == 0
    image = open_image(str(path), read_only=False)
    image.pwritev(0, [b"\x22" * 512])
    image.close()


@pytest.mark.parametrize("entry, message", [
    (0x30000 | 0x4, "Refcount table entry 1 has reserved bits set"),
    (0x30200, "Refblock offset 0x30200 unaligned (reftable index: 0x1)"),
])
def test_a_damaged_refcount_table_entry_is_named_at_open(tmp_path, entry, message):
    """The open checks every refcount table entry (first with one test over the whole table): reserved bits
    or a block off a cluster boundary name the entry, for read-only and read-write opens alike."""
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    data = bytearray(path.read_bytes())
    reftable = struct.unpack_from(">Q", data, 48)[0]
    struct.pack_into(">Q", data, reftable + 8, entry)
    path.write_bytes(bytes(data))
    for read_only in (True, False):
        with pytest.raises(BlockConfigError, match=re.escape(message)):
            open_image(str(path), read_only=read_only)
