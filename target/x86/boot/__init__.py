"""Direct kernel boot for x86 (no firmware): bzImage (64-bit entry), PVH and multiboot v1.

Boards call :func:`load_kernel` with their guest memory, e820 map and RSDP address, and load the returned
``BootResult.cpu`` into vCPU 0. The fixed low-memory layout is documented in :mod:`.layout`.
"""

from pyemu.target.x86.boot.e820 import E820Entry, E820Map, E820Type
from pyemu.target.x86.boot.errors import (
    BootError,
    CmdlineError,
    CmdlineTooLongError,
    ImageReadError,
    ImageTooLargeError,
    MemoryMapError,
    NotAKernelError,
    TruncatedImageError,
    UnsupportedProtocolError,
)
from pyemu.target.x86.boot.loader import KernelFormat, load_kernel, probe_kernel
from pyemu.target.x86.boot.result import BootResult

__all__ = [
    "BootError", "BootResult", "CmdlineError", "CmdlineTooLongError", "E820Entry", "E820Map", "E820Type",
    "ImageReadError", "ImageTooLargeError", "KernelFormat", "MemoryMapError", "NotAKernelError",
    "TruncatedImageError", "UnsupportedProtocolError", "load_kernel", "probe_kernel",
]
