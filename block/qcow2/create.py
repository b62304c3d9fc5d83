"""Creating qcow2 images (``pyemu-img create -f qcow2``, ``-snapshot`` overlays).

The file starts as QEMU lays it out -- header in cluster 0, refcount table in cluster 1, the first refcount
block in cluster 2 -- and everything after that (the L1 table, preallocated tables and data) is allocated by
the driver itself, so creation cannot disagree with what the driver later considers valid.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from pyemu.block.errors import BlockConfigError
from pyemu.block.hostio import zero_chunks
from pyemu.block.qcow2.header import Qcow2Header, serialize_header
from pyemu.block.qcow2.layout import (FLAG_COPIED, MAX_CLUSTER_BITS, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS, Compatible,
                                      Incompatible)
from pyemu.block.qcow2.refcount import RefcountBlock

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


class CreateError(BlockConfigError):
    """Options that cannot make an image (QEMU's messages)."""

    def __init__(self, message: str, *, errno: int | None = errno.EINVAL) -> None:
        super().__init__(message, option=None, errno=errno)


@dataclass(frozen=True)
class Qcow2CreateOptions:
    size: int
    cluster_size: int = 65536
    compat: str = "1.1"
    backing_file: str | None = None
    backing_format: str | None = None
    extended_l2: bool = False
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    preallocation: str = "off"

    def __post_init__(self) -> None:
        cs = self.cluster_size
        if cs & (cs - 1) or not (1 << MIN_CLUSTER_BITS) <= cs <= (1 << MAX_CLUSTER_BITS):
            raise CreateError("Cluster size must be a power of two between 512 and 2048k")
        if self.compat not in ("0.10", "v2", "1.1", "v3"):
            raise CreateError(f"Invalid compatibility level: '{self.compat}'")
        if self.refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
            raise CreateError("Refcount width must be a power of two and may not exceed 64 bits")
        if self.version == 2:
            if self.refcount_bits != 16:
                raise CreateError("Different refcount widths than 16 bits require compatibility level 1.1 or "
                                  "above (use compat=1.1 or greater)")
            if self.lazy_refcounts:
                raise CreateError("Lazy refcounts only supported with compatibility level 1.1 and above (use "
                                  "compat=1.1 or greater)")
            if self.extended_l2:
                raise CreateError("Extended L2 entries are only supported with compatibility level 1.1 and "
                                  "above (use compat=1.1 or greater)")
        if self.extended_l2 and cs < 16384:
            raise CreateError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        if self.preallocation not in PREALLOCATION_MODES:
            raise CreateError(f"Invalid parameter '{self.preallocation}' for preallocation (expected off, "
                              "metadata, falloc or full)")
        if self.backing_file and self.preallocation != "off" and not self.extended_l2:
            raise CreateError("Backing file and preallocation can only be used at the same time if extended_l2 "
                              "is on")
        if not 0 <= self.size <= MAX_VIRTUAL_SIZE:
            raise CreateError(f"Image size must be between 0 and {MAX_VIRTUAL_SIZE} bytes")
        if self.size % 512:
            raise CreateError("Image size must be a multiple of 512 bytes")
        if self.backing_format and not self.backing_file:
            raise CreateError("Backing format cannot be used without backing file")

    @property
    def version(self) -> int:
        return 2 if self.compat in ("0.10", "v2") else 3


def create_qcow2(filename: str, size: int | None, *, cluster_size: int = 65536, compat: str = "1.1",
                 backing_file: str | None = None, backing_format: str | None = None, extended_l2: bool = False,
                 lazy_refcounts: bool = False, refcount_bits: int = 16, preallocation: str = "off") -> None:
    """Create (or truncate) ``filename`` as an empty qcow2 image of ``size`` bytes; with ``size`` None and a
    backing file, the image takes the backing file's size."""
    if size is None or size < 0:
        if not backing_file:
            raise CreateError("Image creation needs a size parameter")
        size = backing_size(filename, backing_file, backing_format)
    opts = Qcow2CreateOptions(size=size, cluster_size=cluster_size, compat=compat, backing_file=backing_file,
                              backing_format=backing_format, extended_l2=extended_l2,
                              lazy_refcounts=lazy_refcounts, refcount_bits=refcount_bits,
                              preallocation=preallocation)
    cs = opts.cluster_size
    cluster_bits = cs.bit_length() - 1
    refcount_order = opts.refcount_bits.bit_length() - 1
    incompatible = Incompatible.EXTENDED_L2 if opts.extended_l2 else 0
    header = Qcow2Header(version=opts.version, cluster_bits=cluster_bits, size=0, l1_size=0, l1_table_offset=0,
                         refcount_table_offset=cs, refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0,
                         incompatible_features=int(incompatible),
                         compatible_features=int(Compatible.LAZY_REFCOUNTS) if opts.lazy_refcounts else 0,
                         refcount_order=refcount_order, backing_file=opts.backing_file,
                         backing_format=opts.backing_format)
    block = RefcountBlock(bytes(cs), refcount_order)
    for cluster in range(3):
        block.set(cluster, 1)
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CreateError(f"Could not create '{filename}': {os.strerror(exc.errno or errno.EIO)}",
                          errno=exc.errno) from exc
    try:
        os.pwrite(fd, serialize_header(header), 0)
        os.pwrite(fd, struct.pack(">Q", 2 * cs) + bytes(cs - 8), cs)
        os.pwrite(fd, block.to_bytes(), 2 * cs)
        os.fsync(fd)
    except OSError as exc:
        raise CreateError(f"Could not write '{filename}': {os.strerror(exc.errno or errno.EIO)}",
                          errno=exc.errno) from exc
    finally:
        os.close(fd)
    _finish(filename, opts)


def _finish(filename: str, opts: Qcow2CreateOptions) -> None:
    """Open the skeleton with the driver: L1 table for the size, then preallocation."""
    from pyemu.block.file import FileProtocol
    from pyemu.block.qcow2.driver import Qcow2Format
    from pyemu.block.qcow2.resize import grow_l1

    file = FileProtocol.open(filename, read_only=False, growable=True)
    image = Qcow2Format.open(file, read_only=False, open_backing=None)
    try:
        with image.gate.exclusive(), image._meta:
            entries = image.geometry.l1_entries_for(opts.size)
            if entries:
                grow_l1(image, entries)
            image.write_header_fields(size=opts.size)
            if opts.preallocation != "off":
                _preallocate(image, opts)
    finally:
        image.close()


def _preallocate(image, opts: Qcow2CreateOptions) -> None:
    """Allocate every L2 table and data cluster (metadata), plus host space (falloc) or zeros (full)."""
    cs = image.cluster_size
    clusters = -(-opts.size // cs)
    per_l2 = 1 << image.geometry.l2_bits
    # With extended L2 over a backing file the host clusters are reserved but the subclusters stay
    # unallocated, so the backing file still shows through (QEMU does the same).
    full_bitmap = 0xFFFF_FFFF if image.geometry.extended_l2 and not opts.backing_file else 0
    for l1_index in range(-(-clusters // per_l2)):
        image.map.writable_l2(l1_index)
        count = min(per_l2, clusters - l1_index * per_l2)
        host = image.refcounts.alloc(count)
        for i in range(count):
            vcluster = l1_index * per_l2 + i
            image.map.set_entry(vcluster, (host + i * cs) | FLAG_COPIED, full_bitmap)
        end = host + count * cs
        if image.file.size() < end:
            if opts.preallocation == "full":
                start = max(host, image.file.size())
                for pos, chunk in zero_chunks(start, end - start):
                    image.file.pwritev(pos, [chunk])
            else:
                image.file.truncate(end)
                if opts.preallocation == "falloc":
                    _fallocate(image.file, host, count * cs)
        image.quiesce_metadata()


def _fallocate(file, offset: int, length: int) -> None:
    from pyemu.block.hostio import fallocate
    try:
        fallocate(file._fd, 0, offset, length)
    except OSError:
        pass  # space reservation is best effort (QEMU falls back the same way on filesystems without it)


def backing_size(filename: str, backing_file: str, backing_format: str | None) -> int:
    from pyemu.block.image import open_image, resolve_backing
    path = resolve_backing(filename, backing_file)
    node = open_image(path, format=backing_format, read_only=True, locking="off")
    try:
        return node.size()
    finally:
        node.close()
