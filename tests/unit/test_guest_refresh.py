"""An asset cache built by an older pyemu gets today's initramfs from its cached busybox and modules:
through find_assets (what pyemu and the tests call) and through pyemu-guest fetch, without a download."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyemu.guest import cli
from pyemu.guest.assets import asset_dir, asset_lock, check_complete, file_record, find_assets
from pyemu.guest.cpio import CpioArchive, read_archive
from pyemu.guest.errors import CacheError
from pyemu.guest.fetch import run_fetch
from pyemu.guest.initramfs import recipe_digest
from pyemu.guest.initscripts import render_inittab
from pyemu.guest.modules import WANTED_MODULES
from pyemu.guest.refresh import refresh_initramfs

RELEASE = "9.9.9-test-amd64"
MODULES = ["virtio_ring", "evdev", "button"]
BUSYBOX = b"#!/bin/sh\n[ \"$1\" = --list-full ] && printf 'bin/sh\\nsbin/init\\nsbin/poweroff\\n' && exit 0\nexit 1\n"


def old_cache(root: Path, *, wanted: list[str] | None = None) -> Path:
    """A complete asset set as an older pyemu wrote it: its initramfs has a shell-script /init only and
    its manifest no initramfs recipe."""
    directory = asset_dir(root)
    (directory / "modules").mkdir(parents=True)
    (directory / "vmlinuz").write_bytes(b"bzImage")
    (directory / "vmlinux").write_bytes(b"\x7fELF vmlinux")
    (directory / "busybox").write_bytes(BUSYBOX)
    os.chmod(directory / "busybox", 0o755)
    for name in MODULES:
        (directory / "modules" / f"{name}.ko").write_bytes(b"\x7fELF" + name.encode())
    old = CpioArchive()
    old.add_file("init", b"#!/bin/busybox sh\nsetsid cttyhack sh\npoweroff -f\n", 0o755)
    old.write_gzip(directory / "initramfs.cpio.gz")
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    manifest = {
        "format": 1, "asset_set": "debian-6.1", "kernel_release": RELEASE, "modules": MODULES,
        "wanted_modules": list(WANTED_MODULES) if wanted is None else wanted, "missing_modules": [],
        "files": {name: file_record(directory / name) for name in files},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_find_assets_rebuilds_a_stale_initramfs_from_the_cache(tmp_path):
    directory = old_cache(tmp_path)
    stale = find_assets(tmp_path, refresh=False)
    assert stale is not None and not stale.initramfs_current
    vmlinux_inode = (directory / "vmlinux").stat().st_ino

    assets = find_assets(tmp_path)
    assert assets is not None and assets.initramfs_current
    assert assets.manifest["initramfs_recipe"] == recipe_digest(MODULES, RELEASE)
    entries = read_archive(assets.initrd.read_bytes())
    assert entries["etc/inittab"].data == render_inittab().encode()
    assert entries["init"].data.rstrip().endswith(b"exec /bin/busybox init")
    assert entries["sbin/init"].link_target == "/bin/busybox"  # applet links from the cached busybox
    assert [entries[f"lib/modules/{RELEASE}/{n}.ko"].data for n in MODULES] == [b"\x7fELF" + n.encode()
                                                                               for n in MODULES]
    # Everything else is the same file (hard-linked into the new set), and the manifest matches it all.
    assert (directory / "vmlinux").stat().st_ino == vmlinux_inode
    assert check_complete(directory, verify_hashes=True) is not None
    assert not [p for p in directory.parent.iterdir() if p.name != "debian-6.1" and not p.name.endswith(".lock")]
    # Current now: nothing more happens.
    initrd_inode = assets.initrd.stat().st_ino
    assert find_assets(tmp_path).initrd.stat().st_ino == initrd_inode


def test_a_set_with_an_old_module_list_still_gets_the_new_scripts(tmp_path):
    old_cache(tmp_path, wanted=["virtio_ring"])
    assets = find_assets(tmp_path)
    assert assets is not None and assets.initramfs_current
    assert assets.manifest["wanted_modules"] == ["virtio_ring"]  # fetch still rebuilds this set in full


def test_refresh_waits_for_nobody_when_a_fetch_holds_the_lock(tmp_path):
    directory = old_cache(tmp_path)
    with asset_lock(directory) as locked:
        assert locked
        assets = find_assets(tmp_path)
        assert assets is not None and not assets.initramfs_current  # returned as it is: it still boots
    assert find_assets(tmp_path).initramfs_current


def test_a_damaged_cache_is_reported_and_find_assets_falls_back(tmp_path):
    directory = old_cache(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    (directory / "modules" / "button.ko").unlink()
    del manifest["files"]["modules/button.ko"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    stale = find_assets(tmp_path, refresh=False)
    with pytest.raises(CacheError, match="button.ko cannot be read.*pyemu-guest fetch --force"):
        refresh_initramfs(stale)
    assert not find_assets(tmp_path).initramfs_current
    assert [p.name for p in directory.parent.iterdir() if not p.name.endswith(".lock")] == ["debian-6.1"]


def test_fetch_rebuilds_only_the_initramfs_without_downloading(tmp_path, monkeypatch, capsys):
    old_cache(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # any apt-get or dpkg-deb call would fail
    result = run_fetch(tmp_path)
    assert result.refreshed and not result.downloaded and result.assets.initramfs_current
    again = run_fetch(tmp_path)
    assert not again.refreshed and not again.downloaded
    old_cache(tmp_path / "other")
    assert cli.main(["fetch", "--cache", str(tmp_path / "other")]) == 0
    err = capsys.readouterr().err
    assert "rebuilding the initramfs" in err and "assets present, initramfs rebuilt" in err
