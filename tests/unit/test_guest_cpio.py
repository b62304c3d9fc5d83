"""The cpio newc writer: byte layout, round trips through our parser and the system cpio tool."""

import gzip
import os
import shutil
import stat
import subprocess

import pytest

from pyemu.guest.cpio import (
    CpioArchive,
    CpioError,
    archive_from_entries,
    encode_entry,
    CpioEntry,
    read_archive,
)


def sample_archive() -> CpioArchive:
    archive = CpioArchive()
    archive.add_file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
    archive.add_symlink("bin/sh", "/bin/busybox")
    archive.add_directory("proc")
    archive.add_directory("tmp", 0o1777)
    archive.add_device("dev/console", "c", 5, 1, 0o600)
    archive.add_device("dev/vda", "b", 254, 0, 0o660)
    archive.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    archive.add_file("empty", b"")
    archive.add_file("odd/name-with-5", b"12345")
    return archive


def test_header_layout_and_padding():
    entry = CpioEntry("ab", stat.S_IFREG | 0o644, b"xyz", mtime=0, ino=7)
    raw = encode_entry(entry)
    assert raw[:6] == b"070701"
    assert raw[6:14] == b"00000007"  # ino
    assert raw[14:22] == b"000081A4"  # mode
    assert raw[54:62] == b"00000003"  # filesize
    assert raw[94:102] == b"00000003"  # namesize including NUL
    assert raw[110:113] == b"ab\0"
    assert len(raw) == 116 + 4  # 110 + 3 -> 116 (4-aligned), then 3 data bytes -> 4
    assert raw[116:119] == b"xyz" and raw[119:] == b"\0"


def test_parents_first_and_trailer():
    archive = CpioArchive()
    archive.add_file("lib/modules/6.1/virtio.ko", b"k")
    names = [e.name for e in archive.entries]
    assert names == ["lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/virtio.ko"]
    data = archive.to_bytes()
    assert b"TRAILER!!!\0" in data[-128:] and len(data) % 4 == 0


def test_round_trip_through_our_parser():
    archive = sample_archive()
    entries = read_archive(archive.to_gzip())
    assert entries["bin/busybox"].data == b"\x7fELF" + bytes(range(256)) * 3
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["bin/sh"].is_symlink and entries["bin/sh"].link_target == "/bin/busybox"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    assert stat.S_ISBLK(entries["dev/vda"].mode)
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())
    assert len({e.ino for e in entries.values()}) == len(entries)
    rebuilt = archive_from_entries(entries.values())
    assert rebuilt.to_bytes() == archive.to_bytes()


def test_reproducible_gzip():
    assert sample_archive().to_gzip() == sample_archive().to_gzip()
    assert gzip.decompress(sample_archive().to_gzip()) == sample_archive().to_bytes()
    assert sample_archive().to_gzip()[4:8] == b"\0\0\0\0"  # gzip header mtime


def test_invalid_entries():
    archive = CpioArchive()
    archive.add_file("a", b"")
    with pytest.raises(CpioError, match="added twice"):
        archive.add_file("/a", b"")
    with pytest.raises(CpioError, match="leaves the archive root"):
        archive.add_file("../etc/passwd", b"")
    with pytest.raises(CpioError, match="not a directory"):
        archive.add_file("a/b", b"")
    with pytest.raises(CpioError, match="kind"):
        archive.add_device("dev/x", "p", 1, 1)
    with pytest.raises(CpioError, match="magic"):
        read_archive(b"070702" + b"0" * 200)
    with pytest.raises(CpioError, match="ends inside a header"):
        read_archive(sample_archive().to_bytes()[:50])


@pytest.fixture(scope="module")
def cpio_tool():
    tool = shutil.which("cpio")
    if tool is None:
        pytest.skip("the system cpio tool is not installed (apt-get install cpio)")
    return tool


def test_system_cpio_lists_the_archive(tmp_path, cpio_tool):
    listing = subprocess.run(
        [cpio_tool, "-t", "--quiet"], input=sample_archive().to_bytes(), capture_output=True, check=True
    ).stdout.decode().split()
    assert set(listing) == {e.name for e in sample_archive().entries}


def test_system_cpio_extracts_the_archive(tmp_path, cpio_tool):
    target = tmp_path / "root"
    target.mkdir()
    subprocess.run(
        [cpio_tool, "-i", "-d", "--quiet", "--no-absolute-filenames"],
        input=sample_archive().to_bytes(), cwd=target, check=True, capture_output=True,
    )
    assert (target / "bin" / "busybox").read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert os.stat(target / "bin" / "busybox").st_mode & 0o777 == 0o755
    assert os.readlink(target / "bin" / "sh") == "/bin/busybox"
    assert (target / "init").read_text() == "#!/bin/sh\necho hi\n"
    assert (target / "odd" / "name-with-5").read_bytes() == b"12345"
    if os.geteuid() == 0:  # mknod needs root
        console = os.lstat(target / "dev" / "console")
        assert stat.S_ISCHR(console.st_mode) and os.major(console.st_rdev) == 5 and os.minor(console.st_rdev) == 1
