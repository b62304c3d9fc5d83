"""Network backends (QEMU's ``-netdev``): where a virtual NIC's frames go and come from.

Only ``tap`` exists today (:mod:`pyemu.net.tap`, options in :mod:`pyemu.net.options`). A backend is a
file descriptor that carries one Ethernet frame per ``read``/``write``, optionally preceded by a
virtio-net header (so checksum and segmentation offloads pass between guest and host untouched); the
device model (:mod:`pyemu.hw.virtio.net`) does the rest on its I/O thread.

The error classes live here, at the package root, so every module of the package (and callers) can
import them without importing the TAP code.
"""

from __future__ import annotations

import sys
import threading

from pyemu.errors import PyemuError

_warn_lock = threading.Lock()


class NetError(PyemuError):
    """Base of network-backend errors."""


class TapError(NetError):
    """A TAP device cannot be opened or configured. ``ifname`` is the interface (or ``fd=N``) involved,
    ``errno`` the OS error number when an ioctl or open failed (None for a refusal of our own)."""

    def __init__(self, message: str, *, ifname: str = "", errno: int | None = None) -> None:
        super().__init__(message)
        self.ifname = ifname
        self.errno = errno


def host_warning(message: str) -> None:
    """One line on stderr for host-side trouble that must not stop the VM (QEMU's ``warn_report``): a TAP
    that went away or refuses an offload is the operator's business, not a guest error."""
    with _warn_lock:
        sys.stderr.write(f"pyemu: warning: {message}\n")
        sys.stderr.flush()


__all__ = ["NetError", "TapError", "host_warning"]
