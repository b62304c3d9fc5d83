"""ioeventfds for the software CPU: a guest write to a virtio QueueNotify register signals the queue's event
notifier from C, the way KVM_IOEVENTFD does in the kernel.

Why: through the device window's Python callback a kick cost the I/O thread about 100 µs before it started
on the queue (measured 2026-12-06 with virtio-blk 1 MiB reads: the vCPU thread's MMIO write, then the I/O
thread woke on the eventfd and waited for the GIL, which the vCPU thread held until it left the callback).
QEMU's TCG vCPU serves the queue itself and starts the host read 7 µs after the kick. Here the window's
write callback is ``pyemu_mmio_write`` (mmio_notify.c): a write that matches a binding becomes one
``write(2)`` to the eventfd and the vCPU runs on without entering Python; everything else reaches the
device through the Python callback, as before.

The same table serves virtio-mmio's InterruptStatus (read) and InterruptACK (write) registers in C from the
device's shared word (:mod:`pyemu.system.shared_word`): Linux reads the one and writes the other in every
virtio interrupt handler, and through Python each cost the vCPU ~6 us and the GIL (measured 2026-12-07:
3.6 and 2.7 us inside the device's Python alone, per 4 KiB virtio-blk read).

The table holds its own duplicates of the notifiers' descriptors (as KVM holds a reference to each eventfd),
so a device that closes its notifier while a vCPU is still running cannot make that vCPU write to whatever
file reuses the number. Bindings stay until :meth:`MmioNotifiers.close`, like the KVM accelerator's.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from pyemu.accel.tcg.errors import TcgError
from pyemu.system.event_notifier import EventNotifier

if TYPE_CHECKING:
    from pyemu.system.shared_word import SharedWord

SLOTS = 64
"""Bindings the C table holds (mmio_notify.c ``MMIO_NOTIFY_SLOTS``): more are served by the Python path."""
STATUS_SLOTS = 64
"""Interrupt status registers the C table holds (``MMIO_STATUS_SLOTS``)."""


class MmioNotifiers:
    """The VM's ioeventfd table (``struct pyemu_mmio_notify``), shared by every vCPU's device windows."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self._ffi: Any = module.ffi
        self.state: Any = self._ffi.new("struct pyemu_mmio_notify *")
        self._fds: list[int] = []
        self._words: list[SharedWord] = []
        self._lock = threading.Lock()

    def bind(self, notifier: EventNotifier, addr: int, length: int, datamatch: int) -> bool:
        """A ``length``-byte guest write of ``datamatch`` at MMIO ``addr`` signals ``notifier`` without
        Python. False when the table is full (the device's own handling of the write still signals it)."""
        if length != 4:
            raise TcgError(f"ioeventfd at {addr:#x}: only 4-byte registers are supported, not {length}")
        with self._lock:
            state = self.state
            slot = int(state.count)
            if slot >= SLOTS:
                return False
            fd = os.dup(notifier.fileno())
            os.set_inheritable(fd, False)
            self._fds.append(fd)
            state.addr[slot] = addr
            state.value[slot] = datamatch & 0xFFFF_FFFF
            state.fd[slot] = fd
            state.count = slot + 1  # after the slot: a vCPU never sees half of it
            return True

    def bind_status(self, addr: int, word: SharedWord) -> bool:
        """Guest 4-byte reads of ``addr`` (virtio-mmio InterruptStatus) return ``word`` and writes of ``addr
        + 4`` (InterruptACK) clear its bits, in C. False when the word has no C address or the table is full
        (the device's Python serves both registers, as before)."""
        if word.address is None:
            return False
        with self._lock:
            state = self.state
            slot = int(state.status_count)
            if slot >= STATUS_SLOTS:
                return False
            self._words.append(word)  # the C table points into it: keep it alive as long as the table
            state.status_addr[slot] = addr
            state.status_word[slot] = self._ffi.cast("uint32_t *", word.address)
            state.status_count = slot + 1  # after the slot, as for the notifiers
            return True

    @property
    def status_hits(self) -> int:
        """InterruptStatus reads and InterruptACK writes served in C."""
        return int(self.state.status_hits)

    @property
    def hits(self) -> int:
        """Guest writes that became an eventfd write in C."""
        return int(self.state.hits)

    def close(self) -> None:
        """Unbind everything (later writes reach the devices' Python callbacks) and close the duplicates.
        Called once the engines have stopped."""
        with self._lock:
            state = self.state
            for slot in range(int(state.count)):
                state.fd[slot] = -1
            for slot in range(int(state.status_count)):
                state.status_word[slot] = self._ffi.NULL
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
