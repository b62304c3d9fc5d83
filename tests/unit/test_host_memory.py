"""benchmarks/host_memory.py: warming free memory touches at most half of what is available."""

from __future__ import annotations

import mmap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture
def host_memory(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import host_memory as module  # type: ignore[import-not-found]

    return module


def test_available_mib_reads_memavailable(host_memory: ModuleType, tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684292 kB\nMemFree:        23774188 kB\nMemAvailable:   2097152 kB\n")
    assert host_memory.available_mib(str(meminfo)) == 2048
    meminfo.write_text("MemTotal:       24684292 kB\n")
    assert host_memory.available_mib(str(meminfo)) == 0
    assert host_memory.available_mib(str(tmp_path / "missing")) == 0


def test_warming_is_capped_at_half_of_what_is_available(host_memory: ModuleType,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real_mmap = mmap.mmap

    def recording_mmap(fileno: int, length: int, *args: Any, **kwargs: Any) -> mmap.mmap:
        sizes.append(length)
        return real_mmap(fileno, length, *args, **kwargs)

    monkeypatch.setattr(host_memory.mmap, "mmap", recording_mmap)
    monkeypatch.setattr(host_memory, "available_mib", lambda: 16)
    host_memory.warm_free_memory(768)
    assert sizes == [8 << 20]
    monkeypatch.setattr(host_memory, "available_mib", lambda: 0)  # no MemAvailable: nothing is touched
    host_memory.warm_free_memory(768)
    assert sizes == [8 << 20]
