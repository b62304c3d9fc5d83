"""Extracting the ELF ``vmlinux`` from a bzImage, for PVH boot.

Debian ships only the bzImage, but the ELF kernel (which carries the PVH entry note) is inside it: the
setup header's ``payload_offset``/``payload_length`` (protocol 2.08+) locate the compressed kernel
within the protected-mode part, and its first bytes say the compression. Debian's 6.1 uses xz (with the
x86 BCJ filter), which Python's ``lzma`` decodes; the kernel build appends the uncompressed size (4
bytes) after the stream, which the decoder leaves as unused data.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

from pyemu.guest.errors import KernelExtractError
from pyemu.target.x86.boot.bzimage import HEAD_BYTES, parse_setup_header
from pyemu.target.x86.boot.errors import BootError

ELF_MAGIC = b"\x7fELF"


# The most a payload may decompress to. Debian's 6.1 kernel is ~60 MB; a kernel larger than this could not
# run in the guest RAM pyemu boots it with either, and a hostile bzImage ("zip bomb") must not make the
# host allocate gigabytes before anything checks it.
MAX_KERNEL_BYTES = 512 << 20


def _bounded(output: bytes, limit: int) -> bytes:
    if len(output) > limit:
        raise KernelExtractError(f"the kernel payload decompresses to more than {limit} bytes (the limit for a kernel)")
    return output


def _decompress_xz(data: bytes, limit: int) -> bytes:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    output = _bounded(decoder.decompress(data, max_length=limit + 1), limit)
    if not decoder.eof:
        raise KernelExtractError("the xz payload ends before its stream does")
    return output


def _decompress_lzma(data: bytes, limit: int) -> bytes:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    return _bounded(decoder.decompress(data, max_length=limit + 1), limit)


def _decompress_gzip(data: bytes, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits=31)
    output = _bounded(decoder.decompress(data, limit + 1), limit)
    if not decoder.eof:
        raise KernelExtractError("the gzip payload ends before its stream does")
    return output


def _decompress_zstd(data: bytes, limit: int) -> bytes:
    tool = shutil.which("zstd")
    if tool is None:
        raise KernelExtractError("the kernel payload is zstd-compressed and the 'zstd' tool is not installed")
    # The kernel appends the size after the frame; zstd stops at the end of the frame. The output is read
    # through a pipe up to the limit, so an oversized frame stops the tool instead of filling the host.
    # Its messages go to a file, not a second pipe, so a chatty tool cannot block while this reads stdout.
    with tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as messages:
        source.write(data)
        source.seek(0)
        with subprocess.Popen([tool, "-dc", "-q"], stdin=source, stdout=subprocess.PIPE,
                              stderr=messages) as process:
            assert process.stdout is not None
            output = process.stdout.read(limit + 1)
            if len(output) > limit:
                process.kill()
                process.wait()
                return _bounded(output, limit)
            status = process.wait(timeout=300)
        messages.seek(0)
        errors = messages.read()
    if status != 0 and not output:
        raise KernelExtractError(f"zstd could not decompress the payload: {errors.decode(errors='replace')}")
    return output


_DECODERS = (
    (b"\xfd7zXZ\x00", "xz", _decompress_xz),
    (b"\x1f\x8b", "gzip", _decompress_gzip),
    (b"\x28\xb5\x2f\xfd", "zstd", _decompress_zstd),
    (b"\x5d\x00\x00", "lzma", _decompress_lzma),
)


def payload_compression(payload: bytes) -> str:
    for magic, name, _ in _DECODERS:
        if payload.startswith(magic):
            return name
    return "unknown"


def extract_vmlinux(bzimage: bytes, *, name: str = "bzImage", limit: int = MAX_KERNEL_BYTES) -> bytes:
    """The ELF kernel inside ``bzimage`` (the whole file's bytes); KernelExtractError when it is corrupt,
    in an unknown format, or larger than ``limit`` bytes once decompressed."""
    try:
        header = parse_setup_header(bzimage[:HEAD_BYTES], file_size=len(bzimage), path=name)
        offset, length = header.payload_range()
    except BootError as exc:
        raise KernelExtractError(f"cannot find the kernel payload in {name}: {exc}") from exc
    payload = bzimage[offset : offset + length]
    for magic, kind, decoder in _DECODERS:
        if payload.startswith(magic):
            try:
                elf = decoder(payload, limit)
            except (lzma.LZMAError, zlib.error) as exc:
                raise KernelExtractError(f"the {kind} payload of {name} is corrupt: {exc}") from exc
            break
    else:
        raise KernelExtractError(
            f"the payload of {name} uses a compression we cannot decode (starts {payload[:6].hex()})"
        )
    if not elf.startswith(ELF_MAGIC):
        raise KernelExtractError(f"the decompressed payload of {name} is not an ELF file")
    return elf


def extract_vmlinux_file(bzimage_path: Path, output: Path) -> int:
    """Write the ELF kernel from the bzImage at ``bzimage_path`` to ``output``; returns its size."""
    elf = extract_vmlinux(bzimage_path.read_bytes(), name=str(bzimage_path))
    output.write_bytes(elf)
    return len(elf)
