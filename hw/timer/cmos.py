"""Board-side CMOS contents: where a PC firmware (or Linux) looks for the memory size in the RTC's RAM.

The RTC model only stores bytes; which bytes mean what is a board convention. QEMU's pc and microvm
boards write these so that firmware such as SeaBIOS or qboot finds the RAM size without probing;
:func:`pc_cmos_memory_layout` produces the same layout from the board's RAM split.
"""

from __future__ import annotations

from pyemu.hw.timer.errors import TimerDeviceError

KIB = 1024
MIB = 1024 * KIB

CMOS_BASE_MEMORY_KB = 0x15  # 0x15/0x16: conventional memory in KiB (640)
CMOS_EXTENDED_MEMORY_KB = 0x17  # 0x17/0x18: KiB above 1 MiB, up to 65535
CMOS_EXTENDED_MEMORY_KB_COPY = 0x30  # 0x30/0x31: the same value, as the POST copy
CMOS_MEMORY_ABOVE_16M = 0x34  # 0x34/0x35: 64 KiB units between 16 MiB and the end of low RAM
CMOS_MEMORY_ABOVE_4G = 0x5B  # 0x5b-0x5d: 64 KiB units above 4 GiB (24 bits)
CMOS_CPU_COUNT_MINUS_ONE = 0x5F


def pc_cmos_memory_layout(ram_below_4g: int, ram_above_4g: int = 0, *, cpus: int = 1) -> dict[int, int]:
    """CMOS bytes describing ``ram_below_4g``/``ram_above_4g`` bytes of RAM and ``cpus`` CPUs."""
    if ram_below_4g < 0 or ram_above_4g < 0 or cpus < 1:
        raise TimerDeviceError(
            f"cmos: invalid memory layout below_4g={ram_below_4g} above_4g={ram_above_4g} cpus={cpus}",
            device="rtc",
        )
    contents: dict[int, int] = {}

    def put16(index: int, value: int) -> None:
        contents[index] = value & 0xFF
        contents[index + 1] = (value >> 8) & 0xFF

    put16(CMOS_BASE_MEMORY_KB, 640)
    extended_kb = min(max(ram_below_4g // KIB - 1024, 0), 0xFFFF)
    put16(CMOS_EXTENDED_MEMORY_KB, extended_kb)
    put16(CMOS_EXTENDED_MEMORY_KB_COPY, extended_kb)
    above_16m = min(max(ram_below_4g - 16 * MIB, 0) // (64 * KIB), 0xFFFF)
    put16(CMOS_MEMORY_ABOVE_16M, above_16m)
    above_4g = min(ram_above_4g // (64 * KIB), 0xFFFFFF)
    for i in range(3):
        contents[CMOS_MEMORY_ABOVE_4G + i] = (above_4g >> (8 * i)) & 0xFF
    contents[CMOS_CPU_COUNT_MINUS_ONE] = min(cpus - 1, 0xFF)
    return contents
