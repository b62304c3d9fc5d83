"""Which pages of a private anonymous mapping hold something, from ``/proc/self/pagemap``.

Why: guest RAM in anonymous memory has no holes to ``SEEK_DATA`` over (the memfd backend does), yet a save
must still skip what the guest never touched without touching it: a read fault through the mapping costs a
fault per page, which made scanning a mostly idle 512 MiB guest most of a migration's time. The kernel's
page map has a 64-bit entry per virtual page whose bit 63 says the page is present and bit 62 that it was
swapped out: either means it may hold non-zero bytes. (A page the guest only read is present too, mapped to
the shared zero page: it is reported, and saved as the zero page it is.) The page frame numbers in the
entries, which need CAP_SYS_ADMIN, are not used.
"""

from __future__ import annotations

import os
from typing import Iterator

PAGE_SIZE = 4096
PAGEMAP = "/proc/self/pagemap"
_ENTRY = 8
_CHUNK_PAGES = 1 << 16
"""Pages whose entries one read fetches (512 KiB of page map for 256 MiB of RAM)."""
_IN_USE = bytes(1 if byte & 0xC0 else 0 for byte in range(256))
"""Maps an entry's top byte (bits 56-63) to 1 when bit 63 (present) or 62 (swapped) is set."""


class PageMapUnavailable(OSError):
    """The page map cannot be read here (no /proc, or a kernel that hides it)."""


def used_page_runs(address: int, size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` runs of ``[address, address+size)`` (page-aligned) whose pages are present or
    swapped, in address order, offsets relative to ``address``. Raises PageMapUnavailable if the page map
    cannot be read; nothing is faulted in."""
    try:
        fd = os.open(PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PageMapUnavailable(exc.errno, f"{PAGEMAP}: {exc.strerror}") from exc
    try:
        first_page, pages = address // PAGE_SIZE, size // PAGE_SIZE
        run_start: int | None = None
        done = 0
        while done < pages:
            count = min(_CHUNK_PAGES, pages - done)
            flags = _read_entries(fd, first_page + done, count)[_ENTRY - 1::_ENTRY].translate(_IN_USE)
            pos = 0
            while pos < count:
                if run_start is None:
                    hit = flags.find(1, pos)
                    if hit < 0:
                        break
                    run_start, pos = done + hit, hit
                else:
                    gap = flags.find(0, pos)
                    if gap < 0:
                        break
                    yield run_start * PAGE_SIZE, (done + gap - run_start) * PAGE_SIZE
                    run_start, pos = None, gap
            done += count
        if run_start is not None:
            yield run_start * PAGE_SIZE, (pages - run_start) * PAGE_SIZE
    finally:
        os.close(fd)


def _read_entries(fd: int, page: int, count: int) -> bytes:
    want = count * _ENTRY
    data = b""
    while len(data) < want:
        try:
            chunk = os.pread(fd, want - len(data), page * _ENTRY + len(data))
        except OSError as exc:
            raise PageMapUnavailable(exc.errno, f"{PAGEMAP}: {exc.strerror}") from exc
        if not chunk:
            raise PageMapUnavailable(0, f"{PAGEMAP}: short read at page {page:#x}")
        data += chunk
    return data
