"""Virtio command lines a user gets wrong: one clear line naming the problem, exit status 1, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyemu.system.main", "-kernel", "/nonexistent-kernel",
                           "-serial", "null", *argv], capture_output=True, text=True, timeout=60)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return path


@pytest.mark.parametrize("argv, message", [
    (("-device", "virtio-blk-device"), "Property 'drive' is required"),
    (("-device", "virtio-blk-device,drive=nope"), "Property 'virtio-blk-device.drive' can't find value 'nope'"),
    (("-device", "virtio-rng-device,bogus=1"), "Property 'virtio-rng-device.bogus' not found"),
    (("-device", "virtio-rng-device,iothread=io9"), "Property 'virtio-rng-device.iothread' can't find value 'io9'"),
    (("-device", "virtio-rng-device,rng=r0"), "Property 'virtio-rng-device.rng' can't find value 'r0'"),
    (("-object", "rng-random,id=r0,filename=/nonexistent", "-device", "virtio-rng-device,rng=r0"),
     "Could not open '/nonexistent'"),
    (("-object", "frobnicator,id=x"), "invalid object type: frobnicator"),
    (("-object", "iothread,id=io0,poll-max-ns=-1"), "poll-max-ns value must be in range [0, 9223372036854775807]"),
    (("-object", "iothread,id=io0,poll-grow=fast"), "Parameter 'poll-grow' expects an int64 value"),
    (("-device", "virtconsole,chardev=c0", "-chardev", "null,id=c0"),
     "No 'virtio-serial-bus' bus found for device 'virtconsole'"),
    (("-chardev", "bogus,id=c0"), "'bogus' is not a valid char driver name"),
    (("-chardev", "stdio,id=c0", "-serial", "stdio"), "cannot use stdio by multiple character devices"),
    (("-drive", "file=/nonexistent.img,if=virtio"), "Could not open '/nonexistent.img'"),
    (("-device", "virtio-net-device,netdev=n0"), "Property 'virtio-net-device.netdev' can't find value 'n0'"),
    (("-device", "vhost-vsock-device,guest-cid=2,uds-path=/tmp/x.sock"), "guest-cid"),
    (tuple(a for _ in range(9) for a in ("-device", "virtio-rng-device")), "virtio-mmio slots and all are taken"),
])
def test_bad_virtio_options(argv: tuple[str, ...], message: str) -> None:
    done = run(*argv)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_drive_serves_one_device_only(image: Path) -> None:
    done = run("-drive", f"file={image},if=none,id=d0", "-device", "virtio-blk-device,drive=d0",
               "-device", "virtio-blk-device,drive=d0")
    assert done.returncode == 1 and "drive 'd0' is already in use" in done.stderr, done.stderr


def test_duplicate_device_ids(image: Path) -> None:
    done = run("-device", "virtio-rng-device,id=x", "-device", "virtio-rng-device,id=x")
    assert done.returncode == 1 and "Duplicate ID 'x' for device" in done.stderr, done.stderr
