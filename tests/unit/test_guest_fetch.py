"""pyemu-guest fetch end to end on small fake Debian packages (built with dpkg-deb -b), offline.

The fake apt-get on PATH "downloads" by copying from a directory, so the real code path (apt-get
download, metapackage Depends, dpkg-deb -x) runs without a network.
"""

import json
import lzma
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyemu.guest import cli
from pyemu.guest.assets import asset_dir, cache_root, check_complete, find_assets
from pyemu.guest.cpio import read_archive
from pyemu.guest.errors import AptError, ToolMissingError
from pyemu.guest.fetch import FetchUnavailable, fetch_assets, run_fetch
from pyemu.guest.initramfs import INIT_MARKER
from pyemu.target.x86.boot.synthetic import BzImageSpec, make_bzimage, make_elf, make_pvh_elf

RELEASE = "9.9.9-test-amd64"
ELF = make_pvh_elf(b"\xf4" * 64)

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")


def fake_module(name, depends=""):
    return make_elf(elf_type=1, sections={".modinfo": f"depends={depends}\0name={name}\0".encode()})


def build_deb(root, name, version, files, depends=None):
    tree = root / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True)
    control = f"Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: test <t@example.org>\n"
    if depends:
        control += f"Depends: {depends}\n"
    control += "Description: test package\n"
    (tree / "DEBIAN" / "control").write_text(control)
    for relative, (data, mode) in files.items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chmod(path, mode)
    output = root / f"{name}_{version.split(':')[-1]}_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "-b", str(tree), str(output)],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return output


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    root = tmp_path_factory.mktemp("debs")
    payload = lzma.compress(ELF, check=lzma.CHECK_CRC32) + struct.pack("<I", len(ELF))
    modules = f"lib/modules/{RELEASE}/kernel/drivers"
    kernel_files = {
        f"boot/vmlinuz-{RELEASE}": (make_bzimage(BzImageSpec(payload=payload)), 0o644),
        f"boot/config-{RELEASE}": (b"CONFIG_VIRTIO=m\n", 0o644),
        f"boot/System.map-{RELEASE}": (b"placeholder\n", 0o644),
        f"{modules}/virtio/virtio_ring.ko": (fake_module("virtio_ring"), 0o644),
        f"{modules}/virtio/virtio.ko.xz": (lzma.compress(fake_module("virtio", "virtio_ring")), 0o644),
        f"{modules}/virtio/virtio_mmio.ko": (fake_module("virtio_mmio", "virtio,virtio_ring"), 0o644),
        f"{modules}/block/virtio_blk.ko": (fake_module("virtio_blk", "virtio,virtio_ring"), 0o644),
    }
    busybox = (
        b"#!/bin/sh\n"
        b"[ \"$1\" = --list-full ] && printf 'bin/sh\\nsbin/poweroff\\nusr/bin/setsid\\n' && exit 0\n"
        b"exit 1\n"
    )
    build_deb(root, f"linux-image-{RELEASE}", "9.9.9-1", kernel_files)
    build_deb(root, "linux-image-amd64", "9.9.9-1", {}, depends=f"linux-image-{RELEASE} (= 9.9.9-1)")
    build_deb(root, "busybox-static", "1:1.35.0-test", {"bin/busybox": (busybox, 0o755)})
    return root


@pytest.fixture
def fake_apt(tmp_path, debs, monkeypatch):
    """An apt-get on PATH whose 'download' copies from the fake package directory, logging each call."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "apt.log"
    script = bindir / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f"echo \"$@\" >> {log}\n"
        "[ \"$1\" = download ] || exit 1\n"
        f"for f in {debs}/\"$2\"_*.deb; do\n"
        "  [ -e \"$f\" ] || { echo \"E: Unable to locate package $2\" >&2; exit 100; }\n"
        "  cp \"$f\" .\n"
        "done\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return log


def test_cache_root_precedence(tmp_path):
    assert cache_root({"PYEMU_CACHE": "/x/y", "XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/x/y")
    assert cache_root({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/pyemu")
    assert cache_root({"HOME": "/h"}) == Path("/h/.cache/pyemu")
    assert asset_dir("/z") == Path("/z/guest/debian-6.1")


def test_fetch_through_apt_get_download(tmp_path, fake_apt):
    cache = tmp_path / "cache"
    result = run_fetch(cache)
    assert result.downloaded
    calls = fake_apt.read_text().splitlines()
    assert calls == ["download linux-image-amd64", "download busybox-static", f"download linux-image-{RELEASE}"]

    assets = result.assets
    assert assets.directory == asset_dir(cache)
    assert assets.kernel.read_bytes()[0x202:0x206] == b"HdrS"
    assert assets.vmlinux.read_bytes() == ELF
    assert assets.kernel_release == RELEASE
    assert assets.module_order == ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
    manifest = json.loads((assets.directory / "manifest.json").read_text())
    assert manifest["packages"] == {
        "linux-image-amd64": "9.9.9-1", f"linux-image-{RELEASE}": "9.9.9-1", "busybox-static": "1:1.35.0-test",
    }
    assert set(manifest["missing_modules"]) == {"virtio_net", "virtio_console", "virtio_rng", "vsock",
                                                "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
                                                "evdev", "button", "pvpanic_mmio"}
    assert "System.map" not in manifest["files"]
    for name, record in manifest["files"].items():
        assert (assets.directory / name).stat().st_size == record["size"]
    assert (assets.modules_dir / "virtio.ko").read_bytes().startswith(b"\x7fELF")  # decompressed

    entries = read_archive(assets.initrd.read_bytes())
    assert entries["bin/sh"].link_target == "/bin/busybox"
    assert entries[f"lib/modules/{RELEASE}/virtio_mmio.ko"].data.startswith(b"\x7fELF")
    assert INIT_MARKER.encode() in entries["init"].data
    assert find_assets(cache) is not None

    # Idempotent: nothing downloaded again; --force rebuilds.
    again = run_fetch(cache)
    assert not again.downloaded and len(fake_apt.read_text().splitlines()) == 3
    forced = run_fetch(cache, force=True)
    assert forced.downloaded and len(fake_apt.read_text().splitlines()) == 6
    assert forced.assets.initrd.read_bytes() == assets.initrd.read_bytes()  # reproducible


def test_corrupt_cache_is_rebuilt(tmp_path, debs):
    cache = tmp_path / "cache"
    assets = fetch_assets(cache, debs_dir=debs)
    data = bytearray(assets.vmlinux.read_bytes())
    data[100] ^= 0xFF
    assets.vmlinux.write_bytes(bytes(data))
    assert check_complete(assets.directory, verify_hashes=False) is not None  # same size
    assert check_complete(assets.directory, verify_hashes=True) is None
    result = run_fetch(cache, debs_dir=debs)
    assert result.downloaded and result.assets.vmlinux.read_bytes() == ELF
    assets.initrd.unlink()
    assert find_assets(cache) is None


def test_apt_get_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(ToolMissingError, match="-kernel/-initrd") as info:
        fetch_assets(tmp_path / "cache")
    assert info.value.tool == "apt-get" and isinstance(info.value, FetchUnavailable)
    assert not list((tmp_path / "cache" / "guest").glob(".debian-6.1.partial*"))  # scratch removed


def test_apt_get_failure(tmp_path, fake_apt, debs, monkeypatch):
    empty = tmp_path / "nodebs"
    empty.mkdir()
    script = (tmp_path / "bin" / "apt-get").read_text().replace(str(debs), str(empty))
    (tmp_path / "bin" / "apt-get").write_text(script)
    with pytest.raises(AptError, match="Unable to locate package.*\n.*-kernel/-initrd") as info:
        fetch_assets(tmp_path / "cache")
    assert info.value.returncode == 100 and "apt-get update" in str(info.value)
    assert isinstance(info.value, FetchUnavailable)


def test_cli_path_and_fetch(tmp_path, debs, capsys, monkeypatch):
    cache = str(tmp_path / "cache")
    assert cli.main(["path", "--cache", cache]) == cli.EXIT_NOT_FETCHED
    assert "pyemu-guest fetch" in capsys.readouterr().err
    assert cli.main(["fetch", "--cache", cache, "--debs", str(debs)]) == 0
    out = capsys.readouterr()
    assert "assets built" in out.err and f"{cache}/guest/debian-6.1/vmlinuz" in out.out
    assert cli.main(["path", "--cache", cache, "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert paths["initrd"].endswith("initramfs.cpio.gz") and os.path.exists(paths["vmlinux"])
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert cli.main(["fetch", "--cache", str(tmp_path / "other")]) == cli.EXIT_ERROR
    assert "pyemu-guest: error: 'apt-get' is not installed" in capsys.readouterr().err
