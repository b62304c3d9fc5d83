"""``pyemu-img measure [--output=human|json] [-O fmt] [-o options] (--size N | [-f fmt] filename)``.

How large a new image file would be: "required size" (for the data an existing image actually holds, or
none with ``--size``) and "fully allocated size" (every cluster written). For qcow2 this is the layout's
arithmetic -- one header cluster, the L2 tables for every cluster of the disk, the L1 table, and refcount
blocks plus refcount table for all of those clusters including themselves -- computed the way qemu-img does
(metadata for the whole disk is always counted, data only where the source has some). raw needs exactly the
virtual size.
"""

from __future__ import annotations

from pyemu.block.driver import BlockDriver
from pyemu.img import qjson
from pyemu.img.chain import extents
from pyemu.img.createopts import CREATE_OPTIONS, OptionSet
from pyemu.img.errors import ImgError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import check_format, format_of, opened
from pyemu.img.info import output_format
from pyemu.img.sizes import parse_image_size

SPEC = OptionSpec("O:f:ho:", ("output=", "size="))

L1_ENTRY = 8
MAX_L1_ENTRIES = (32 << 20) // L1_ENTRY  # the L1 table may not exceed 32 MiB


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def refcount_metadata_clusters(clusters: int, cluster_size: int, refcount_bits: int) -> int:
    """Refcount blocks + refcount table clusters needed to count ``clusters`` clusters plus themselves.

    The refcount structures need refcounts too, so iterate until the count stops changing (it converges
    after a couple of rounds because each block covers thousands of clusters).
    """
    per_block = cluster_size * 8 // refcount_bits
    per_table_cluster = cluster_size // 8
    blocks = table = 0
    while True:
        new_blocks = -(-(clusters + blocks + table) // per_block)
        new_table = -(-new_blocks // per_table_cluster)
        if (new_blocks, new_table) == (blocks, table):
            return blocks + table
        blocks, table = new_blocks, new_table


def qcow2_fully_allocated(size: int, cluster_size: int, refcount_bits: int, extended_l2: bool) -> int:
    """Bytes of a qcow2 file of virtual ``size`` with every cluster (and all metadata) allocated."""
    data = round_up(size, cluster_size)
    l2_entry = 16 if extended_l2 else 8
    meta = cluster_size  # header
    l2_entries = round_up(data // cluster_size, cluster_size // l2_entry)
    meta += l2_entries * l2_entry
    l1_entries = round_up(l2_entries * l2_entry // cluster_size, cluster_size // L1_ENTRY)
    meta += l1_entries * L1_ENTRY
    meta += refcount_metadata_clusters((meta + data) // cluster_size, cluster_size, refcount_bits) * cluster_size
    return meta + data


def data_bytes(node: BlockDriver, cluster_size: int) -> int:
    """Bytes of the clusters that hold data in ``node`` (through its backing chain)."""
    clusters: set[int] = set()
    total = 0
    for ext in extents(node, 0, node.size()):
        if ext.data and ext.present:
            first = ext.start // cluster_size
            last = (ext.end - 1) // cluster_size
            for c in range(first, last + 1):
                if c not in clusters:
                    clusters.add(c)
                    total += cluster_size
    return total


def _qcow2_params(options: OptionSet) -> tuple[int, int, bool, str]:
    cs = options.get_int("cluster_size", 65536)
    if cs & (cs - 1) or not 512 <= cs <= 2 << 20:
        raise ImgError("Cluster size must be a power of two between 512 and 2048k")
    bits = options.get_int("refcount_bits", 16)
    if bits <= 0 or bits & (bits - 1) or bits > 64:
        raise ImgError("Refcount width must be a power of two and may not exceed 64 bits")
    extended = bool(options.get("extended_l2", False))
    if extended and cs < 16384:
        raise ImgError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    prealloc = options.get_str("preallocation", "off")
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise ImgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    return cs, bits, extended, prealloc


def measure(out_fmt: str, options: OptionSet, size: int | None, source: BlockDriver | None) -> dict[str, int]:
    if source is not None:
        size = round_up(source.size(), 512)
    assert size is not None
    if out_fmt == "raw":
        prealloc = options.get_str("preallocation", "off")
        if prealloc not in ("off", "falloc", "full"):
            raise ImgError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        return {"required": size, "fully-allocated": size}
    cs, bits, extended, prealloc = _qcow2_params(options)
    l2_entries_per_table = cs // (16 if extended else 8)
    if -(-size // cs) > MAX_L1_ENTRIES * l2_entries_per_table:
        raise ImgError("The image size is too large (try using a larger cluster size)")
    full = qcow2_fully_allocated(size, cs, bits, extended)
    if prealloc in ("falloc", "full"):
        data = round_up(size, cs)
    else:
        data = data_bytes(source, cs) if source is not None else 0
    result = {"required": full - round_up(size, cs) + data, "fully-allocated": full}
    if source is not None and format_of(source) == "qcow2":
        result["bitmaps"] = 0
    return result


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    ofmt = output_format(p.last("--output"))
    out_fmt = check_format(p.last("-O", default="raw"))
    assert out_fmt is not None
    size_text = p.last("--size")
    if size_text is not None and p.args:
        raise ImgError("--size N cannot be used together with a filename.")
    if size_text is None and len(p.args) != 1:
        raise ImgError("Either --size N or one filename must be specified.")
    options = OptionSet(CREATE_OPTIONS[out_fmt], p.all("-o"))
    if size_text is not None:
        result = measure(out_fmt, options, parse_image_size(size_text), None)
    else:
        with opened(p.args[0], fmt=check_format(p.last("-f"))) as node:
            result = measure(out_fmt, options, None, node)
    if ofmt == "json":
        out: dict[str, int] = {}
        if "bitmaps" in result:
            out["bitmaps"] = result["bitmaps"]
        out["required"] = result["required"]
        out["fully-allocated"] = result["fully-allocated"]
        print(qjson.dumps(out))
    else:
        print(f"required size: {result['required']}")
        print(f"fully allocated size: {result['fully-allocated']}")
        if "bitmaps" in result:
            print(f"bitmaps size: {result['bitmaps']}")
    return 0
