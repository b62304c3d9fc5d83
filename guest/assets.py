"""Where the guest assets live, what the manifest says, and whether a cache is complete.

The cache directory is ``$PYEMU_CACHE``, else ``$XDG_CACHE_HOME/pyemu``, else ``~/.cache/pyemu``; the
Debian 6.1 assets go under ``guest/debian-6.1/``. Other code (boot tests, benchmarks) calls
:func:`find_assets` and skips when it returns None, so it never has to know the layout.

A set is replaced whole: built in a scratch directory next to it and swapped in (:func:`install_asset_set`)
under one lock file (:func:`asset_lock`), so a reader never sees half of an update.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pyemu.guest.errors import CacheError, GuestAssetError
from pyemu.guest.initramfs import recipe_digest
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

    @property
    def initramfs_current(self) -> bool:
        """Was the initramfs built by today's recipe (init scripts, layout) for its module list? A set
        from an older pyemu is not, and :func:`find_assets` / ``pyemu-guest fetch`` rebuild it."""
        return self.manifest.get("initramfs_recipe") == recipe_digest(self.module_order, self.kernel_release)

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


def find_assets(cache: str | os.PathLike[str] | None = None, *, refresh: bool = True) -> GuestAssets | None:
    """The fetched Debian 6.1 assets, or None when ``pyemu-guest fetch`` has not completed (cheap check).

    With ``refresh``, an initramfs built by an older recipe is rebuilt first from the cached busybox and
    modules (about a second, no download; see :mod:`pyemu.guest.refresh`), so users and tests get the
    current guest without refetching. If that cannot happen now (another process holds the cache lock,
    the cache is read-only, a cached part is damaged), the set is returned as it is: it still boots.
    """
    assets = check_complete(asset_dir(cache), verify_hashes=False)
    if assets is None or not refresh or assets.initramfs_current:
        return assets
    # Imported here: the refresh module builds on this one.
    from pyemu.guest.refresh import refresh_initramfs

    try:
        return refresh_initramfs(assets, wait=False)
    except (GuestAssetError, OSError):
        return assets


@contextmanager
def asset_lock(target: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the asset set's lock file (``<cache>/guest/.debian-6.1.lock``) for the block; yields whether
    it was taken (only False when ``wait`` is False and another process holds it)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "w")
    except OSError as exc:
        raise CacheError(f"cannot create the cache directory {target.parent}: {exc.strerror}") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


@contextmanager
def scratch_directory(target: Path) -> Iterator[Path]:
    """A fresh directory next to ``target`` (same filesystem, so the final rename is atomic), removed
    after the block whatever happens."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial.", dir=target.parent))
    except OSError as exc:
        raise CacheError(f"cannot write to {target.parent}: {exc.strerror}") from exc
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def install_asset_set(built: Path, target: Path) -> None:
    """Swap the finished set ``built`` into place (the old one, if any, is removed afterwards)."""
    old = None
    try:
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
        os.replace(built, target)
    except OSError as exc:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous set back rather than leave none
        raise CacheError(f"cannot move the new asset set into {target}: {exc.strerror}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
