"""Shared storage across a live migration, as QEMU 7.2 does it: the destination opens the image
inactive (without its locks, so it can start while the source runs on the image), the source lets go of
it when it stops for the final state, the destination takes the locks once loaded; a cancelled migration
leaves the source holding them; a ``cont`` of the source in ``postmigrate`` fails with the lock error
while the destination has the image, and works once it has let go."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import pyemu
from pyemu.block.errors import ImageLockedError
from pyemu.block.file import FileProtocol
from pyemu.system.runstate import RunState

from migration_programs import write_dirty_kernel
from test_migration_guest import TIMEOUT, stop_vm, wait_migration
from test_migration_precopy import wait_filled

ARGS = ("-m", "32", "-accel", "tcg", "-serial", "none")


def writable_elsewhere(image: Path) -> bool:
    """Could a third user open the image read-write (nobody holds its write lock)?"""
    try:
        FileProtocol.open(str(image)).close()
    except ImageLockedError:
        return False
    return True


def test_destination_takes_the_image_locks_only_when_the_migration_ends(short_dir: Path) -> None:
    kernel = write_dirty_kernel(short_dir)
    image = short_dir / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    drive = ("-drive", f"file={image},format=raw,if=virtio")
    source = pyemu.VM("-kernel", str(kernel), *ARGS, *drive)
    source.start()
    dest = pyemu.VM("-kernel", str(kernel), *ARGS, *drive, "-incoming", "tcp:127.0.0.1:0")
    dest.start()  # would fail with 'Failed to get "write" lock' if it locked the image now
    try:
        assert not writable_elsewhere(image)  # the source holds it
        port = dest._instance.control.migration.incoming_address[1]
        source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        assert wait_migration(source)["status"] == "completed"
        assert wait_migration(dest)["status"] == "completed"
        assert source.state is RunState.POSTMIGRATE and dest.state is RunState.RUNNING
        assert not writable_elsewhere(image)  # now the destination holds it
        with pytest.raises(pyemu.CommandError, match='Failed to get "write" lock'):
            source.execute("cont")
        assert source.state is RunState.POSTMIGRATE
        stop_vm(dest)
        source.execute("cont")  # the image is free again: the source takes it back and runs
        assert source.state is RunState.RUNNING and not writable_elsewhere(image)
    finally:
        stop_vm(source)
        if dest.state is not RunState.SHUTDOWN:
            stop_vm(dest)
    assert writable_elsewhere(image)


def test_cancelled_migration_leaves_the_source_running_on_its_image(short_dir: Path) -> None:
    kernel = write_dirty_kernel(short_dir)
    image = short_dir / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    source = pyemu.VM("-kernel", str(kernel), *ARGS, "-drive", f"file={image},format=raw,if=virtio")
    source.start()
    try:
        # The guest has filled its 20 MiB buffer: the first round has seconds of data to send at 4 MiB/s
        # (before that, RAM is holes and the migration completes in a few milliseconds).
        wait_filled(source)
        source.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})  # seconds per round
        source.execute("migrate", {"uri": f"file:{short_dir / 'vm.state'}"})
        deadline = time.monotonic() + TIMEOUT
        while source.execute("query-migrate")["status"] != "active":
            assert time.monotonic() < deadline, source.execute("query-migrate")
            time.sleep(0.02)
        source.execute("migrate_cancel")
        assert wait_migration_end(source)["status"] == "cancelled"
        assert source.state is RunState.RUNNING
        assert not writable_elsewhere(image)  # still the source's
    finally:
        stop_vm(source)


def wait_migration_end(vm: pyemu.VM) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while (info := vm.execute("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, info
        time.sleep(0.02)
    return info


def test_a_paused_source_hands_its_image_over_too(short_dir: Path) -> None:
    """QEMU inactivates the source's images at the end of every migration, whatever the run state: a
    source paused before ``migrate`` lets go of its image, the destination (paused, as the source was)
    takes it."""
    kernel = write_dirty_kernel(short_dir)
    image = short_dir / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    drive = ("-drive", f"file={image},format=raw,if=virtio")
    source = pyemu.VM("-kernel", str(kernel), *ARGS, *drive)
    source.start()
    dest = pyemu.VM("-kernel", str(kernel), *ARGS, *drive, "-incoming", "tcp:127.0.0.1:0")
    dest.start()
    try:
        source.execute("stop")
        port = dest._instance.control.migration.incoming_address[1]
        source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        assert wait_migration_end(source)["status"] == "completed"
        assert wait_migration_end(dest)["status"] == "completed"
        assert source.state is RunState.POSTMIGRATE and dest.state is RunState.PAUSED
        assert not writable_elsewhere(image)  # the destination holds it ...
        dest.execute("cont")  # ... and runs on it without a lock error
        assert dest.state is RunState.RUNNING
        with pytest.raises(pyemu.CommandError, match='Failed to get "write" lock'):
            source.execute("cont")
    finally:
        stop_vm(source)
        if dest.state is not RunState.SHUTDOWN:
            stop_vm(dest)
    assert writable_elsewhere(image)
