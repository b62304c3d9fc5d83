"""The kernel command line: encoding, the length check, and its place in low memory.

Every protocol passes the command line as a NUL-terminated string at a physical address; only the
length limit differs (the bzImage header's ``cmdline_size``; our 64 KiB area for PVH and multiboot).
A command line that does not fit is an error, never silently truncated: a cut-off ``root=`` or
``console=`` makes for a baffling boot failure.
"""

from __future__ import annotations

from pyemu.target.x86.boot.errors import CmdlineError, CmdlineTooLongError
from pyemu.target.x86.boot.layout import CMDLINE_ADDR, CMDLINE_AREA_SIZE, BootPlan


def encode_cmdline(cmdline: str, *, path: str | None = None) -> bytes:
    """UTF-8 bytes of ``cmdline``; a NUL inside would end the string early, so it is refused."""
    data = cmdline.encode("utf-8")
    if b"\0" in data:
        raise CmdlineError("the kernel command line contains a NUL character", path=path)
    return data


def place_cmdline(plan: BootPlan, cmdline: str, *, limit: int, path: str | None = None) -> int:
    """Write ``cmdline`` NUL-terminated at the fixed command-line address; returns that address.

    ``limit`` is the most bytes (without the NUL) the kernel accepts.
    """
    data = encode_cmdline(cmdline, path=path)
    limit = min(limit, CMDLINE_AREA_SIZE - 1)
    if len(data) > limit:
        who = f"kernel '{path}'" if path else "the kernel"
        raise CmdlineTooLongError(
            f"the command line is {len(data)} bytes but {who} accepts at most {limit}",
            path=path,
            length=len(data),
            limit=limit,
        )
    plan.reserve("command line", CMDLINE_ADDR, len(data) + 1)
    plan.memory.write(CMDLINE_ADDR, data + b"\0")
    return CMDLINE_ADDR
