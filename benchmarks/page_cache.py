"""Putting a benchmark's input files in the host's page cache before a timed run.

Why: this project's hosts page out memory, page cache included, that was not touched for a minute (a DAMON
``pageout`` scheme), so the first timed run after a pause would otherwise read its input from the disk
while the tool it is compared with, run right after, finds it cached.
"""

from __future__ import annotations

from pathlib import Path


def read_through(path: Path) -> None:
    """Read ``path`` once, so that it sits in the host's page cache."""
    with open(path, "rb") as handle:
        while handle.read(8 << 20):
            pass
