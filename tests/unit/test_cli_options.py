"""QEMU-style command-line parsing into VmConfig."""

import subprocess
import sys

import pytest

from pyemu.errors import ConfigError
from pyemu.system.options import EarlyExit, parse_args


def test_full_command_line():
    cfg = parse_args(
        "-machine microvm,acpi=off,pit=on -accel kvm:tcg -m 1G -smp 2 -kernel vmlinuz -initrd i.gz "
        "-append console=ttyS0 -serial file:/tmp/x -nographic -no-reboot -S -d unimp,int "
        "-device isa-debug-exit,iobase=0xf4,iosize=4".split()
    )
    assert cfg.machine.acpi is False and cfg.machine.pit is True and cfg.machine.pic is None
    assert cfg.accel == ("kvm", "tcg")
    assert cfg.ram_size == 1 << 30 and cfg.vcpus == 2
    assert (cfg.kernel, cfg.initrd, cfg.append) == ("vmlinuz", "i.gz", "console=ttyS0")
    assert cfg.serial == ("file:/tmp/x",) and cfg.nographic and cfg.no_reboot and cfg.start_paused
    assert cfg.log_mask == {"unimp", "int"}
    assert cfg.devices[0].driver == "isa-debug-exit" and cfg.devices[0].prop("iobase") == "0xf4"


@pytest.mark.parametrize("text,size", [("512", 512 << 20), ("2G", 2 << 30), ("1.5G", 3 << 29),
                                       ("size=256M", 256 << 20), ("65536k", 64 << 20)])
def test_memory_sizes(text, size):
    assert parse_args(["-m", text]).ram_size == size


@pytest.mark.parametrize("argv,fragment", [
    (["-foo"], "-foo: invalid option"),
    (["-m"], "-m: requires an argument"),
    (["-m", "12x"], "invalid size"),
    (["-m", "1M"], "at least 16 MiB"),
    (["-smp", "0"], "must be greater than zero"),
    (["-smp", "65"], "between 1 and"),
    (["-smp", "two"], "expects a number"),
    (["-machine", "pc"], "unsupported machine type"),
    (["-machine", "microvm,acpi=maybe"], "expects 'on' or 'off'"),
    (["-machine", "microvm,bogus=on"], "Property 'microvm.bogus' not found"),
    (["-accel", "xen"], "invalid accelerator xen"),
    (["-d", "nope"], "unknown log category"),
    (["-initrd", "x"], "only valid with -kernel"),
    (["stray"], "invalid option"),
])
def test_bad_options_are_config_errors(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_args(argv)


def test_help_and_version_are_early_exits():
    with pytest.raises(EarlyExit, match="-machine"):
        parse_args(["-help"])
    with pytest.raises(EarlyExit, match="pyemu version"):
        parse_args(["-version"])


def test_cli_unknown_option_exits_1_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "pyemu.system.main", "-bogus"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "pyemu: -bogus: invalid option"
    assert proc.stdout == ""


def test_snapshot_flag_applies_to_every_drive(tmp_path):
    from pyemu.machines.virtio_devices import Backends

    image = tmp_path / "d.img"
    image.write_bytes(bytes(65536))
    cfg = parse_args(["-snapshot", "-drive", f"file={image},format=raw,if=none,id=d0"])
    assert cfg.snapshot
    backend, options = Backends(cfg).drive("d0", "virtio-blk-device")
    assert options.snapshot
    backend.pwritev(0, [b"x" * 512])
    backend.close()
    assert image.read_bytes() == bytes(65536)


def test_pidfile_holds_the_pid_is_locked_and_goes_away(tmp_path):
    from pyemu.system.pidfile import PidFile

    path = tmp_path / "vm.pid"
    first = PidFile(str(path))
    assert path.read_text() == f"{__import__('os').getpid()}\n"
    # No -kernel: the default guest would boot, but the locked pid file ends pyemu before anything loads.
    proc = subprocess.run([sys.executable, "-m", "pyemu.system.main", "-pidfile", str(path), "-nographic"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "Cannot lock pid file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    first.remove()
    assert not path.exists()
    assert parse_args(["-pidfile", str(path)]).pidfile == str(path)
