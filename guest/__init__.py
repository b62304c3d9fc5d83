"""Guest assets for pyemu: Debian's Linux 6.1 kernel and a busybox initramfs (``pyemu-guest``).

``find_assets()`` answers "are they fetched, and where"; ``pyemu.guest.fetch.fetch_assets()`` builds
them; ``pyemu.guest.cpio`` and ``pyemu.guest.initramfs`` build custom initramfs images for tests.
"""

from pyemu.guest.assets import GuestAssets, asset_dir, cache_root, find_assets

__all__ = ["GuestAssets", "asset_dir", "cache_root", "find_assets"]
