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
from pyemu.guest import initscripts
from pyemu.guest.initramfs import INIT_MARKER, POWEROFF_OPTION, build_initramfs, recipe_digest, render_init
from pyemu.guest.initscripts import (
    ACPID_CONF,
    ACPID_SCRIPT,
    CONSOLE_SCRIPT,
    POWER_BUTTON_MARKER,
    SHUTDOWN_MARKER,
    SHUTDOWN_SCRIPT,
    guest_scripts,
    render_acpid_conf,
    render_acpid_script,
    render_console_script,
    render_inittab,
    render_power_button_action,
    render_shutdown_script,
)
from pyemu.guest.modules import WANTED_MODULES, KernelModule, collect_modules, modinfo, module_name
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
        "kernel/drivers/misc/pvpanic/pvpanic": "",
        "kernel/drivers/misc/pvpanic/pvpanic-mmio": "pvpanic",
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
        "evdev", "button", "pvpanic", "pvpanic_mmio",
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
    assert entries["etc/inittab"].data == render_inittab().encode()
    assert assets.initramfs_current  # find_assets brought an older initramfs up to date
    if "button" in assets.module_order:  # fetched since the power-button modules were added
        for name in ("evdev", "button"):
            assert entries[f"lib/modules/{assets.kernel_release}/{name}.ko"].data.startswith(b"\x7fELF")


def host_shell() -> str:
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no POSIX shell on the host")
    return shell


def test_guest_scripts_are_valid_shell():
    for path, (data, mode) in guest_scripts(["virtio_ring"], RELEASE).items():
        if data.startswith(b"#!"):
            assert mode & 0o111, path
            subprocess.run([host_shell(), "-n"], input=data, check=True)


def test_inittab_hands_every_way_down_to_the_shutdown_script():
    lines = [line for line in render_inittab().splitlines() if line and not line.startswith("#")]
    assert lines == [
        f"::wait:/{ACPID_SCRIPT}",
        f"::once:/{CONSOLE_SCRIPT}",
        "::ctrlaltdel:/sbin/reboot",
        f"::shutdown:/{SHUTDOWN_SCRIPT}",
    ]
    # No respawn: a listener that cannot start would be restarted in a loop.
    assert "respawn" not in render_inittab()


def test_console_script_runs_a_session_shell_then_powers_off():
    script = render_console_script()
    assert script.index("setsid cttyhack sh") < script.index("\npoweroff\n")
    assert "poweroff -f" not in script  # the clean way, through init


def test_acpid_maps_the_power_button_to_a_clean_poweroff(tmp_path):
    conf = render_acpid_conf().splitlines()
    assert [line.split() for line in conf if not line.startswith("#")] == [["PWRF", "power-button"]]
    assert f"-a /{ACPID_CONF}" in render_acpid_script() and "-c /etc/acpi" in render_acpid_script()
    # Run the action with a stub poweroff: it announces the press and asks init for a poweroff.
    console = tmp_path / "console"
    body = render_power_button_action().replace("/dev/console", str(console))
    out = subprocess.run([host_shell(), "-c", "poweroff() { echo POWEROFF \"$@\"; }\n" + body],
                         capture_output=True, text=True, check=True).stdout
    assert out == "POWEROFF\n" and console.read_text() == POWER_BUTTON_MARKER + "\n"


def test_acpid_script_without_input_devices_goes_on(tmp_path):
    body = render_acpid_script().replace("/dev/input/event0", str(tmp_path / "event0"))
    stub = "acpid() { echo ACPID \"$@\"; }\n"
    missing = subprocess.run([host_shell(), "-c", stub + body.replace("exec acpid", "acpid")],
                             capture_output=True, text=True, check=True).stdout
    assert "ACPI power button is ignored" in missing and "ACPID" not in missing
    (tmp_path / "event0").write_text("")
    present = subprocess.run([host_shell(), "-c", stub + body.replace("exec acpid", "acpid")],
                             capture_output=True, text=True, check=True).stdout
    assert present.startswith("ACPID -d -c /etc/acpi -a /etc/acpid.conf")


def test_shutdown_script_unmounts_disks_innermost_first(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "rootfs / rootfs rw 0 0\nproc /proc proc rw 0 0\ndevtmpfs /dev devtmpfs rw 0 0\n"
        "/dev/vda /mnt ext4 rw 0 0\n/dev/vdb /mnt/inner ext4 rw 0 0\n/dev/vdc /busy ext4 rw 0 0\n"
    )
    stubs = (
        "sync() { echo SYNC; }\n"
        "umount() { [ \"$1\" = /busy ] && return 1; echo UMOUNT \"$@\"; }\n"
        "mount() { echo MOUNT \"$@\"; }\n"
    )
    body = render_shutdown_script().replace("/proc/mounts", str(mounts))
    out = subprocess.run([host_shell(), "-c", stubs + body], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [SHUTDOWN_MARKER, "SYNC", "UMOUNT /mnt/inner", "UMOUNT /mnt", "MOUNT -o remount,ro /busy",
                   "SYNC"]


def test_initramfs_carries_init_configuration_and_the_power_button_modules():
    modules = [KernelModule(name, Path(f"{name}.ko"), b"\x7fELF" + name.encode(), ())
               for name in ("virtio_ring", "evdev", "button")]
    entries = read_archive(build_initramfs(b"BB", modules, RELEASE, applets=None).to_gzip())
    for path in ("etc/inittab", ACPID_CONF, CONSOLE_SCRIPT, SHUTDOWN_SCRIPT, ACPID_SCRIPT, "etc/acpi/power-button"):
        assert entries[path].is_file, path
    assert entries["etc/inittab"].data == render_inittab().encode()
    assert entries["etc/acpi/power-button"].mode & 0o111 and entries[SHUTDOWN_SCRIPT].mode & 0o111
    for directory in ("var/run", "var/log", "etc/acpi"):
        assert entries[directory].is_dir
    init = entries["init"].data.decode()
    loads = [line.split()[1].rsplit("/", 1)[1] for line in init.splitlines() if line.startswith("insmod ")]
    assert loads == ["virtio_ring.ko", "evdev.ko", "button.ko"]


def test_recipe_digest_follows_the_scripts_and_the_module_list(monkeypatch):
    digest = recipe_digest(["virtio_ring", "button"], RELEASE)
    assert digest == recipe_digest(["virtio_ring", "button"], RELEASE)
    assert digest != recipe_digest(["virtio_ring"], RELEASE)
    assert digest != recipe_digest(["button", "virtio_ring"], RELEASE)
    assert digest != recipe_digest(["virtio_ring", "button"], "6.1.0-1-amd64")
    monkeypatch.setattr(initscripts, "render_inittab", lambda: "::once:/bin/sh\n")
    assert digest != recipe_digest(["virtio_ring", "button"], RELEASE)


def test_wanted_modules_include_the_power_button_after_evdev():
    assert WANTED_MODULES.index("evdev") < WANTED_MODULES.index("button")
