"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import pyemu.accel.tcg  # noqa: F401  chooses the libunicorn (pyemu's build when present) before any test imports unicorn
from pyemu.guest.assets import find_assets

# How fast hypothesis draws its examples depends on how busy the host is; checking that speed made property
# tests fail beside other work (the project's rule: no test depends on an idle host), and so would
# per-example deadlines. A test's own suppress_health_check list replaces this one: it names too_slow too.
settings.register_profile("pyemu", suppress_health_check=(HealthCheck.too_slow,), deadline=None)
settings.load_profile("pyemu")


@pytest.fixture(scope="session")
def guest_assets():
    """The default Debian guest (kernel + initramfs); skipped when not fetched, a failure in CI."""
    assets = find_assets()
    if assets is None:
        if os.environ.get("CI"):
            pytest.fail("guest assets missing in CI: .ci/run must run 'pyemu-guest fetch'")
        pytest.skip("guest assets not fetched (run 'pyemu-guest fetch')")
    return assets
