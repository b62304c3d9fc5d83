"""Opening an image that lives on an NBD server: the ``nbd`` protocol node plus the format node on top.

:func:`pyemu.block.image.open_image` hands NBD URLs here, so ``-drive file=nbd://...``, ``pyemu-img`` and
``blockdev-add`` build the same graph QEMU does: raw (or qcow2, read from the export) over ``nbd``. The
format is probed from the export's first bytes when not given, exactly as for a local file.
"""

from __future__ import annotations

from typing import Callable

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockConfigError
from pyemu.block.nbd.client import NbdClient
from pyemu.block.nbd.uri import NbdTarget, parse_nbd_url

PROTOCOL_FORMATS = ("nbd", "file")
"""Format names meaning "the protocol node itself, no format node on top"."""


def probe_nbd_format(node: BlockDriver) -> str:
    from pyemu.block.qcow2.layout import MAGIC

    head = bytearray(min(4, node.size()))
    if head:
        node.preadv(0, [memoryview(head)])
    return "qcow2" if bytes(head) == MAGIC else "raw"


def open_nbd_image(target: str | NbdTarget, *, format: str | None = None, read_only: bool = True,
                   reconnect_delay: float = 0.0,
                   open_backing: Callable[[object], BlockDriver | None] | None = None) -> BlockDriver:
    """Connect to the export and open ``format`` (probed when None; "nbd" for the bare protocol node)
    over it. Raises BlockConfigError when the server cannot be reached or the export is missing."""
    nbd_target = parse_nbd_url(target) if isinstance(target, str) else target
    node = NbdClient.open(nbd_target, read_only=read_only, reconnect_delay=reconnect_delay)
    try:
        fmt = format if format is not None else probe_nbd_format(node)
        if fmt in PROTOCOL_FORMATS:
            return node
        if fmt == "raw":
            from pyemu.block.raw import RawFormat
            return RawFormat(node)
        if fmt == "qcow2":
            from pyemu.block.qcow2.driver import Qcow2Format
            return Qcow2Format.open(node, read_only=read_only, open_backing=open_backing)
        raise BlockConfigError(f"Unknown driver '{fmt}'", option=None)
    except BaseException:
        node.close()
        raise
