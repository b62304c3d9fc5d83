"""Event notifiers: an eventfd that one side sets and another side waits on.

Why an eventfd: the same file descriptor works for every producer. Under KVM the kernel itself signals it
when the guest writes a virtio QueueNotify register (an ioeventfd), so a queue kick never runs Python on
the vCPU thread; under the software CPU the MMIO write handler sets it. An I/O thread waits on it with
``select``/``epoll`` either way, and the device code behind it cannot tell the two apart. Going the other
direction, an irqfd is an event notifier KVM reads to inject an interrupt.
"""

from __future__ import annotations

import os

from pyemu.errors import PyemuError


class NotifierError(PyemuError):
    """An event notifier could not be created."""


class EventNotifier:
    """A non-blocking eventfd. :meth:`set` may be called from any thread (or by the kernel)."""

    __slots__ = ("fd", "name")

    def __init__(self, name: str = "notifier") -> None:
        try:
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as exc:
            raise NotifierError(f"cannot create an eventfd for {name}: {exc.strerror}") from exc
        self.name = name

    def fileno(self) -> int:
        return self.fd

    def set(self) -> None:
        """Signal the waiter (never blocks: the counter saturating still means "signalled")."""
        try:
            os.eventfd_write(self.fd, 1)
        except (BlockingIOError, OSError):
            pass

    def test_and_clear(self) -> bool:
        """True if the notifier was signalled since the last call; clears it."""
        try:
            return os.eventfd_read(self.fd) > 0
        except (BlockingIOError, OSError):
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
