"""Typed errors of the virtio devices."""

from __future__ import annotations

from pyemu.errors import PyemuError


class VirtioError(PyemuError):
    """Base of virtio errors."""


class VirtqueueError(VirtioError):
    """The driver put something malformed in a virtqueue (the device must be reset by the driver)."""

    def __init__(self, queue: int, reason: str) -> None:
        super().__init__(f"queue {queue}: {reason}")
        self.queue = queue
        self.reason = reason


class DeviceBroken(VirtioError):
    """Raised inside device code to mark the device as needing a reset, with the reason."""
