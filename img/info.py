"""``pyemu-img info [-f fmt] [--output=human|json] [--backing-chain] [-U] filename``.

The image is opened without its backing chain (as qemu-img does), so ``info`` works on an overlay whose
backing file is missing; ``--backing-chain`` then follows the backing file names one image at a time.
JSON keys, their order and the human layout (including the "Snapshot list:" table, shared with
``snapshot -l``) are qemu-img 7.2's.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pyemu.block.driver import BlockDriver
from pyemu.img import qjson
from pyemu.img.errors import ImgError, UsageError
from pyemu.img.getopts import OptionSpec, parse
from pyemu.img.images import actual_size, as_qcow2, check_format, close_quietly, format_of, open_image
from pyemu.img.sizes import format_size

SPEC = OptionSpec("f:hU", ("output=", "backing-chain", "force-share"))

SNAPSHOT_HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def output_format(value: str | None) -> str:
    """``--output``: human (default) or json."""
    if value is None or value == "human":
        return "human"
    if value == "json":
        return "json"
    raise UsageError("--output must be used with human or json as argument.")


def compression_name(header: Any) -> str:
    value = getattr(header, "compression_type", "zlib")
    if isinstance(value, int):
        return {0: "zlib", 1: "zstd"}.get(value, str(value))
    return str(value)


def full_backing_filename(filename: str, backing: str) -> str:
    """The backing file name resolved against the overlay's directory (qemu-img's full-backing-filename)."""
    if os.path.isabs(backing):
        return backing
    directory = os.path.dirname(filename)
    return os.path.join(directory, backing) if directory else backing


# -- snapshots -------------------------------------------------------------------------------------------


def snapshot_dict(sn: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    icount = getattr(sn, "icount", None)
    if icount is not None:
        out["icount"] = icount
    out["vm-clock-nsec"] = sn.vm_clock_nsec % 1_000_000_000
    out["name"] = sn.name
    out["date-sec"] = sn.date_sec
    out["date-nsec"] = sn.date_nsec
    out["vm-clock-sec"] = sn.vm_clock_nsec // 1_000_000_000
    out["id"] = sn.id
    out["vm-state-size"] = sn.vm_state_size
    return out


def snapshot_line(sn: Any) -> str:
    """One row of the snapshot table."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    msecs = sn.vm_clock_nsec // 1_000_000
    secs, ms = divmod(msecs, 1000)
    mins, secs = divmod(secs, 60)
    hours, mins = divmod(mins, 60)
    clock = f"{hours:02d}:{mins:02d}:{secs:02d}.{ms:03d}"
    icount = "" if getattr(sn, "icount", None) is None else str(sn.icount)
    return (f"{sn.id:<9} {sn.name:<16} {format_size(sn.vm_state_size):>8}{date:>20}{clock:>13}"
            f"{icount:>11}")


def snapshot_table(snapshots: list[Any]) -> list[str]:
    return ["Snapshot list:", SNAPSHOT_HEADER, *(snapshot_line(sn) for sn in snapshots)]


# -- one image -------------------------------------------------------------------------------------------


def image_info(node: BlockDriver, filename: str) -> dict[str, Any]:
    """qemu-img's ImageInfo for an opened node, as a dict in QEMU's insertion order."""
    info: dict[str, Any] = {}
    image = as_qcow2(node)
    header = image.header if image is not None else None
    snapshots = image.snapshots() if image is not None else []
    if snapshots:
        info["snapshots"] = [snapshot_dict(sn) for sn in snapshots]
    size = node.size()
    if header is None:
        size = -(-size // 512) * 512  # qemu-img sees raw files in whole 512-byte sectors
    info["virtual-size"] = size
    info["filename"] = filename
    if header is not None:
        info["cluster-size"] = header.cluster_size
    info["format"] = format_of(node)
    disk = actual_size(filename)
    if disk >= 0:
        info["actual-size"] = disk
    if header is not None:
        info["format-specific"] = {"type": "qcow2", "data": qcow2_specific(header, bitmap_info_list(node))}
        backing = getattr(header, "backing_file", None)
        if backing:
            info["full-backing-filename"] = full_backing_filename(filename, backing)
            info["backing-filename"] = backing
            if getattr(header, "backing_format", None):
                info["backing-filename-format"] = header.backing_format
        info["dirty-flag"] = bool(getattr(header, "dirty", False))
    else:
        info["dirty-flag"] = False
    return info


def qcow2_specific(header: Any, bitmaps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """ImageInfoSpecificQCow2; ``bitmaps`` (persistent bitmaps as stored) is listed only when there are
    some, as qemu-img does."""
    data: dict[str, Any] = {}
    version = header.version
    data["compat"] = "0.10" if version == 2 else "1.1"
    if getattr(header, "data_file", None):
        data["data-file"] = header.data_file
    data["compression-type"] = compression_name(header)
    if version >= 3:
        data["lazy-refcounts"] = bool(header.lazy_refcounts)
    if bitmaps:
        data["bitmaps"] = bitmaps
    data["refcount-bits"] = header.refcount_bits
    if version >= 3:
        data["corrupt"] = bool(header.corrupt)
        data["extended-l2"] = bool(header.extended_l2)
    return data


def bitmap_info_list(node: BlockDriver) -> list[dict[str, Any]]:
    from pyemu.block.qcow2.bitmaps import info_list
    return info_list(node)  # type: ignore[arg-type]


def human(info: dict[str, Any]) -> str:
    lines = [f"image: {info['filename']}",
             f"file format: {info['format']}",
             f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {format_size(info['actual-size']) if 'actual-size' in info else 'unavailable'}"]
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        if info["full-backing-filename"] != info["backing-filename"]:
            line += f" (actual path: {info['full-backing-filename']})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.extend(snapshot_table([_SnapshotView(s) for s in info["snapshots"]]))
    if "format-specific" in info:
        lines.append("Format specific information:")
        _human_value(info["format-specific"]["data"], 1, lines)
    return "\n".join(lines)


def _human_value(value: Any, level: int, lines: list[str]) -> None:
    """qemu-img's human dump of nested data: ``key: value``, lists as ``[i]:``, four spaces a level."""
    pad = "    " * level
    items = qjson.ordered_items(value) if isinstance(value, dict) else \
        [(f"[{i}]", v) for i, v in enumerate(value)]
    for key, item in items:
        label = key.replace("-", " ") if isinstance(value, dict) else key
        if isinstance(item, (dict, list)):
            lines.append(f"{pad}{label}:")
            _human_value(item, level + 1, lines)
        else:
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            lines.append(f"{pad}{label}: {text}")


class _SnapshotView:
    """A snapshot dict of :func:`snapshot_dict` seen with SnapshotInfo's attribute names."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.id = d["id"]
        self.name = d["name"]
        self.vm_state_size = d["vm-state-size"]
        self.date_sec = d["date-sec"]
        self.date_nsec = d["date-nsec"]
        self.vm_clock_nsec = d["vm-clock-sec"] * 1_000_000_000 + d["vm-clock-nsec"]
        self.icount = d.get("icount")


def collect(filename: str, fmt: str | None, *, chain: bool, force_share: bool) -> list[dict[str, Any]]:
    infos: list[dict[str, Any]] = []
    seen: set[str] = set()
    name: str | None = filename
    while name is not None:
        real = os.path.realpath(name)
        if real in seen:
            raise ImgError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(real)
        node = open_image(name, fmt=fmt, backing=False, force_share=force_share)
        try:
            info = image_info(node, name)
        finally:
            close_quietly(node)
        infos.append(info)
        if not chain or "backing-filename" not in info:
            break
        name = info["full-backing-filename"]
        fmt = info.get("backing-filename-format")
    return infos


def run(argv: list[str]) -> int:
    p = parse(argv, SPEC)
    ofmt = output_format(p.last("--output"))
    fmt = check_format(p.last("-f"))
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    chain = p.has("--backing-chain")
    infos = collect(p.args[0], fmt, chain=chain, force_share=p.has("-U", "--force-share"))
    if ofmt == "json":
        print(qjson.dumps(infos if chain else infos[0]))
    else:
        print("\n\n".join(human(info) for info in infos))
    return 0
