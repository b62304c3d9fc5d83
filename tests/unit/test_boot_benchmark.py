"""benchmarks/boot.py's interleaving and its paired ratio: boots of one round are paired, rounds where one
command failed are left out, and the order turns from round to round."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture
def boot(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/boot.py is a script that imports guest_profile.py from beside it."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import boot as module  # type: ignore[import-not-found]

    return module


def test_rounds_pair_the_boots_that_ran_together(boot: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    walls = {"mine": iter([2.0, 3.0, 2.2]), "theirs": iter([1.0, 2.0, 2.2])}
    order: list[str] = []

    def fake_run_once(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, float]:
        order.append(argv[0])
        wall = next(walls[argv[0]])
        if wall == 3.0:
            raise boot.BootFailed("mine: no power-off line")
        return wall, 1.0, 0, wall

    monkeypatch.setattr(boot, "run_once", fake_run_once)
    monkeypatch.setattr(boot, "warm_free_memory", lambda: order.append("warm"))
    commands = {"mine": (["mine"], None), "theirs": (["theirs"], None)}
    failures: list[str] = []
    rounds: list[dict[str, tuple[float, float, int, float]]] = []
    samples = boot.run_interleaved(commands, 2, failures, rounds)

    # The order turns, the failed boot is retried, and free memory is warmed before every boot.
    assert order == ["warm", "mine", "warm", "theirs", "warm", "theirs", "warm", "mine", "warm", "mine"]
    assert failures == ["mine: no power-off line"]
    assert [wall for wall, *_ in samples["mine"]] == [2.0, 2.2]
    median, ratios = boot.paired_ratio(rounds, "mine", "theirs")
    assert ratios == [2.0]  # round 2 lost its "mine" boot, round 3 ran "mine" alone
    assert median == 2.0


def test_paired_ratio_is_the_median_of_the_rounds(boot: ModuleType) -> None:
    rounds = [{"a": (2.0, None, 0, 2.0), "b": (1.0, None, 0, 1.0)},
              {"a": (1.0, None, 0, 1.0), "b": (1.0, None, 0, 1.0)},
              {"a": (3.0, None, 0, 3.0), "b": (2.0, None, 0, 2.0)}]
    assert boot.paired_ratio(rounds, "a", "b") == (1.5, [2.0, 1.0, 1.5])
    assert boot.paired_ratio([], "a", "b") == (None, [])
