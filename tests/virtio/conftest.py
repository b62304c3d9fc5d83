"""Fixtures for virtio device-model tests: guest RAM, an I/O thread, a transport and a Python driver."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.virtio.device import VirtioDevice
from pyemu.hw.virtio.mmio import VirtioMmio
from pyemu.system.iothread import IoThread
from pyemu.system.memory import GuestMemory
from pyemu.testing.virtio_driver import VirtioTestDriver

RAM_SIZE = 8 << 20
SCRATCH = 1 << 20


@dataclass
class CountingInterrupt:
    count: int = 0
    event: threading.Event = field(default_factory=threading.Event)

    def trigger(self) -> None:
        self.count += 1
        self.event.set()


@dataclass
class Rig:
    memory: GuestMemory
    iothread: IoThread
    dma: DmaMemory
    written: list[tuple[int, int]]
    transports: list[VirtioMmio] = field(default_factory=list)

    def plug(self, device: VirtioDevice, scratch: int = SCRATCH) -> tuple[VirtioMmio, VirtioTestDriver, CountingInterrupt]:
        interrupt = CountingInterrupt()
        transport = VirtioMmio(device, self.dma, interrupt, self.iothread, name=f"vd{len(self.transports)}")
        self.transports.append(transport)
        return transport, VirtioTestDriver(transport, self.memory, scratch + len(self.transports) * SCRATCH), interrupt


@pytest.fixture
def rig() -> Iterator[Rig]:
    memory = GuestMemory([(0, RAM_SIZE)], name="virtio-test")
    iothread = IoThread("test")
    written: list[tuple[int, int]] = []
    dma = DmaMemory(memory, lambda gpa, size: written.append((gpa, size)))
    rig = Rig(memory, iothread, dma, written)
    iothread.start()
    try:
        yield rig
    finally:
        iothread.stop()
        for transport in rig.transports:
            transport.close()
        iothread.close()
        memory.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.001)
    return predicate()


@contextlib.contextmanager
def environment_setting(name: str, value: str) -> Iterator[None]:
    """``name=value`` in the environment for the block (a plane's switch, read when a device first uses it)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
