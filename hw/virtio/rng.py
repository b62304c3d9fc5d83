"""virtio-rng (virtio 1.x section 5.4): the guest's ``/dev/hwrng``, fed from a host entropy source.

QEMU's spelling: ``-object rng-random,id=rng0,filename=/dev/urandom`` and ``-device
virtio-rng-device,rng=rng0,max-bytes=N,period=MS``. ``max-bytes`` per ``period`` milliseconds caps what
the guest can draw (a guest must not drain the host's entropy or spin the I/O thread); a request that
finds the budget spent waits for the next period, when the queue is served again.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from pyemu.errors import ConfigError
from pyemu.hw.virtio.device import ID_RNG, VirtioDevice
from pyemu.hw.virtio.queue import Virtqueue

QUEUE_SIZE = 64
DEFAULT_PERIOD_MS = 1 << 16
UNLIMITED = (1 << 63) - 1
MAX_REQUEST = 1 << 16
IOV_MAX = 1024  # os.readv takes at most this many buffers
"""Bytes given per request at most (a guest asking for gigabytes gets a short answer, as the spec allows)."""


@dataclass(frozen=True)
class RngConfig:
    filename: str = "/dev/urandom"
    max_bytes: int = UNLIMITED
    period_ms: int = DEFAULT_PERIOD_MS

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ConfigError("virtio-rng-device: 'max-bytes' parameter expects a positive integer",
                              option="-device")
        if self.period_ms <= 0:
            raise ConfigError("virtio-rng-device: 'period' parameter expects a positive integer",
                              option="-device")


class EntropySource:
    """An open host entropy file (``rng-random``)."""

    def __init__(self, filename: str) -> None:
        try:
            self.fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"rng-random: Could not open '{filename}': {exc.strerror}", option="-object") from exc
        self.filename = filename

    def readinto(self, buffers: list[memoryview]) -> int:
        """Fill guest buffers straight from the source (no host copy sized by the guest's request)."""
        return os.readv(self.fd, buffers)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VirtioRng(VirtioDevice):
    device_id = ID_RNG
    name = "virtio-rng"

    def __init__(self, source: EntropySource, config: RngConfig, *, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        super().__init__((QUEUE_SIZE,))
        self.source = source
        self.config = config
        self._clock = clock
        self._period_start = clock()
        self._budget = config.max_bytes
        self._timer: threading.Timer | None = None
        self.bytes_given = 0

    def reset(self) -> None:
        self._cancel_timer()

    def _refill(self) -> None:
        now = self._clock()
        if now - self._period_start >= self.config.period_ms / 1000:
            self._period_start = now
            self._budget = self.config.max_bytes

    def process_queue(self, queue: Virtqueue) -> None:
        assert self.context is not None
        dma = self.context.dma
        served = 0
        while True:
            self._refill()
            if self._budget <= 0:
                self._wait_for_next_period(queue.index)
                break
            chain = queue.pop(dma)
            if chain is None:
                break
            wanted = min(chain.writable_length, self._budget, MAX_REQUEST)
            given = self.source.readinto(chain.views(dma, writable=True, length=wanted)[:IOV_MAX]) if wanted else 0
            self._budget -= given
            self.bytes_given += given
            queue.push(dma, chain, given)  # reports the written range to the DMA layer
            served += 1
        if served:
            self.context.notify_queue(queue)

    def _wait_for_next_period(self, index: int) -> None:
        if self._timer is not None:
            return
        delay = max(0.0, self._period_start + self.config.period_ms / 1000 - self._clock())
        context = self.context
        assert context is not None

        def fire() -> None:
            self._timer = None
            context.kick_queue(index)
        self._timer = threading.Timer(delay, fire)
        self._timer.daemon = True
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._cancel_timer()
        self.source.close()
