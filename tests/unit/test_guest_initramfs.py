"""Module collection (dependencies from .modinfo, compressed modules) and the initramfs contents."""

import gzip
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from pyemu.guest.assets import find_assets
from pyemu.guest.cpio import read_archive
from pyemu.guest.errors import PackageContentError
from pyemu.guest.initramfs import INIT_MARKER, POWEROFF_OPTION, build_initramfs, render_init
from pyemu.guest.modules import KernelModule, collect_modules, modinfo, module_name
from pyemu.target.x86.boot.synthetic import make_elf

RELEASE = "9.9.9-test-amd64"


def fake_module(name: str, depends: str = "") -> bytes:
    info = f"license=GPL\0depends={depends}\0name={name}\0vermagic={RELEASE}\0".encode()
    return make_elf(elf_type=1, sections={".text": b"\xc3", ".modinfo": info})


def write_modules_tree(root, compress_xz=("virtio_net",)):
    """A lib/modules/<release> tree shaped like Debian's, some modules .ko.xz, one file named with '-'."""
    base = root / "lib" / "modules" / RELEASE
    layout = {
        "kernel/drivers/virtio/virtio_ring": "",
        "kernel/drivers/virtio/virtio": "virtio_ring",
        "kernel/drivers/virtio/virtio_mmio": "virtio,virtio_ring",
        "kernel/drivers/block/virtio_blk": "virtio,virtio_ring",
        "kernel/drivers/net/virtio_net": "virtio_ring,virtio,net_failover",
        "kernel/drivers/net/net_failover": "failover",
        "kernel/net/core/failover": "",
        "kernel/drivers/char/virtio_console": "virtio,virtio_ring",
        "kernel/drivers/char/hw_random/virtio-rng": "virtio,virtio_ring",
        "kernel/net/vmw_vsock/vsock": "",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common": "vsock",
        "kernel/net/vmw_vsock/vmw_vsock_virtio_transport": "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock",
        "kernel/drivers/input/evdev": "",
        "kernel/drivers/acpi/button": "",
        "kernel/fs/unrelated": "",
    }
    for relative, depends in layout.items():
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        data = fake_module(module_name(path.with_suffix(".ko")), depends)
        if path.name in compress_xz:
            (path.parent / (path.name + ".ko.xz")).write_bytes(lzma.compress(data, check=lzma.CHECK_CRC32))
        else:
            (path.parent / (path.name + ".ko")).write_bytes(data)
    (base / "modules.builtin").write_text("kernel/drivers/char/hw_random/rng-core.ko\n")
    return base


def test_module_names():
    assert module_name(Path("virtio-rng.ko")) == "virtio_rng"
    assert module_name(Path("virtio_net.ko.xz")) == "virtio_net"
    assert module_name(Path("failover.ko.zst")) == "failover"


def test_modinfo_depends():
    info = modinfo(fake_module("virtio_mmio", "virtio,virtio_ring"), source=Path("virtio_mmio.ko"))
    assert info["depends"] == "virtio,virtio_ring" and info["name"] == "virtio_mmio"


def test_collect_orders_dependencies_first_and_decompresses(tmp_path):
    base = write_modules_tree(tmp_path)
    modules, missing = collect_modules(base)
    names = [m.name for m in modules]
    assert names == [
        "virtio_ring", "virtio", "virtio_mmio", "virtio_blk",
        "failover", "net_failover", "virtio_net", "virtio_console", "virtio_rng",
        "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
        "evdev", "button",
    ]
    assert missing == []
    for module in modules:  # every dependency is loaded before its user
        assert all(names.index(dep) < names.index(module.name) for dep in module.depends)
    net = modules[names.index("virtio_net")]
    assert net.source.name == "virtio_net.ko.xz" and net.data.startswith(b"\x7fELF")


def test_missing_and_builtin_modules(tmp_path):
    base = write_modules_tree(tmp_path)
    (base / "kernel/drivers/block/virtio_blk.ko").unlink()
    (base / "modules.builtin").write_text("kernel/drivers/char/virtio_console.ko\n")
    modules, missing = collect_modules(base)
    assert missing == ["virtio_blk"]
    assert "virtio_console" not in [m.name for m in modules]  # built in: nothing to load


def test_missing_dependency_is_an_error(tmp_path):
    base = write_modules_tree(tmp_path)
    (base / "kernel/net/core/failover.ko").unlink()
    with pytest.raises(PackageContentError, match="depends on failover"):
        collect_modules(base)


def test_gzip_module(tmp_path):
    base = write_modules_tree(tmp_path, compress_xz=())
    path = base / "kernel/drivers/virtio/virtio_ring.ko"
    (path.parent / "virtio_ring.ko.gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    modules, _ = collect_modules(base, ("virtio_ring",))
    assert modules[0].source.name == "virtio_ring.ko.gz" and modules[0].data.startswith(b"\x7fELF")


def test_init_script():
    script = render_init(["virtio_ring", "virtio", "virtio_mmio"], RELEASE)
    assert script.startswith("#!/bin/busybox sh\n")
    for needed in ("mount -t proc proc /proc", "mount -t sysfs sysfs /sys", "mount -t devtmpfs devtmpfs /dev",
                   INIT_MARKER, "/proc/uptime", POWEROFF_OPTION, "poweroff -f"):
        assert needed in script
    # The last thing /init does is hand PID 1 to busybox init, which acts on poweroff/reboot/halt.
    assert script.rstrip().splitlines()[-1] == "exec /bin/busybox init"
    loads = [line.split()[1] for line in script.splitlines() if line.startswith("insmod ")]
    assert loads == [f"/lib/modules/{RELEASE}/{n}.ko" for n in ("virtio_ring", "virtio", "virtio_mmio")]
    assert script.index("insmod") < script.index(INIT_MARKER) < script.index(POWEROFF_OPTION)
    shell = shutil.which("sh")
    if shell:  # syntax check with the host's POSIX shell
        subprocess.run([shell, "-n"], input=script.encode(), check=True)


def test_init_script_poweroff_logic_runs(tmp_path):
    """Run the command-line part of /init with stub commands: the option triggers poweroff."""
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no POSIX shell on the host")
    script = render_init([], RELEASE)
    part = script[script.index("read uptime") : script.index("exec /bin/busybox init")]
    uptime = tmp_path / "uptime"
    uptime.write_text("1.23 0.50\n")
    for cmdline, powered in (("console=ttyS0 pyemu.poweroff=1", True), ("console=ttyS0", False)):
        (tmp_path / "cmdline").write_text(cmdline + "\n")
        body = part.replace("/proc/uptime", str(uptime)).replace("/proc/cmdline", str(tmp_path / "cmdline"))
        out = subprocess.run(
            [shell, "-c", "poweroff() { echo POWEROFF \"$@\"; exit 0; }\n" + body],
            capture_output=True, text=True, check=True,
        ).stdout
        assert f"{INIT_MARKER} (uptime 1.23 s)" in out
        assert ("POWEROFF -f" in out) == powered


def test_initramfs_contents():
    modules = [
        KernelModule("virtio_ring", Path("virtio_ring.ko"), b"\x7fELFring", ()),
        KernelModule("virtio", Path("virtio.ko"), b"\x7fELFv", ("virtio_ring",)),
    ]
    archive = build_initramfs(
        b"BUSYBOX", modules, RELEASE, applets=["bin/sh", "sbin/poweroff", "usr/bin/setsid", "bin/busybox"],
        extra_files={"usr/bin/testprog": (b"prog", 0o755)},
    )
    entries = read_archive(archive.to_gzip())
    assert entries["bin/busybox"].data == b"BUSYBOX" and entries["bin/busybox"].mode & 0o111
    assert entries["bin/sh"].link_target == "/bin/busybox"
    assert entries["sbin/poweroff"].link_target == "/bin/busybox"
    assert not entries["bin/busybox"].is_symlink
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    for directory in ("proc", "sys", "dev", "tmp"):
        assert entries[directory].is_dir
    assert entries[f"lib/modules/{RELEASE}/virtio_ring.ko"].data == b"\x7fELFring"
    init = entries["init"]
    assert init.mode == stat.S_IFREG | 0o755 and INIT_MARKER.encode() in init.data
    assert entries["usr/bin/testprog"].data == b"prog"


def test_real_initramfs():
    assets = find_assets()
    if assets is None:
        pytest.skip("Debian guest assets not fetched (run 'pyemu-guest fetch')")
    entries = read_archive(assets.initrd.read_bytes())
    assert entries["bin/busybox"].data == assets.busybox.read_bytes()
    assert entries["bin/sh"].link_target == "/bin/busybox"
    for name in ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console"):
        assert entries[f"lib/modules/{assets.kernel_release}/{name}.ko"].data.startswith(b"\x7fELF")
    assert INIT_MARKER.encode() in entries["init"].data
