"""Facts about the loaded libunicorn that pyemu finds by probing, kept on disk per library build.

Why: where ``uc_struct`` keeps its CPU object and its TCG code buffer is found by searching the process's
memory (:mod:`pyemu.accel.tcg.io_guard`): 10-50 ms at every VM start, a large share of pyemu's start-up.
Both are properties of the library's build (its struct layouts and the order it allocates them in), so a
later process with the same library reads them instead (``<cache>/tcg-<name>-<library key>``: the library's
path, size and modification time on the first line, then one ``first second`` pair of offsets per line).
Each library has its own file: a host that runs both pyemu's build and PyPI's library (the benchmarks do,
turn about) would otherwise search again at every switch. The caller
checks every stored fact on each engine as it would a fresh one and searches again when the engine does
not bear it out, so a stale or damaged file costs a search, never a wrong answer. The CPU-state blob's
layout (:func:`pyemu.accel.tcg.calibration.calibrate`) is kept the same way, as JSON.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from pyemu.system.cache import cache_root, store_small_file

Pair = tuple[int, int]


def library_identity() -> str:
    """The loaded libunicorn as path, size and modification time: what the stored facts belong to."""
    from pyemu.accel.tcg.engine_library import loaded_library

    path = loaded_library()
    try:
        status = os.stat(path)
    except OSError:
        return path
    return f"{path} {status.st_size} {status.st_mtime_ns}"


def facts_file(name: str) -> Path:
    key = zlib.crc32(library_identity().encode())  # names the file only; its first line is what is checked
    return cache_root() / f"tcg-{name}-{key:08x}"


def stored_text(name: str) -> str | None:
    """What an earlier process stored under ``name`` for this very library (None: nothing, or another
    library's)."""
    try:
        identity, _, text = facts_file(name).read_text().partition("\n")
    except (OSError, UnicodeDecodeError):
        return None
    return text if identity == library_identity() else None


def store_text(name: str, text: str) -> None:
    """Keep ``text`` for the next process with this library (silently not, if the cache is read-only)."""
    store_small_file(facts_file(name), f"{library_identity()}\n{text}")


def stored_pairs(name: str, first_below: int, second_below: int) -> list[Pair]:
    """The pairs an earlier process stored under ``name`` for this very library, or [] (none, another
    library, or anything malformed: each offset a multiple of 8 below its bound)."""
    text = stored_text(name)
    if text is None:
        return []
    pairs = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2 or not all(field.isdigit() for field in fields):
            return []
        first, second = int(fields[0]), int(fields[1])
        if first >= first_below or second >= second_below or first % 8 or second % 8:
            return []
        pairs.append((first, second))
    return pairs


def store_pairs(name: str, pairs: list[Pair]) -> None:
    """Keep ``pairs`` for the next process with this library (silently not, if the cache is read-only)."""
    store_text(name, "".join(f"{a} {b}\n" for a, b in pairs))
