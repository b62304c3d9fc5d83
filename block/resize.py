"""Online resize of a block node (QEMU's ``bdrv_co_truncate``, what ``block_resize`` does).

Each driver knows how it changes size -- the file protocol truncates the host file, raw resizes its child
(and follows it: its size is the child's), qcow2 rewrites its header and L1 table -- so this module only
dispatches, refuses what QEMU refuses (negative sizes, read-only nodes, drivers without a resize) and, once
the graph has its new size, tells the devices whose drive grew (:func:`notify_backends`): a virtio-blk
device then puts the new capacity into its configuration space and raises a config-change interrupt, which
is how the guest learns its disk grew.

The caller drains the drives first (no request may be between two sizes) and checks the graph permissions.
"""

from __future__ import annotations

import errno
from typing import Any, Iterable

from pyemu.block.errors import BlockError, BlockIOError
from pyemu.block.qcow2.resize import ImageOperationError

BDRV_MAX_LENGTH = 0x7FFF_FFFF_C000_0000
"""QEMU's largest node length (INT64_MAX aligned down to its largest request): bigger sizes are refused."""


class ResizeError(BlockError):
    """A resize the node cannot do (QEMU's message)."""

    def __init__(self, message: str, *, errno: int = errno.ENOTSUP) -> None:
        super().__init__(message)
        self.errno = errno


def resize_node(node: Any, size: int) -> None:
    """Make ``node`` ``size`` bytes long, or raise a :class:`BlockError` with QEMU's message.

    Filters (copy-before-write, throttle, copy-on-read: anything with a ``filtered_child``) have no size of
    their own and pass the resize to their child, as QEMU's filters do."""
    if size < 0:
        raise ResizeError("Image size cannot be negative", errno=errno.EINVAL)
    if size > BDRV_MAX_LENGTH:
        raise ResizeError(f"offset({size}) exceeds maximum({BDRV_MAX_LENGTH})", errno=errno.EFBIG)
    if node.read_only:
        raise ResizeError("Image is read-only", errno=errno.EACCES)
    own = getattr(node, "resize", None)
    if callable(own):
        own(size)
        return
    truncate = getattr(node, "truncate", None)
    if callable(truncate) and getattr(node, "name", "") == "qcow2":
        # block_resize may shrink a qcow2 image (qemu-img resize asks for --shrink, QMP does not).
        try:
            truncate(size, shrink=True)
        except ImageOperationError as exc:
            if exc.errno == errno.EFBIG:  # too large for the L1 table: QEMU's words
                raise ResizeError("Failed to grow the L1 table: File too large", errno=errno.EFBIG) from None
            raise
        return
    child = getattr(node, "filtered_child", None)
    if child is not None:
        resize_node(getattr(child, "node", child), size)
        return
    raise ResizeError("Image format driver does not support resize")


def notify_backends(backends: Iterable[Any]) -> None:
    """Tell every drive's device that its size may have changed (each compares with what it last saw)."""
    for backend in backends:
        check = getattr(backend, "check_resized", None)
        if callable(check):
            try:
                check()
            except BlockIOError:
                continue  # a closed drive has no device to tell
