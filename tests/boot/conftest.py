"""Fixtures for Linux boot tests: the Debian guest assets and a pyemu process driven over its console."""

from __future__ import annotations

import pytest

from typing import Callable, Iterator

from boot_helpers import ConsoleSession, Guest, kernel_trouble
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
    trouble = [line for session in sessions for line in kernel_trouble(session.output)]
    if trouble:
        pytest.fail("the guest kernel reported trouble on the console:\n" + "\n".join(trouble[:20]), pytrace=False)


@pytest.fixture
def guest(console, guest_assets, tmp_path, request) -> Iterator[Callable[[str], Guest]]:  # type: ignore[no-untyped-def]
    made: list[Guest] = []

    def start(kind: str, fmt: str = "raw") -> Guest:
        g = Guest(kind, console, tmp_path, fmt)
        made.append(g)
        return g
    yield start
    for g in made:
        g.mon.close()  # before the VM goes: the client's destructor would otherwise meet a dead socket
        if g.kind == "qemu":
            g.vm.close()
