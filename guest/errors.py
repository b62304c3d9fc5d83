"""Typed errors of the guest-asset tooling (``pyemu-guest``).

Fetching depends on host tools (apt-get, dpkg-deb) and a reachable Debian mirror; each failure names what
went wrong and reminds the user that the assets are optional: any kernel and initramfs can be passed to
``pyemu`` with ``-kernel``/``-initrd``.
"""

from __future__ import annotations

from pyemu.errors import PyemuError

OWN_ASSETS_HINT = "or pass your own kernel and initramfs to pyemu with -kernel/-initrd"


class GuestAssetError(PyemuError):
    """Root of the guest-asset errors."""


class FetchUnavailable(GuestAssetError):
    """Fetching cannot work on this host: a tool is missing or apt-get/dpkg-deb failed.

    Callers that fetch on demand (``pyemu`` without ``-kernel``) catch this to suggest ``-kernel``.
    """


class ToolMissingError(FetchUnavailable):
    """A host tool the fetch needs (apt-get, apt-cache, dpkg-deb) is not installed."""

    def __init__(self, message: str, *, tool: str) -> None:
        super().__init__(message)
        self.tool = tool


class AptError(FetchUnavailable):
    """An apt-get / apt-cache / dpkg-deb command failed."""

    def __init__(self, message: str, *, command: list[str], returncode: int, output: str) -> None:
        super().__init__(message)
        self.command = command
        self.returncode = returncode
        self.output = output


class PackageContentError(GuestAssetError):
    """A downloaded package lacks a file we need (kernel image, busybox binary, a module)."""


class KernelExtractError(GuestAssetError):
    """The vmlinux ELF cannot be extracted from the bzImage (unknown compression, corrupt payload)."""


class CacheError(GuestAssetError):
    """The asset cache cannot be written, or what is in it is incomplete or corrupt."""
