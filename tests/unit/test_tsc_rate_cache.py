"""The host TSC rate is measured once per host boot and kept in the cache (accel/tcg/tsc.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from pyemu.accel.tcg import tsc


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[int]]:
    """Measurements are counted and return 2.5 GHz; the cache lives in ``tmp_path``; boot id "boot-a"."""
    calls: list[int] = []

    def fake_measure() -> int:
        calls.append(1)
        return 2_500_000_000

    monkeypatch.setenv("PYEMU_CACHE", str(tmp_path))
    monkeypatch.setattr(tsc, "measure_tsc_hz", fake_measure)
    monkeypatch.setattr(tsc, "_boot_id", lambda: "boot-a")
    tsc.host_tsc_hz.cache_clear()
    yield calls
    tsc.host_tsc_hz.cache_clear()


def test_first_call_measures_and_stores_then_the_next_process_reads_the_file(measured: list[int],
                                                                            tmp_path: Path) -> None:
    assert tsc.host_tsc_hz() == 2_500_000_000
    assert (tmp_path / "host-tsc-hz").read_text() == "boot-a 2500000000\n"
    tsc.host_tsc_hz.cache_clear()  # as a new process would
    assert tsc.host_tsc_hz() == 2_500_000_000
    assert len(measured) == 1


def test_another_boots_rate_is_measured_again_and_replaced(measured: list[int], tmp_path: Path) -> None:
    (tmp_path / "host-tsc-hz").write_text("boot-b 3000000000\n")
    assert tsc.host_tsc_hz() == 2_500_000_000
    assert len(measured) == 1
    assert (tmp_path / "host-tsc-hz").read_text().startswith("boot-a ")


@pytest.mark.parametrize("content", ["", "boot-a", "boot-a abc", "boot-a 12", "boot-a 2500000000 extra",
                                     "\xff\xfe"])
def test_a_damaged_file_is_measured_again(measured: list[int], tmp_path: Path, content: str) -> None:
    (tmp_path / "host-tsc-hz").write_text(content, encoding="latin-1")
    assert tsc.host_tsc_hz() == 2_500_000_000
    assert len(measured) == 1


def test_an_unwritable_cache_only_costs_the_measurement(measured: list[int], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("PYEMU_CACHE", str(blocker))
    assert tsc.host_tsc_hz() == 2_500_000_000
    assert not list(tmp_path.glob("**/*.tmp"))


def test_without_a_boot_id_every_process_measures(measured: list[int], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tsc, "_boot_id", lambda: None)
    assert tsc.host_tsc_hz() == 2_500_000_000
    assert not (tmp_path / "host-tsc-hz").exists()
