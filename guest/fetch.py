"""``pyemu-guest fetch``: build the Debian 6.1 guest assets in the cache, once.

Steps: download ``linux-image-amd64`` (the metapackage) and ``busybox-static`` with ``apt-get download``,
follow the metapackage's Depends to the versioned kernel package and download it, unpack with
``dpkg-deb -x``, then write into ``<cache>/guest/debian-6.1/``: ``vmlinuz`` (bzImage), ``vmlinux``
(ELF extracted from the bzImage, for PVH), ``config``, ``busybox``, the guest's modules
(decompressed) under ``modules/``, ``initramfs.cpio.gz`` and ``manifest.json`` (package versions and
SHA-256 of every file).

Idempotent: when the manifest matches the files, nothing is downloaded; when only the initramfs recipe
changed (pyemu's init scripts), the initramfs is rebuilt from the cached busybox and modules
(:mod:`pyemu.guest.refresh`). The set is built in a scratch directory next to the final one and moved into
place only when complete, under a lock file, so an interrupted or concurrent fetch never leaves a
half-written set that looks complete.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pyemu.guest.assets import (
    ASSET_SET,
    BUSYBOX_NAME,
    CONFIG_NAME,
    INITRD_NAME,
    KERNEL_NAME,
    MANIFEST_FORMAT,
    MODULES_DIR,
    VMLINUX_NAME,
    GuestAssets,
    asset_dir,
    asset_lock,
    check_complete,
    file_record,
    install_asset_set,
    scratch_directory,
    write_manifest,
)
from pyemu.guest.debs import (
    BUSYBOX_PACKAGE,
    KERNEL_METAPACKAGE,
    DebPackage,
    deb_fields,
    extract_deb,
    kernel_package_from_depends,
    obtain_deb,
)
from pyemu.guest.errors import OWN_ASSETS_HINT, CacheError, FetchUnavailable, PackageContentError
from pyemu.guest.initramfs import build_initramfs, busybox_applets, recipe_digest
from pyemu.guest.modules import WANTED_MODULES, collect_modules, find_modules_root
from pyemu.guest.refresh import rebuild_initramfs_locked
from pyemu.guest.vmlinux import extract_vmlinux_file

Reporter = Callable[[str], None]

__all__ = ["FetchResult", "FetchUnavailable", "fetch_assets", "run_fetch"]


@dataclass(frozen=True)
class FetchResult:
    assets: GuestAssets
    downloaded: bool  # False when the cache was already complete
    seconds: float
    refreshed: bool = False  # only the initramfs was rebuilt, from cached parts (nothing downloaded)


def _quiet(_: str) -> None:
    pass


def fetch_assets(
    cache: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    debs_dir: str | os.PathLike[str] | None = None,
    report: Reporter = _quiet,
) -> GuestAssets:
    """The complete asset set in ``cache``, fetched and built first if needed (see :func:`run_fetch`)."""
    return run_fetch(cache, force=force, debs_dir=debs_dir, report=report).assets


def run_fetch(
    cache: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    debs_dir: str | os.PathLike[str] | None = None,
    report: Reporter = _quiet,
) -> FetchResult:
    """Make sure the asset set exists in ``cache``; build it unless it is complete (or ``force``).

    ``debs_dir`` names a directory of already-downloaded .debs to use before asking apt-get. The result
    also says whether anything was built and how long it took (for the CLI).
    """
    started = time.monotonic()
    target = asset_dir(cache)
    with asset_lock(target):
        if not force:
            existing = check_complete(target, verify_hashes=True)
            if existing is not None and _modules_current(existing):
                if existing.initramfs_current:
                    report(f"guest assets already complete in {target}")
                    return FetchResult(existing, False, time.monotonic() - started)
                refreshed = rebuild_initramfs_locked(existing, report=report)
                return FetchResult(refreshed, False, time.monotonic() - started, refreshed=True)
            if existing is not None:
                report(f"guest assets in {target} were built for another module list; rebuilding")
        with scratch_directory(target) as scratch:
            _build_asset_set(scratch, Path(debs_dir) if debs_dir else None, report)
            install_asset_set(scratch / "out", target)
    assets = check_complete(target, verify_hashes=False)
    if assets is None:
        raise CacheError(f"the asset set in {target} is incomplete right after building it")
    return FetchResult(assets, True, time.monotonic() - started)


def _modules_current(assets: GuestAssets) -> bool:
    """Was the set built for today's :data:`WANTED_MODULES`? A set from before a driver was added (or
    from before the manifest recorded the list) is rebuilt by ``fetch``, so the new driver reaches the
    initramfs without anyone deleting the cache. :func:`find_assets` still accepts the older set (with
    its initramfs scripts brought up to date): boot tests that do not need the new driver keep running,
    and those that do check ``module_order``. A set whose modules are current but whose initramfs recipe
    is not only gets its initramfs rebuilt, from the cached parts."""
    return assets.manifest.get("wanted_modules") == list(WANTED_MODULES)


def _build_asset_set(scratch: Path, debs_dir: Path | None, report: Reporter) -> None:
    downloads = scratch / "debs"
    downloads.mkdir()
    output = scratch / "out"
    output.mkdir()

    report(f"getting {KERNEL_METAPACKAGE} and {BUSYBOX_PACKAGE}")
    meta = obtain_deb(KERNEL_METAPACKAGE, downloads, local_dir=debs_dir)
    kernel_package = kernel_package_from_depends(deb_fields(meta.path, "Depends")["Depends"])
    busybox_deb = obtain_deb(BUSYBOX_PACKAGE, downloads, local_dir=debs_dir)
    report(f"getting {kernel_package}")
    kernel_deb = obtain_deb(kernel_package, downloads, local_dir=debs_dir)

    report("unpacking")
    kernel_root = extract_deb(kernel_deb.path, scratch / "kernel")
    busybox_root = extract_deb(busybox_deb.path, scratch / "busybox")

    modules_root, release = find_modules_root(kernel_root)
    vmlinuz = _single(kernel_root / "boot", f"vmlinuz-{release}", kernel_deb)
    shutil.copyfile(vmlinuz, output / KERNEL_NAME)
    # Debian's System.map is a placeholder (the symbols are in the -dbg package), so only the config is kept.
    config = kernel_root / "boot" / f"config-{release}"
    if config.is_file():
        shutil.copyfile(config, output / CONFIG_NAME)

    report("extracting vmlinux from the bzImage")
    extract_vmlinux_file(output / KERNEL_NAME, output / VMLINUX_NAME)

    busybox = _find_busybox(busybox_root, busybox_deb)
    shutil.copyfile(busybox, output / BUSYBOX_NAME)
    os.chmod(output / BUSYBOX_NAME, 0o755)

    report("collecting kernel modules")
    modules, missing = collect_modules(modules_root)
    for name in missing:
        report(f"warning: the kernel package has no module {name}; the guest will lack that driver")
    (output / MODULES_DIR).mkdir()
    for module in modules:
        (output / MODULES_DIR / f"{module.name}.ko").write_bytes(module.data)

    report("building the initramfs")
    applets = busybox_applets(output / BUSYBOX_NAME)
    if applets is None:
        report("note: busybox cannot run on this host; /init will install its applet links at boot")
    archive = build_initramfs((output / BUSYBOX_NAME).read_bytes(), modules, release, applets=applets)
    archive.write_gzip(output / INITRD_NAME)

    files = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    manifest = {
        "format": MANIFEST_FORMAT,
        "asset_set": ASSET_SET,
        "kernel_release": release,
        "packages": {
            meta.name: meta.version,
            kernel_deb.name: kernel_deb.version,
            busybox_deb.name: busybox_deb.version,
        },
        "modules": [m.name for m in modules],
        "wanted_modules": list(WANTED_MODULES),
        "initramfs_recipe": recipe_digest([m.name for m in modules], release),
        "missing_modules": missing,
        "busybox_applets": len(applets or ()),
        "files": {name: file_record(output / name) for name in files},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_manifest(output, manifest)


def _single(directory: Path, name: str, package: DebPackage) -> Path:
    path = directory / name
    if not path.is_file():
        raise PackageContentError(f"{package.path.name} has no {directory.name}/{name}; {OWN_ASSETS_HINT}")
    return path


def _find_busybox(root: Path, package: DebPackage) -> Path:
    for candidate in (root / "bin" / "busybox", root / "usr" / "bin" / "busybox"):
        if candidate.is_file():
            return candidate
    raise PackageContentError(f"{package.path.name} contains no bin/busybox; {OWN_ASSETS_HINT}")
