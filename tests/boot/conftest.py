"""Fixtures for Linux boot tests: the Debian guest assets and a pyemu process driven over its console."""

from __future__ import annotations

import pytest

from boot_helpers import ConsoleSession
from pyemu.accel.base import AcceleratorUnavailable


@pytest.fixture(scope="module")
def kvm_usable():
    """Skip unless /dev/kvm opens and a VM can be created on this host."""
    from pyemu.accel.kvm.accel import KvmAccelerator

    try:
        KvmAccelerator().close()
    except AcceleratorUnavailable as error:
        pytest.skip(f"KVM unusable on this host: {error}")


@pytest.fixture
def console():
    sessions: list[ConsoleSession] = []

    def start(argv: list[str]) -> ConsoleSession:
        session = ConsoleSession(argv)
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()
