"""Image activation across a migration with shared storage: who holds a disk image's locks, and when.

QEMU (measured with 7.2): a destination started with ``-incoming`` opens its images *inactive* -- no
image locks, no writes -- because the source is still running on them; at the end of the migration
the source inactivates its images (flushes, drops its locks) just before it sends the final device
state, and the destination activates them (takes the locks) once the whole stream is loaded, before
the guest runs. A migration that fails or is cancelled after the source let go re-activates the
source's images; so does a ``cont`` of a source left in ``postmigrate`` (which fails with the lock
error while the destination holds them).

pyemu does the same for the file nodes opened while the VM was built (``-drive``/``-blockdev`` of the
command line): :func:`pyemu.block.locking.collecting_images` records them, opened inactive for an
``-incoming`` VM, and this module keeps, per machine, which of them are active. Images added later
through QMP ``blockdev-add`` are opened active as usual and are not inactivated.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from pyemu.block.errors import BlockError

_REGISTRY: "weakref.WeakKeyDictionary[Any, ImageActivation]" = weakref.WeakKeyDictionary()


class ImageActivation:
    """The image locks of one VM's file nodes, released and taken back as one (see module docstring)."""

    def __init__(self, files: list[Any], *, active: bool) -> None:
        self._files = [f for f in files if getattr(f, "lock", None) is not None]
        self._backends = [f for f in files if hasattr(f, "apply_deferred_sharing")]
        self._lock = threading.Lock()
        self.active = active

    def inactivate(self) -> None:
        """Drop every image lock (the node keeps what it held, to take it back); the images were flushed."""
        with self._lock:
            if not self.active:
                return
            for node in self._files:
                lock = node.lock
                if lock is not None and lock.active:
                    perm, shared = lock.perm, lock.shared
                    lock.release()
                    lock.perm, lock.shared = perm, shared
            self.active = False

    def activate(self) -> None:
        """Take every image's locks back, all or none: ImageLockedError (QEMU's 'Failed to get "write"
        lock') when another process holds them."""
        with self._lock:
            if self.active:
                return
            wanted = [(node.lock, node.lock.perm, node.lock.shared) for node in self._files
                      if not getattr(node, "_closed", False) and node.lock is not None and not node.lock.active]
            try:
                for lock, perm, shared in wanted:
                    lock.acquire(perm, shared, required=False)
            except BaseException:
                for lock, perm, shared in wanted:  # none stays taken; each remembers what it wants
                    lock.release()
                    lock.perm, lock.shared = perm, shared
                raise
            self.active = True

    def vm_running(self) -> None:
        """The devices' backends stop sharing write (QEMU's blk_vm_state_changed: they shared everything
        while an NBD export of their node took a non-shared storage migration); a conflict is reported, as
        QEMU does, and leaves that backend sharing."""
        from pyemu.system.messages import error_report

        backends, self._backends = self._backends, []
        for backend in backends:
            try:
                backend.apply_deferred_sharing()
            except BlockError as exc:
                error_report(str(exc))


def register(machine: Any, activation: ImageActivation) -> None:
    _REGISTRY[machine] = activation
    if activation._backends:
        from pyemu.system.runstate import RunState

        def on_transition(old: RunState, new: RunState) -> None:
            if new is RunState.RUNNING:
                activation.vm_running()

        machine.runstate.add_listener(on_transition)


def images_of(machine: Any) -> ImageActivation | None:
    return _REGISTRY.get(machine)


def inactivate_images(machine: Any) -> None:
    activation = images_of(machine)
    if activation is not None:
        activation.inactivate()


def activate_images(machine: Any) -> None:
    """Raises the block layer's error (BlockError) when an image cannot be locked again."""
    activation = images_of(machine)
    if activation is not None:
        activation.activate()


__all__ = ["BlockError", "ImageActivation", "activate_images", "images_of", "inactivate_images", "register"]
