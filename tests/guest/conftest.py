"""Fixtures for guest-program tests: every test taking ``accel`` runs under the software CPU and, where the
host allows it, under KVM."""

from __future__ import annotations

import pytest

from pyemu.testing.accelerators import kvm_unavailable_reason, limited_kvm_reason


@pytest.fixture(params=["tcg", "kvm"])
def accel(request: pytest.FixtureRequest) -> str:
    if request.param == "kvm":
        reason = kvm_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def needs_full_kvm(accel: str):
    """Call with a description of what the test needs; skips the kvm case on this host's PVM-based KVM."""

    def check(what: str) -> None:
        reason = limited_kvm_reason(accel, what)
        if reason is not None:
            pytest.skip(reason)

    return check
