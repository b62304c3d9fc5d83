"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest

import pyemu.accel.tcg  # noqa: F401  chooses the libunicorn (pyemu's build when present) before any test imports unicorn
from pyemu.guest.assets import find_assets


@pytest.fixture(scope="session")
def guest_assets():
    """The default Debian guest (kernel + initramfs); skipped when not fetched, a failure in CI."""
    assets = find_assets()
    if assets is None:
        if os.environ.get("CI"):
            pytest.fail("guest assets missing in CI: .ci/run must run 'pyemu-guest fetch'")
        pytest.skip("guest assets not fetched (run 'pyemu-guest fetch')")
    return assets
