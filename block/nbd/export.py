"""What an NBD server serves: an export (a block node under a name) and the dirty-bitmap view it may offer.

Kept apart from the server so that QMP's ``block-export-add``, ``pyemu-nbd`` and tests describe exports the
same way, and so the server depends only on a tiny :class:`DirtyBitmapSource` protocol instead of the block
layer's bitmap implementation: anything that can say how long the clean or dirty run at an offset is (the real qcow2-backed bitmap, a fake in
a test) can be exported as ``qemu:dirty-bitmap:NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pyemu.block.driver import BlockDriver
from pyemu.block.errors import BlockConfigError
from pyemu.block.nbd.protocol import MAX_STRING


@runtime_checkable
class DirtyBitmapSource(Protocol):
    """A dirty bitmap as the NBD server sees it."""

    @property
    def name(self) -> str: ...

    @property
    def granularity(self) -> int: ...

    def extent_at(self, offset: int, length: int) -> tuple[bool, int]:
        """(dirty?, run length) of the run starting at ``offset``, at most ``length`` bytes (0 only past the
        end). :class:`pyemu.block.dirty_bitmap.DirtyBitmap` has exactly this method."""
        ...


@dataclass(frozen=True, eq=False)
class NbdExport:
    """``node`` exported as ``name``. ``writable`` False refuses writes, trims and write-zeroes with EPERM;
    ``multi_conn`` advertises NBD_FLAG_CAN_MULTI_CONN (safe here: a flush on any connection flushes the one
    node every connection writes to)."""

    name: str
    node: BlockDriver
    description: str = ""
    writable: bool = False
    bitmaps: tuple[DirtyBitmapSource, ...] = field(default_factory=tuple)
    multi_conn: bool = True

    def __post_init__(self) -> None:
        if len(self.name.encode("utf-8")) > MAX_STRING:
            raise BlockConfigError(f"export name is longer than {MAX_STRING} bytes", option=None)
        if len(self.description.encode("utf-8")) > MAX_STRING:
            raise BlockConfigError(f"export description is longer than {MAX_STRING} bytes", option=None)
        if self.writable and self.node.read_only:
            raise BlockConfigError(f"Cannot export '{self.node.filename}' writable: the node is read-only",
                                   option=None)
        names = [b.name for b in self.bitmaps]
        if len(set(names)) != len(names):
            raise BlockConfigError("the same bitmap is exported twice", option=None)
        object.__setattr__(self, "bitmaps", tuple(self.bitmaps))

    def bitmap(self, name: str) -> DirtyBitmapSource | None:
        for bitmap in self.bitmaps:
            if bitmap.name == name:
                return bitmap
        return None
