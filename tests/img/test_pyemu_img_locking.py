"""Image locks: pyemu-img refuses images a writer holds (as qemu-img does), ``-U`` reads them anyway, and
nothing is created over an image in use -- including convert's own source."""

from __future__ import annotations

from pathlib import Path

from pyemu.block.file import FileProtocol
from pyemu.block.locking import BlockPerm


def test_readers_refuse_a_writer_unless_force_share(pimg, workdir: Path, error_line) -> None:  # type: ignore[no-untyped-def]
    assert pimg("create", "-q", "-f", "qcow2", "a.q", "1M").rc == 0
    # What qemu-io (or a VM) holds while writing: uses consistent-read and write.
    writer = FileProtocol.open(str(workdir / "a.q"), read_only=False,
                               perm=BlockPerm.CONSISTENT_READ | BlockPerm.WRITE, shared=BlockPerm(0x0F))
    try:
        for argv in (["info", "a.q"], ["check", "a.q"], ["map", "a.q"], ["compare", "a.q", "a.q"]):
            result = pimg(*argv)
            assert result.rc in (1, 2)
            assert 'Failed to get shared "write" lock' in result.err
        for argv in (["info", "-U", "a.q"], ["check", "-U", "a.q"], ["map", "-U", "a.q"],
                     ["compare", "-U", "a.q", "a.q"], ["convert", "-U", "-O", "raw", "a.q", "a.raw"]):
            assert pimg(*argv).rc == 0, argv
        result = pimg("create", "-q", "-f", "qcow2", "a.q", "2M")
        assert result.rc == 1 and '"write" lock' in result.err
        result = pimg("bench", "-U", "-w", "-c", "1", "a.q")
        assert error_line(result) == "Could not open 'a.q': force-share=on can only be used with read-only images"
    finally:
        writer.close()
    assert pimg("info", "a.q").out.count("virtual size: 1 MiB") == 1


def test_convert_never_truncates_its_source(pimg, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "r.raw").write_bytes(b"\x5a" * 65536)
    result = pimg("convert", "-O", "raw", "r.raw", "r.raw")
    assert result.rc == 1 and '"write" lock' in result.err
    assert (workdir / "r.raw").read_bytes() == b"\x5a" * 65536
