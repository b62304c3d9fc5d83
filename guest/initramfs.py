"""The guest initramfs: busybox, the kernel modules, /init and busybox init's configuration.

What runs in the guest, and why in two stages, is in :mod:`pyemu.guest.initscripts`; this module lays the
archive out and names its recipe: :func:`recipe_digest` hashes everything the archive holds besides the
busybox binary and the module objects, and the asset manifest records it, so an asset cache built by an
older pyemu gets the new initramfs rebuilt from its cached busybox and modules (see
:mod:`pyemu.guest.refresh`) without downloading anything.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Iterable

from pyemu.guest.cpio import CpioArchive
from pyemu.guest.initscripts import (
    INIT_MARKER,
    POWEROFF_OPTION,
    guest_scripts,
    module_path,
    render_init,
)
from pyemu.guest.modules import KernelModule

__all__ = [
    "INIT_MARKER", "POWEROFF_OPTION", "build_initramfs", "busybox_applets", "module_path", "recipe_digest",
    "render_init",
]

BUSYBOX_PATH = "bin/busybox"
BASE_DIRECTORIES = (
    "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "root", "etc", "etc/pyemu", "etc/acpi",
    "lib/modules", "var", "var/log", "var/run",
)
# Device nodes the kernel needs before devtmpfs is mounted: it opens /dev/console for /init's stdio.
DEVICE_NODES = (
    ("dev/console", "c", 5, 1, 0o600),
    ("dev/null", "c", 1, 3, 0o666),
    ("dev/ttyS0", "c", 4, 64, 0o600),
)
# Bump when the archive layout changes in a way the lists above and the scripts do not show.
LAYOUT_VERSION = 2


def recipe_digest(module_names: Iterable[str], release: str) -> str:
    """SHA-256 over the archive's layout and generated files for these modules: what decides whether a
    cached initramfs is current (busybox and the modules are inputs with their own records)."""
    names = list(module_names)
    digest = hashlib.sha256()
    digest.update(json.dumps([LAYOUT_VERSION, BASE_DIRECTORIES, DEVICE_NODES, names, release]).encode())
    for path, (data, mode) in sorted(guest_scripts(names, release).items()):
        digest.update(f"\0{path}\0{mode:o}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def busybox_applets(busybox: Path) -> list[str] | None:
    """Install paths of every applet (``busybox --list-full``, e.g. "sbin/poweroff"), or None if the
    binary cannot run on this host (then /init runs ``busybox --install -s`` at boot instead)."""
    try:
        completed = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if completed.returncode != 0:
        return None
    applets = [line.strip().lstrip("/") for line in completed.stdout.splitlines() if line.strip()]
    return applets or None


def build_initramfs(
    busybox: bytes,
    modules: list[KernelModule],
    release: str,
    *,
    applets: list[str] | None,
    extra_files: dict[str, tuple[bytes, int]] | None = None,
) -> CpioArchive:
    """The archive: directories, /dev/console, busybox and its applet links, modules, busybox init's
    configuration and scripts, /init.

    ``extra_files`` maps archive paths to ``(data, mode)``, for tests that add their own programs.
    """
    archive = CpioArchive()
    for directory in BASE_DIRECTORIES:
        archive.add_directory(directory)
    archive.add_directory("tmp", 0o1777)
    archive.add_directory("root", 0o700)
    for path, kind, major, minor, mode in DEVICE_NODES:
        archive.add_device(path, kind, major, minor, mode)
    archive.add_file(BUSYBOX_PATH, busybox, 0o755)
    for applet in applets or ():
        if applet != BUSYBOX_PATH and applet not in archive:
            archive.add_symlink(applet, "/bin/busybox")
    for module in modules:
        archive.add_file(module_path(release, module.name), module.data, 0o644)
    scripts = guest_scripts([m.name for m in modules], release)
    init = scripts.pop("init")
    for path, (data, mode) in {**scripts, **(extra_files or {})}.items():
        archive.add_file(path, data, mode)
    archive.add_file("init", *init)
    return archive
