"""Placing the initrd: as high as the protocol allows, in free RAM, page-aligned.

High placement is what QEMU and the boot protocol's own advice do: it leaves the low RAM to the kernel's
decompressor and KASLR, which steer around the initrd anyway.
"""

from __future__ import annotations

import os

from pyemu.target.x86.boot.errors import ImageTooLargeError
from pyemu.target.x86.boot.image import ImageFile
from pyemu.target.x86.boot.layout import HIGH_MEMORY_START, BootPlan, Placement

INITRD_ALIGN = 0x1000


def place_initrd(
    plan: BootPlan, initrd_path: str | os.PathLike[str], *, limit: int, align: int = INITRD_ALIGN
) -> Placement | None:
    """Copy the initrd into the highest free RAM ending at or below ``limit``; None for an empty file."""
    with ImageFile(initrd_path, "initrd") as image:
        if image.size == 0:
            return None
        addr = plan.highest_fit(image.size, align=align, floor=HIGH_MEMORY_START, limit=limit)
        if addr is None:
            largest = max((end - start for start, end in plan.free_ranges(HIGH_MEMORY_START, limit)), default=0)
            raise ImageTooLargeError(
                f"initrd '{image.path}' ({image.size} bytes, {image.size / 2**20:.1f} MiB) does not fit in "
                f"guest RAM below {limit:#x}: the largest free range is {largest / 2**20:.1f} MiB "
                "(give the machine more memory with -m)",
                path=image.path,
            )
        placement = plan.reserve("initrd", addr, image.size, error=ImageTooLargeError)
        image.copy_to_memory(plan.memory, addr, 0, image.size, what="initrd")
        return placement
