"""Where the guest assets live, what the manifest says, and whether a cache is complete.

The cache directory is ``$PYEMU_CACHE``, else ``$XDG_CACHE_HOME/pyemu``, else ``~/.cache/pyemu``; the
Debian 6.1 assets go under ``guest/debian-6.1/``. Other code (boot tests, benchmarks) calls
:func:`find_assets` and skips when it returns None, so it never has to know the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyemu.guest.errors import CacheError
from pyemu.system.cache import cache_root

ASSET_SET = "debian-6.1"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
KERNEL_NAME = "vmlinuz"
VMLINUX_NAME = "vmlinux"
INITRD_NAME = "initramfs.cpio.gz"
BUSYBOX_NAME = "busybox"
CONFIG_NAME = "config"
MODULES_DIR = "modules"


def asset_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the Debian 6.1 asset set inside ``cache`` (default: :func:`cache_root`)."""
    root = Path(cache) if cache is not None else cache_root()
    return root / "guest" / ASSET_SET


@dataclass(frozen=True)
class GuestAssets:
    """Paths of a complete asset set, and its manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def kernel(self) -> Path:
        """The bzImage (boot with the 64-bit Linux boot protocol)."""
        return self.directory / KERNEL_NAME

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF kernel (boot with PVH)."""
        return self.directory / VMLINUX_NAME

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD_NAME

    @property
    def busybox(self) -> Path:
        return self.directory / BUSYBOX_NAME

    @property
    def config(self) -> Path:
        """The kernel's build configuration (which drivers are built in, which are modules)."""
        return self.directory / CONFIG_NAME

    @property
    def modules_dir(self) -> Path:
        return self.directory / MODULES_DIR

    @property
    def kernel_release(self) -> str:
        return str(self.manifest.get("kernel_release", ""))

    @property
    def module_order(self) -> list[str]:
        """Module names in the order /init loads them."""
        return list(self.manifest.get("modules", []))

    def files(self) -> dict[str, Path]:
        """Every file the manifest lists, by its name relative to the directory."""
        return {name: self.directory / name for name in self.manifest.get("files", {})}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest in ``directory``, or None if it is missing or unreadable."""
    try:
        with open(directory / MANIFEST_NAME, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    try:
        temporary = directory / (MANIFEST_NAME + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, directory / MANIFEST_NAME)
    except OSError as exc:
        raise CacheError(f"cannot write the manifest in {directory}: {exc.strerror}") from exc


def check_complete(directory: Path, *, verify_hashes: bool) -> GuestAssets | None:
    """The asset set in ``directory`` if its manifest is current and every listed file matches it.

    Sizes are always compared; with ``verify_hashes`` the SHA-256 of every file too (what ``fetch`` does
    before deciding not to download again).
    """
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    for required in (KERNEL_NAME, VMLINUX_NAME, INITRD_NAME):
        if required not in files:
            return None
    for name, record in files.items():
        path = directory / name
        try:
            if path.stat().st_size != record.get("size"):
                return None
        except OSError:
            return None
        if verify_hashes and sha256_file(path) != record.get("sha256"):
            return None
    return GuestAssets(directory, manifest)


def find_assets(cache: str | os.PathLike[str] | None = None) -> GuestAssets | None:
    """The fetched Debian 6.1 assets, or None when ``pyemu-guest fetch`` has not completed (cheap check)."""
    return check_complete(asset_dir(cache), verify_hashes=False)
