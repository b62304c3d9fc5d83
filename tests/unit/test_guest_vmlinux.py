"""Extracting the ELF vmlinux from a bzImage's compressed payload."""

import gzip
import lzma
import shutil
import struct
import subprocess

import pytest

from pyemu.guest.assets import find_assets
from pyemu.guest.errors import KernelExtractError
from pyemu.guest.vmlinux import extract_vmlinux, extract_vmlinux_file, payload_compression
from pyemu.target.x86.boot.synthetic import BzImageSpec, make_bzimage, make_pvh_elf

ELF = make_pvh_elf(b"\x90" * 1000 + b"\xf4")


def kernel_xz(data: bytes) -> bytes:
    """As the kernel build does: xz with the x86 BCJ filter and CRC32, then the size appended."""
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
    stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    return stream + struct.pack("<I", len(data))


def test_xz_payload(tmp_path):
    image = make_bzimage(BzImageSpec(payload=kernel_xz(ELF)))
    assert extract_vmlinux(image) == ELF
    source = tmp_path / "vmlinuz"
    source.write_bytes(image)
    assert extract_vmlinux_file(source, tmp_path / "vmlinux") == len(ELF)
    assert (tmp_path / "vmlinux").read_bytes() == ELF


def test_gzip_payload():
    payload = gzip.compress(ELF) + struct.pack("<I", len(ELF))
    assert payload_compression(payload) == "gzip"
    assert extract_vmlinux(make_bzimage(BzImageSpec(payload=payload))) == ELF


def test_errors():
    with pytest.raises(KernelExtractError, match="cannot find the kernel payload"):
        extract_vmlinux(b"not a kernel" * 100)
    with pytest.raises(KernelExtractError, match="does not describe its payload"):
        extract_vmlinux(make_bzimage())  # no payload
    with pytest.raises(KernelExtractError, match="cannot decode"):
        extract_vmlinux(make_bzimage(BzImageSpec(payload=b"\x42" * 64)))
    corrupt = bytearray(kernel_xz(ELF))
    corrupt[40] ^= 0xFF
    with pytest.raises(KernelExtractError, match="corrupt"):
        extract_vmlinux(make_bzimage(BzImageSpec(payload=bytes(corrupt))))
    with pytest.raises(KernelExtractError, match="not an ELF"):
        extract_vmlinux(make_bzimage(BzImageSpec(payload=kernel_xz(b"plain data" * 10))))


def test_real_kernel_payload_matches_cached_vmlinux():
    assets = find_assets()
    if assets is None:
        pytest.skip("Debian guest assets not fetched (run 'pyemu-guest fetch')")
    assert extract_vmlinux(assets.kernel.read_bytes()) == assets.vmlinux.read_bytes()


@pytest.mark.parametrize("compression", ["xz", "gzip", "lzma", "zstd"])
def test_a_payload_that_decompresses_past_the_limit_is_refused(compression):
    """A bzImage whose payload inflates beyond the limit (a "zip bomb") is refused before the host holds
    more than the limit of it; at the limit it is still accepted."""
    elf = ELF + bytes(4096)
    if compression == "xz":
        payload = kernel_xz(elf)
    elif compression == "gzip":
        payload = gzip.compress(elf) + struct.pack("<I", len(elf))
    elif compression == "lzma":
        payload = lzma.compress(elf, format=lzma.FORMAT_ALONE) + struct.pack("<I", len(elf))
    else:
        if shutil.which("zstd") is None:
            pytest.skip("the zstd tool is not installed")
        payload = subprocess.run(["zstd", "-q", "-c"], input=elf, capture_output=True, check=True).stdout
    image = make_bzimage(BzImageSpec(payload=payload))
    assert extract_vmlinux(image, limit=len(elf)) == elf
    with pytest.raises(KernelExtractError, match="decompresses to more than"):
        extract_vmlinux(image, limit=len(elf) - 1)
