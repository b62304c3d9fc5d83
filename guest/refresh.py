"""Rebuilding a cached initramfs whose recipe is out of date, from the parts the cache already holds.

The asset cache keeps busybox and every module the initramfs carries (``busybox``, ``modules/*.ko``), and
the manifest records the module order and the recipe digest the initramfs was built with
(:func:`pyemu.guest.initramfs.recipe_digest`). When pyemu's init scripts or archive layout change, the
digest no longer matches and the initramfs is rebuilt here: no download, about a second. A set fetched
before a *module* was added keeps its module list (the new driver needs the kernel package again: that is
``pyemu-guest fetch``'s job), but still gets the new scripts.

The rebuilt set is assembled in a scratch directory (hard links to the unchanged files, a new initramfs
and manifest) and swapped in whole, under the same lock as ``fetch``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from pyemu.guest.assets import (
    BUSYBOX_NAME,
    INITRD_NAME,
    MANIFEST_NAME,
    GuestAssets,
    asset_lock,
    check_complete,
    file_record,
    install_asset_set,
    scratch_directory,
    write_manifest,
)
from pyemu.guest.errors import CacheError
from pyemu.guest.initramfs import build_initramfs, busybox_applets, recipe_digest
from pyemu.guest.modules import KernelModule

Reporter = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def refresh_initramfs(assets: GuestAssets, *, wait: bool = True, report: Reporter = _quiet) -> GuestAssets:
    """``assets`` with an initramfs built by today's recipe: rebuilt if needed, under the cache lock.

    With ``wait`` False and the lock held elsewhere (a fetch in progress), the set is returned unchanged.
    """
    if assets.initramfs_current:
        return assets
    with asset_lock(assets.directory, wait=wait) as locked:
        if not locked:
            return assets
        return rebuild_initramfs_locked(assets, report=report)


def rebuild_initramfs_locked(assets: GuestAssets, *, report: Reporter = _quiet) -> GuestAssets:
    """The rebuild itself; the caller holds :func:`~pyemu.guest.assets.asset_lock`."""
    current = check_complete(assets.directory, verify_hashes=False)
    if current is None:
        raise CacheError(f"the asset set in {assets.directory} changed or broke while waiting for its lock")
    if current.initramfs_current:  # another process rebuilt it meanwhile
        return current
    if "modules" not in current.manifest or BUSYBOX_NAME not in current.manifest.get("files", {}):
        raise CacheError(f"the asset set in {current.directory} predates the module list in its manifest; "
                         "run 'pyemu-guest fetch --force'")
    report(f"rebuilding the initramfs in {current.directory} (its init scripts changed)")
    with scratch_directory(current.directory) as scratch:
        built = scratch / "out"
        _link_tree(current, built)
        modules = [_cached_module(current, name) for name in current.module_order]
        applets = busybox_applets(built / BUSYBOX_NAME)
        archive = build_initramfs((built / BUSYBOX_NAME).read_bytes(), modules, current.kernel_release,
                                  applets=applets)
        (built / INITRD_NAME).unlink()  # a hard link to the old one: never write through it
        archive.write_gzip(built / INITRD_NAME)
        manifest = dict(current.manifest)
        manifest["files"] = {**current.manifest["files"], INITRD_NAME: file_record(built / INITRD_NAME)}
        manifest["initramfs_recipe"] = recipe_digest(current.module_order, current.kernel_release)
        manifest["busybox_applets"] = len(applets or ())
        write_manifest(built, manifest)
        install_asset_set(built, current.directory)
    refreshed = check_complete(current.directory, verify_hashes=False)
    if refreshed is None:
        raise CacheError(f"the asset set in {current.directory} is incomplete right after rebuilding its initramfs")
    return refreshed


def _link_tree(assets: GuestAssets, built: Path) -> None:
    """Every file the manifest lists, hard-linked (copied where links fail) into ``built``."""
    try:
        for name, source in assets.files().items():
            destination = built / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, destination)
            except OSError:
                shutil.copy2(source, destination)
    except OSError as exc:
        raise CacheError(f"cannot copy the asset set in {assets.directory}: {exc.strerror}") from exc
    if (built / MANIFEST_NAME).exists():
        (built / MANIFEST_NAME).unlink()


def _cached_module(assets: GuestAssets, name: str) -> KernelModule:
    """A module from the cache's ``modules/`` (stored decompressed; the manifest's order already puts
    dependencies first, so their names are not needed again)."""
    path = assets.modules_dir / f"{name}.ko"
    try:
        return KernelModule(name, path, path.read_bytes(), ())
    except OSError as exc:
        raise CacheError(f"the cached module {path} cannot be read: {exc.strerror}; "
                         "run 'pyemu-guest fetch --force'") from exc
