"""Putting the host's memory in a known state before a timed run, the same for every tool compared.

Why, as measured on this project's hosts (a Firecracker guest, kernel 6.1x):

* Page cache not touched for a minute is paged out (a DAMON ``pageout`` scheme), so the first timed run
  after a pause would read its input from the disk while the tool run right after it finds it cached:
  :func:`read_through` the inputs first.
* Free memory goes back to the hypervisor about 2 s after it is freed (virtio-balloon free page
  reporting). A process's first touch of such memory then costs ~2 ms per MiB instead of ~0.1 ms: 256 MiB
  touched right after 256 MiB was freed took 24 ms, the same 3 s later 530 ms. A boot's figure then
  depended on what ran before it -- a VMM started right after a bigger process ran on warm memory, one
  started after a pause or after a smaller process paid ~0.2-0.3 s of host page clearing (seen as 13% vs
  1.8% of the samples in ``clear_page_erms``, for two boots of the same length). :func:`warm_free_memory`
  before each run gives every tool warm memory, as a host without free page reporting always does.
"""

from __future__ import annotations

import mmap
from pathlib import Path

PAGE = 4096
WARM_MIB = 768
"""More than any emulator compared here touches in one run (QEMU's PVH boot: ~240 MiB resident)."""


def read_through(path: Path) -> None:
    """Read ``path`` once, so that it sits in the host's page cache."""
    with open(path, "rb") as handle:
        while handle.read(8 << 20):
            pass


def warm_free_memory(mib: int = WARM_MIB) -> None:
    """Touch ``mib`` MiB of fresh anonymous memory (in huge pages where the host gives them, as the VMMs
    ask for guest RAM) and free it again, so the next process's first ``mib`` MiB are backed by the
    hypervisor already. Untimed; ~25 ms per 256 MiB when warm, ~0.5 s when cold. At most half of what
    the kernel says is available is touched, so a small machine is not pushed into reclaim."""
    size = min(mib, available_mib() // 2) << 20
    if size <= 0:
        return
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            area.madvise(mmap.MADV_HUGEPAGE)
        for offset in range(0, size, PAGE):
            area[offset] = 1
    finally:
        area.close()


def available_mib(meminfo: str = "/proc/meminfo") -> int:
    """``MemAvailable`` in MiB (0 where the file or the line is missing: then nothing is touched)."""
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
