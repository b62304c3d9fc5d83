"""The ``null`` backend: a connected port that discards output and never produces input."""

from __future__ import annotations

from pyemu.chardev.base import CharBackend


class NullBackend(CharBackend):
    def __init__(self, label: str = "null") -> None:
        super().__init__(label)
        self.bytes_discarded = 0

    def write(self, data: bytes) -> None:
        self.bytes_discarded += len(data)
