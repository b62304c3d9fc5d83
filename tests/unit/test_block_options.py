"""``-drive`` parsing and validation (DriveOptions.from_props), and open_drive building raw over file."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pyemu.block.backend import BlockBackend, CacheMode
from pyemu.block.errors import BlockConfigError, BlockIOError, ImageLockedError, ReadOnlyError
from pyemu.block.file import FileProtocol
from pyemu.block.options import DriveOptions, open_drive
from pyemu.block.raw import RawFormat


def props(text: str) -> list[tuple[str, str]]:
    """'a=b,c=d' -> [('a', 'b'), ('c', 'd')] (the CLI's split, good enough for these tests)."""
    return [tuple(item.split("=", 1)) for item in text.split(",")]  # type: ignore[misc]


def parse(text: str) -> DriveOptions:
    return DriveOptions.from_props(props(text))


def test_defaults() -> None:
    opts = parse("file=disk.img")
    assert opts.file == "disk.img" and opts.format is None and opts.interface == "none"
    assert opts.cache == CacheMode.parse("writeback")
    assert (opts.readonly, opts.discard, opts.detect_zeroes, opts.locking, opts.aio, opts.media) == \
        (False, "ignore", "off", "auto", "threads", "disk")
    assert (opts.id, opts.serial, opts.index, opts.snapshot, opts.offset, opts.size) == \
        (None, None, None, False, 0, None)
    assert opts.effective_id == "none0"
    assert opts.notes == ()


def test_everything() -> None:
    opts = parse("file=/x/y.img,format=raw,if=virtio,id=disk-0.a_b,readonly=on,cache=none,discard=unmap,"
                 "detect-zeroes=off,file.locking=off,aio=native,media=disk,serial=SN123,index=2,"
                 "snapshot=off,offset=1M,size=0x1000")
    assert opts.interface == "virtio" and opts.id == "disk-0.a_b" and opts.readonly
    assert opts.cache == CacheMode(direct=True, writeback=True, no_flush=False)
    assert opts.discard == "unmap" and opts.locking == "off" and opts.aio == "native"
    assert opts.serial == "SN123" and opts.index == 2 and opts.offset == 1 << 20 and opts.size == 4096
    assert opts.notes == ("-drive: aio=native behaves as aio=threads in pyemu",)


def test_effective_id_follows_qemus_naming() -> None:
    assert parse("file=a,if=virtio,index=3").effective_id == "virtio3"
    assert parse("file=a,if=virtio,id=mine").effective_id == "mine"


@pytest.mark.parametrize("text,expected", [
    ("readonly=on", True), ("readonly=yes", True), ("readonly=true", True), ("read-only=on", True),
    ("readonly=off", False), ("readonly=no", False), ("readonly=false", False), ("readonly=ON", True),
])
def test_booleans(text: str, expected: bool) -> None:
    assert parse(f"file=a,{text}").readonly is expected


def test_cache_suboptions_override_the_mode_in_any_order() -> None:
    assert parse("file=a,cache.direct=on,cache=writeback").cache == CacheMode(direct=True)
    assert parse("file=a,cache=none,cache.direct=off").cache == CacheMode(direct=False)
    assert parse("file=a,cache.no-flush=on").cache == CacheMode(no_flush=True)
    assert parse("file=a,cache=writethrough").cache == CacheMode(writeback=False)
    assert parse("file=a,cache=unsafe").cache.no_flush


@pytest.mark.parametrize("value,normal", [("ignore", "ignore"), ("off", "ignore"), ("unmap", "unmap"),
                                          ("on", "unmap")])
def test_discard_aliases(value: str, normal: str) -> None:
    assert parse(f"file=a,discard={value}").discard == normal


def test_locking_keys() -> None:
    assert parse("file=a,locking=on").locking == "on"
    assert parse("file=a,file.locking=off").locking == "off"


def test_later_keys_override_earlier_ones() -> None:
    assert parse("file=a,file=b,readonly=on,readonly=off").file == "b"


@pytest.mark.parametrize("text,message", [
    ("file=a,bogus=1", "-drive: Invalid parameter 'bogus'"),
    ("file=a,format=xyz", "Unknown driver 'xyz'"),
    ("file=a,format=vmdk", "vmdk' is not supported yet"),
    ("file=a,format=qcow2,offset=512", "Block format 'qcow2' does not support the option 'offset'"),
    ("format=raw", "'file' is required"),
    ("file=", "'file' is required"),
    ("file=a,if=ide", "if=ide is not supported"),
    ("file=a,if=bus9", "unsupported bus type 'bus9'"),
    ("file=a,readonly=maybe", "Parameter 'readonly' expects 'on' or 'off'"),
    ("file=a,cache=fast", "invalid cache option 'fast'"),
    ("file=a,cache.direct=2", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("file=a,discard=sometimes", "Invalid discard option 'sometimes'"),
    ("file=a,detect-zeroes=on", "detect-zeroes=on is not supported yet"),
    ("file=a,detect-zeroes=maybe", "does not accept value 'maybe'"),
    ("file=a,locking=perhaps", "Parameter 'locking' does not accept value 'perhaps'"),
    ("file=a,aio=io_uring", "aio=io_uring was specified, but is not supported"),
    ("file=a,aio=posix", "invalid aio option 'posix'"),
    ("file=a,aio=native", "aio=native was specified, but it requires cache.direct=on"),
    ("file=a,media=cdrom", "media=cdrom is not supported"),
    ("file=a,media=tape", "'tape' invalid media"),
    ("file=a,index=-1", "Parameter 'index' expects a non-negative integer"),
    ("file=a,index=x", "Parameter 'index' expects a non-negative integer"),
    ("file=a,id=0bad", "Parameter 'id' expects an identifier"),
    ("file=a,id=has space", "Parameter 'id' expects an identifier"),
    ("file=a,offset=-512", "Parameter 'offset' expects a non-negative number"),
    ("file=a,offset=12Q", "Parameter 'offset' expects a non-negative number"),
    ("file=a,size=1000", "Specified size is not multiple of 512"),
    ("file=a,size=16E", "Parameter 'size' is too large"),
    ("file=a,format=file,offset=512", "Block format 'file' does not support the option 'offset'"),
])
def test_errors(text: str, message: str) -> None:
    with pytest.raises(BlockConfigError) as info:
        parse(text)
    assert message in str(info.value)
    assert str(info.value).startswith("-drive: ")
    assert info.value.option == "-drive"


def test_validation_applies_to_direct_construction_too() -> None:
    with pytest.raises(BlockConfigError):
        DriveOptions(file="a", offset=-1)
    with pytest.raises(BlockConfigError):
        DriveOptions(file="a", index=True)  # type: ignore[arg-type]
    assert DriveOptions(file="a", discard="on").discard == "unmap"


# -- open_drive -----------------------------------------------------------------------------------------------------

@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "drive.img"
    data = bytes((i * 31) & 0xFF for i in range(1 << 16))
    path.write_bytes(data)
    return path, data


def test_open_drive_builds_raw_over_file(disk: tuple[Path, bytes]) -> None:
    path, data = disk
    backend = open_drive(parse(f"file={path},if=virtio,id=vd0,discard=unmap"))
    try:
        assert isinstance(backend, BlockBackend)
        assert backend.id == "vd0" and not backend.read_only and backend.discard_mode == "unmap"
        assert isinstance(backend.root, RawFormat) and isinstance(backend.root.child, FileProtocol)
        ram = bytearray(512)
        backend.preadv(512, [memoryview(ram)])
        assert bytes(ram) == data[512:1024]
        backend.pwritev(0, [b"hello"])
        backend.flush()
    finally:
        backend.close()
    assert path.read_bytes()[:5] == b"hello"


def test_open_drive_window_and_read_only(disk: tuple[Path, bytes]) -> None:
    path, data = disk
    backend = open_drive(parse(f"file={path},readonly=on,offset=4k,size=8k"))
    try:
        assert backend.read_only and backend.size() == 8192
        ram = bytearray(16)
        backend.preadv(0, [memoryview(ram)])
        assert bytes(ram) == data[4096:4112]
        with pytest.raises(ReadOnlyError):
            backend.pwritev(0, [b"x"])
    finally:
        backend.close()
    assert path.read_bytes() == data


def test_open_drive_format_file_has_no_raw_layer(disk: tuple[Path, bytes]) -> None:
    backend = open_drive(parse(f"file={disk[0]},format=file"))
    try:
        assert isinstance(backend.root, FileProtocol)
    finally:
        backend.close()


def test_open_drive_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    with pytest.raises(BlockConfigError) as info:
        open_drive(parse(f"file={missing}"))
    assert str(info.value) == f"-drive: Could not open '{missing}': No such file or directory"
    assert info.value.errno == errno.ENOENT


def test_open_drive_bad_window_closes_the_file(disk: tuple[Path, bytes]) -> None:
    path, _ = disk
    with pytest.raises(BlockConfigError, match="cannot be greater than size of image"):
        open_drive(parse(f"file={path},offset=1M"))
    open_drive(parse(f"file={path}")).close()  # no lock was left behind


def test_open_drive_twice_is_locked(disk: tuple[Path, bytes]) -> None:
    path, _ = disk
    first = open_drive(parse(f"file={path}"))
    try:
        with pytest.raises(ImageLockedError):
            open_drive(parse(f"file={path}"))
        open_drive(parse(f"file={path},file.locking=off")).close()
    finally:
        first.close()


def test_snapshot_on_writes_to_a_temporary_overlay(disk: tuple[Path, bytes], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = disk
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    backend = open_drive(parse(f"file={path},format=raw,snapshot=on"))
    assert not backend.read_only
    backend.pwritev(4096, [b"\x77" * 8192])
    backend.flush()
    buf = bytearray(16384)
    backend.preadv(0, [memoryview(buf)])
    assert buf[:4096] == content[:4096] and buf[4096:12288] == b"\x77" * 8192
    assert list(scratch.iterdir()) == []  # the overlay is unlinked as soon as it is open
    # Another process may read the image meanwhile, but nobody may write it (the base is a backing file).
    with pytest.raises(ImageLockedError):
        FileProtocol.open(str(path))
    backend.close()
    assert path.read_bytes() == content


def test_probing_warns_for_raw_and_guards_block_0(disk: tuple[Path, bytes]) -> None:
    path, _ = disk
    warnings: list[str] = []
    backend = open_drive(parse(f"file={path}"), warn=warnings.append)
    assert len(warnings) == 1 and "probing guessed raw" in warnings[0]
    backend.pwritev(0, [b"\0" * 512])  # ordinary writes to block 0 are fine
    with pytest.raises(BlockIOError) as info:
        backend.pwritev(0, [b"QFI\xfb" + bytes(508)])
    assert info.value.errno == errno.EPERM
    backend.close()
    explicit = open_drive(parse(f"file={path},format=raw"), warn=warnings.append)
    explicit.pwritev(0, [b"QFI\xfb" + bytes(508)])  # format=raw lifts the restriction, as in QEMU
    explicit.close()
    assert len(warnings) == 1


def test_probing_finds_qcow2(tmp_path: Path) -> None:
    from pyemu.block.qcow2.create import create_qcow2
    image = tmp_path / "disk.qcow2"
    create_qcow2(str(image), 1 << 20)
    warnings: list[str] = []
    backend = open_drive(parse(f"file={image}"), warn=warnings.append)
    assert backend.root.name == "qcow2" and backend.size() == 1 << 20 and warnings == []
    backend.close()
