"""Compressed clusters: raw deflate (zlib's format without header, 4 KiB window) as qcow2's default
compression type stores them. Decompression is bounded: a hostile stream cannot produce more than one
cluster, and a stream that ends early or is garbage is a corruption, not a traceback."""

from __future__ import annotations

import zlib

WINDOW_BITS = -12


class DecompressionError(ValueError):
    pass


def decompress_cluster(data: bytes, cluster_size: int) -> bytes:
    """Inflate ``data`` into exactly ``cluster_size`` bytes (trailing bytes after the stream are ignored)."""
    try:
        inflater = zlib.decompressobj(WINDOW_BITS)
        out = inflater.decompress(data, cluster_size)
    except zlib.error as exc:
        raise DecompressionError(f"invalid compressed data ({exc})") from None
    if len(out) != cluster_size:
        raise DecompressionError(f"compressed cluster inflates to {len(out)} bytes, not {cluster_size}")
    return out


def compress_cluster(data: bytes | memoryview) -> bytes | None:
    """Deflate one cluster; None when compressing does not save at least one 512-byte sector (the caller
    then stores it uncompressed, as qemu-img does)."""
    deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, WINDOW_BITS, 9)
    out = deflater.compress(data) + deflater.flush()
    if len(out) > len(data) - 512:
        return None
    return out
