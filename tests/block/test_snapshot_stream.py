"""Live external snapshots, block-stream and copy-on-read: in-process tests with concurrent writers, images
checked with qemu-img (check clean, backing link as expected)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import pyemu
from pyemu.api.errors import CommandError
from pyemu.block.backend import BlockBackend
from pyemu.block.blockdev import close_all, open_blockdev
from pyemu.block.copy_on_read import CopyOnRead, insert_into_drive
from pyemu.block.registry import NodeRegistry
from pyemu.block.stream import create_stream
from pyemu.jobs.job import JobManager
from pyemu.target.x86.boot.synthetic import make_multiboot_binary

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
MiB = 1 << 20
SIZE = 8 * MiB
WAIT = 120.0


def qemu_io(path: Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for cmd in cmds:
        args += ["-c", cmd]
    subprocess.run(args + [str(path)], check=True, capture_output=True)


def make_chain(tmp: Path) -> tuple[Path, Path, Path]:
    """base (pattern 1 in MiB 0-2), mid (pattern 2 in MiB 2-4) and an empty top."""
    base, mid, top = tmp / "base.qcow2", tmp / "mid.qcow2", tmp / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(SIZE)], check=True)
    qemu_io(base, f"write -P 1 0 {2 * MiB}")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(mid)], check=True)
    qemu_io(mid, f"write -P 2 {2 * MiB} {2 * MiB}")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top)], check=True)
    return base, mid, top


def info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True, capture_output=True)
    return dict(json.loads(out.stdout))


def assert_contents(path: Path, expected: bytes) -> None:
    """What QEMU reads from the image (its whole chain) is ``expected``."""
    copy = path.with_name(path.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(copy)], check=True)
    assert copy.read_bytes() == expected
    copy.unlink()


def check_clean(path: Path) -> None:
    subprocess.run(["qemu-img", "check", str(path)], check=True, capture_output=True)


def expected_image() -> bytearray:
    data = bytearray(SIZE)
    data[0:2 * MiB] = b"\x01" * (2 * MiB)
    data[2 * MiB:4 * MiB] = b"\x02" * (2 * MiB)
    return data


class Writer(threading.Thread):
    """Writes 4 KiB blocks of 0xAB at offsets spread over the disk through ``backend`` until stopped; records
    what it wrote (so the final image is known)."""

    def __init__(self, backend: Any, lo: int = 0, every: int = 1) -> None:
        super().__init__(daemon=True)
        self.lo = lo
        self.every = every  # write only every N-th cluster: the others are left for a job to copy
        self.backend = backend
        self.stop = threading.Event()
        self.written: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        i = 0
        try:
            while not self.stop.is_set() and i < 2000:
                slots = (SIZE - self.lo) // 65536 // self.every
                offset = self.lo + (i * 7 % slots) * self.every * 65536 + 4096 * (i % 13)
                self.backend.pwritev(offset, [b"\xab" * 4096])
                self.written.append(offset)
                i += 1
        except BaseException as exc:  # noqa: B902 -- reported by the test
            self.error = exc

    def apply(self, data: bytearray) -> None:
        for offset in self.written:
            data[offset:offset + 4096] = b"\xab" * 4096


def read_all(node: Any) -> bytes:
    buf = bytearray(SIZE)
    node.preadv(0, [memoryview(buf)])
    return bytes(buf)


def events() -> tuple[list[tuple[str, dict[str, Any]]], Any]:
    got: list[tuple[str, dict[str, Any]]] = []
    return got, lambda name, data: got.append((name, data))


@pytest.mark.parametrize("with_base", [False, True])
def test_stream_under_concurrent_writes(tmp_path: Path, with_base: bool) -> None:
    base, mid, top = make_chain(tmp_path)
    registry = NodeRegistry()
    if with_base:
        open_blockdev({"driver": "qcow2", "node-name": "b0", "read-only": True,
                       "file": {"driver": "file", "filename": str(base)}}, registry)
        open_blockdev({"driver": "qcow2", "node-name": "m0", "read-only": True, "backing": "b0",
                       "file": {"driver": "file", "filename": str(mid)}}, registry)
        entry = open_blockdev({"driver": "qcow2", "node-name": "top", "backing": "m0",
                               "file": {"driver": "file", "filename": str(top)}}, registry)
    else:
        entry = open_blockdev({"driver": "qcow2", "node-name": "top",
                               "file": {"driver": "file", "filename": str(top)}}, registry)
    backend = BlockBackend(entry.node, read_only=False, id="d0", owns_root=False)
    got, emit = events()
    jobs = JobManager(emit)
    args: dict[str, Any] = {"device": "top", "job-id": "s"}
    if with_base:
        args["base-node"] = "b0"
    job = create_stream(args, resolve=registry.lookup, backends_of=lambda n: [backend] if n is backend.root
                        or n is entry.node else [], emit=emit, check_id=jobs.check_new_id, registry=registry)
    jobs.add(job)
    writer = Writer(backend, every=3)  # 42 of the 128 clusters: the job copies the rest
    writer.start()
    job.start()
    assert job.wait(WAIT)
    writer.stop.set()
    writer.join(WAIT)
    assert writer.error is None
    assert job.error is None
    assert job.copied_bytes > 0
    # QEMU 7.2's sequence for a stream job (recorded on qemu-storage-daemon).
    assert [d["status"] if n == "JOB_STATUS_CHANGE" else n for n, d in got] == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert got[4][1] == {"device": "s", "len": SIZE, "offset": SIZE, "speed": 0, "type": "stream"}
    expected = expected_image()
    writer.apply(expected)
    assert read_all(backend) == bytes(expected)
    backend.close()
    close_all(registry)
    check_clean(top)
    meta = info(top)
    if with_base:
        assert meta["backing-filename"] == str(base)
        assert meta["backing-filename-format"] == "qcow2"
        # MiB 0-2 still come from base: not copied into the top.
        out = subprocess.run(["qemu-img", "map", "--output=json", str(top)], check=True, capture_output=True)
        assert not any(e["data"] and e["depth"] == 0 and e["start"] < 2 * MiB - 65536 and e["start"] % MiB == 8192
                       for e in json.loads(out.stdout))
    else:
        assert "backing-filename" not in meta
    assert_contents(top, bytes(expected))


def test_copy_on_read_fills_top(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    registry = NodeRegistry()
    entry = open_blockdev({"driver": "qcow2", "node-name": "top",
                           "file": {"driver": "file", "filename": str(top)}}, registry)
    backend = BlockBackend(entry.node, read_only=False, id="d0", owns_root=False)
    cor = insert_into_drive(backend)
    writer = Writer(backend, lo=3 * MiB)  # races the reads of MiB 3-4 (mid's data) and writes beyond
    writer.start()
    data = read_all(backend)
    writer.stop.set()
    writer.join(WAIT)
    assert cor.populated_bytes > 0
    backend.remove_filter(cor)
    expected = expected_image()
    writer.apply(expected)
    final = read_all(backend)
    assert final == bytes(expected)
    del data
    backend.close()
    close_all(registry)
    check_clean(top)
    # The backing chain is no longer needed: drop the link and the data is still all there.
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "", str(top)], check=True)
    (tmp_path / "mid.qcow2").unlink()
    (tmp_path / "base.qcow2").unlink()
    assert_contents(top, bytes(expected))


def test_copy_on_read_blockdev_errors(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    registry = NodeRegistry()
    open_blockdev({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": str(top)}},
                  registry)
    open_blockdev({"driver": "qcow2", "node-name": "other", "read-only": True,
                   "file": {"driver": "file", "filename": str(base)}}, registry)
    with pytest.raises(Exception, match="Bottom node 'other' is not a node in the backing chain"):
        open_blockdev({"driver": "copy-on-read", "node-name": "c", "file": "top", "bottom": "other"}, registry)
    node = open_blockdev({"driver": "copy-on-read", "node-name": "c", "file": "top"}, registry).node
    assert isinstance(node, CopyOnRead)
    assert read_all(node)[:2 * MiB] == b"\x01" * (2 * MiB)
    close_all(registry)


def make_vm(tmp_path: Path, top: Path, drive: str | None = None) -> pyemu.VM:
    """A stopped VM with a spinning kernel whose virtio-blk disk is ``top``: node d0 (-blockdev), or the
    ``-drive`` given (``drive`` options after file=top, with id=d0)."""
    kernel = tmp_path / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    disk = ["-drive", f"file={top},format=qcow2,if=none,id=d0{drive}"] if drive is not None else \
        ["-blockdev", f"driver=qcow2,node-name=d0,file.driver=file,file.filename={top}"]
    return pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-serial", "none", "-S", *disk,
                    "-device", "virtio-blk-device,drive=d0,id=vblk0")


def refused(vm: pyemu.VM, command: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(CommandError) as exc:
        vm.execute(command, args)
    assert exc.value.desc == message


def test_qmp_snapshot_sync_then_stream(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    snap = tmp_path / "snap.qcow2"
    with make_vm(tmp_path, top) as vm:
        vm.start()
        # QEMU 7.2's words (qemu-storage-daemon), in its order.
        refused(vm, "blockdev-snapshot-sync", {"node-name": "nope", "snapshot-file": str(snap)},
                "Cannot find device='' nor node-name='nope'")
        refused(vm, "blockdev-snapshot-sync", {"snapshot-file": str(snap)}, "Cannot find device='' nor node-name=''")
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(snap)},
                "New overlay node-name missing")
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(snap),
                                               "snapshot-node-name": "d0"}, "New overlay node-name already in use")
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(snap),
                                               "snapshot-node-name": "bad name"}, "Invalid node-name: 'bad name'")
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(snap), "format": "raw",
                                               "snapshot-node-name": "s1"},
                "Backing file not supported for file format 'raw'")
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(snap), "format": "bogus",
                                               "snapshot-node-name": "s1"}, "Unknown file format 'bogus'")
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(tmp_path / "none.qcow2"),
                                               "mode": "existing", "snapshot-node-name": "s1"},
                f"Could not open '{tmp_path / 'none.qcow2'}': No such file or directory")
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": "/nonexistent/dir/x.qcow2",
                                               "snapshot-node-name": "s1"},
                "Could not create '/nonexistent/dir/x.qcow2': No such file or directory")
        (tmp_path / "junk.bin").write_bytes(b"x" * 4096)
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(tmp_path / "junk.bin"),
                                               "mode": "existing", "snapshot-node-name": "s1"},
                "Image is not in qcow2 format")
        refused(vm, "block-stream", {"device": "d0", "job-id": "j", "speed": -1},
                "Parameter 'speed' expects a non-negative value")
        refused(vm, "block-stream", {"device": "d0", "job-id": "j", "filter-node-name": "d0"},
                "Could not create node: Duplicate nodes with node-name='d0'")
        assert vm.execute("query-block-jobs", {}) == []
        assert not snap.exists()
        assert vm.execute("blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(snap),
                                                     "snapshot-node-name": "snap0"}) == {}
        meta = info(snap)
        assert meta["backing-filename"] == str(top)
        refused(vm, "blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(tmp_path / "s2.qcow2"),
                                               "snapshot-node-name": "s2"},
                "Node 'd0' is busy: node is used as backing hd of 'snap0'")
        refused(vm, "block-stream", {"device": "snap0", "base": "/nonexistent"},
                "Can't find '/nonexistent' in the backing chain")
        refused(vm, "block-stream", {"device": "snap0", "base": "x", "base-node": "y"},
                "'base' and 'base-node' cannot be specified at the same time")
        refused(vm, "block-stream", {"device": "snap0", "base": "x", "bottom": "y"},
                "'base' and 'bottom' cannot be specified at the same time")
        refused(vm, "block-stream", {"device": "snap0", "bottom": "d0", "base-node": "y"},
                "'bottom' and 'base-node' cannot be specified at the same time")
        refused(vm, "block-stream", {"device": "snap0", "backing-file": "foo"},
                "backing file specified, but streaming the entire chain")
        refused(vm, "block-stream", {"device": "nope"}, "Cannot find device='nope' nor node-name='nope'")
        refused(vm, "block-stream", {"device": "snap0"}, "Invalid job ID ''")
        refused(vm, "block-stream", {"device": "snap0", "job-id": "bad id"}, "Invalid job ID 'bad id'")
        assert vm.execute("block-stream", {"device": "snap0", "job-id": "st"}) == {}
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
    check_clean(snap)
    assert "backing-filename" not in info(snap)
    assert_contents(snap, bytes(expected_image()))


def test_qmp_blockdev_snapshot_existing_overlay(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    ov = tmp_path / "ov.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(ov)], check=True)
    with make_vm(tmp_path, top) as vm:
        vm.start()
        other = tmp_path / "other.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), str(SIZE)], check=True)
        vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "x0", "read-only": True,
                                    "file": {"driver": "file", "filename": str(other)}})
        vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "x0",
                                    "file": {"driver": "file", "filename": str(ov)}})
        refused(vm, "blockdev-snapshot", {"node": "d0", "overlay": "ov"},
                "The overlay already has a backing image")
        vm.execute("blockdev-del", {"node-name": "ov"})
        vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": None,
                                    "file": {"driver": "file", "filename": str(ov)}})
        assert vm.execute("blockdev-snapshot", {"node": "d0", "overlay": "ov"}) == {}
        names = {n["node-name"]: n for n in vm.execute("query-named-block-nodes", {})}
        assert "ov" in names
    check_clean(ov)
    check_clean(top)


def node_names(vm: pyemu.VM) -> set[str]:
    return {n["node-name"] for n in vm.execute("query-named-block-nodes", {})}


def writable_by_another_process(path: Path) -> bool:
    """Whether qemu-io can open ``path`` (not its backing chain) for writing: only once pyemu closed the image
    (QEMU's image locks)."""
    spec = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(path)}})
    return subprocess.run(["qemu-io", "-c", "write 0 512", f"json:{spec}"], capture_output=True).returncode == 0


def test_snapshot_overlays_leave_the_graph_with_their_last_user(tmp_path: Path) -> None:
    """blockdev-snapshot-sync's overlays are the graph's (QEMU: not monitor-owned, reference-counted): a
    stream that drops one from the chain and an active commit that pivots away from one close it, and it
    leaves query-named-block-nodes; the user's own -blockdev node stays (checked with qemu-storage-daemon
    7.2: the streamed-over overlay vanished, d0 stayed)."""
    base, mid, top = make_chain(tmp_path)
    ov1, ov2, ov3 = (tmp_path / f"ov{i}.qcow2" for i in (1, 2, 3))
    with make_vm(tmp_path, top) as vm:
        vm.start()
        for node, path, name in (("d0", ov1, "ov1"), ("ov1", ov2, "ov2")):
            vm.execute("blockdev-snapshot-sync", {"node-name": node, "snapshot-file": str(path),
                                                  "snapshot-node-name": name})
        refused(vm, "blockdev-del", {"node-name": "ov2"}, "Node ov2 is in use")
        assert {"d0", "ov1", "ov2"} <= node_names(vm) and not writable_by_another_process(ov1)

        vm.execute("block-stream", {"job-id": "s", "device": "ov2"})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        names = node_names(vm)
        assert "ov1" not in names and {"d0", "ov2"} <= names
        assert writable_by_another_process(ov1)  # closed, its lock gone
        assert not writable_by_another_process(top)  # d0 is the user's: still open

        vm.execute("blockdev-snapshot-sync", {"node-name": "ov2", "snapshot-file": str(ov3),
                                              "snapshot-node-name": "ov3"})
        vm.execute("block-commit", {"job-id": "c", "device": "ov3"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        vm.execute("job-complete", {"id": "c"})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        (block,) = vm.execute("query-block", {})
        assert block["inserted"]["node-name"] == "ov2"
        assert "ov3" not in node_names(vm)
        assert writable_by_another_process(ov3)
        refused(vm, "blockdev-del", {"node-name": "ov2"}, "Node ov2 is in use")
    for image in (ov2, ov3, top):
        check_clean(image)
    assert "backing-filename" not in info(ov2)
    assert_contents(ov2, bytes(expected_image()))


def drive_backend(vm: pyemu.VM) -> Any:
    (use,) = [u for u in vm._instance.control.machine.drives()]  # type: ignore[union-attr]
    return use.backend


def test_qmp_snapshot_and_stream_while_the_drive_is_written(tmp_path: Path) -> None:
    """A writer thread writes through the device's drive the whole time: the snapshot moves it onto the
    overlay, the stream copies the chain below it; every write survives and the images are clean."""
    base, mid, top = make_chain(tmp_path)
    snap = tmp_path / "snap.qcow2"
    with make_vm(tmp_path, top) as vm:
        vm.start()
        backend = drive_backend(vm)
        writer = Writer(backend)
        writer.start()
        assert vm.execute("blockdev-snapshot-sync", {"node-name": "d0", "snapshot-file": str(snap),
                                                     "snapshot-node-name": "snap0"}) == {}
        assert backend.root is not None and backend.root.filename == str(snap)
        assert vm.execute("block-stream", {"device": "snap0", "job-id": "st", "base": str(base)}) == {}
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        writer.stop.set()
        writer.join(WAIT)
        assert writer.error is None
        expected = expected_image()
        writer.apply(expected)
        assert read_all(backend) == bytes(expected)
        assert [j for j in vm.execute("query-block-jobs", {})] == []
    check_clean(snap)
    check_clean(top)
    assert info(snap)["backing-filename"] == str(base)
    assert_contents(snap, bytes(expected))


def test_qmp_stream_bottom_busy_and_cancel(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    with make_vm(tmp_path, top) as vm:
        vm.start()
        nodes = {n["file"]: n["node-name"] for n in vm.execute("query-named-block-nodes", {})
                 if n["drv"] == "qcow2"}
        refused(vm, "block-stream", {"device": "d0", "job-id": "x", "bottom": nodes[str(top)]},
                f"Node '{nodes[str(top)]}' is not in a chain starting from 'd0'")
        # A stream slowed to a crawl: a second job on the node is refused, cancel leaves the chain alone.
        assert vm.execute("block-stream", {"device": "d0", "job-id": "slow", "speed": 1,
                                           "filter-node-name": "cor0"}) == {}
        assert "cor0" in {n["node-name"] for n in vm.execute("query-named-block-nodes", {})}
        refused(vm, "block-stream", {"device": "d0", "job-id": "again"},
                "Node 'd0' is busy: block device is in use by block job: stream")
        vm.execute("block-job-cancel", {"device": "slow"})
        vm.events.wait_for("BLOCK_JOB_CANCELLED", WAIT)
        assert "cor0" not in {n["node-name"] for n in vm.execute("query-named-block-nodes", {})}
        # bottom=mid: mid's data (MiB 2-4) is copied, the top then sits on base.
        assert vm.execute("block-stream", {"device": "d0", "job-id": "b", "bottom": nodes[str(mid)]}) == {}
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
    check_clean(top)
    assert info(top)["backing-filename"] == str(base)
    assert_contents(top, bytes(expected_image()))


def test_transaction_snapshot_aborted_leaves_the_drive(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    snap = tmp_path / "snap.qcow2"
    with make_vm(tmp_path, top) as vm:
        vm.start()
        backend = drive_backend(vm)
        root = backend.root
        with pytest.raises(CommandError):
            vm.execute("transaction", {"actions": [
                {"type": "blockdev-snapshot-sync", "data": {"node-name": "d0", "snapshot-file": str(snap),
                                                             "snapshot-node-name": "snap0"}},
                {"type": "abort", "data": {}}]})
        assert backend.root is root
        assert "snap0" not in {n["node-name"] for n in vm.execute("query-named-block-nodes", {})}
        vm.execute("transaction", {"actions": [
            {"type": "blockdev-snapshot-sync", "data": {"node-name": "d0", "snapshot-file": str(snap),
                                                         "snapshot-node-name": "snap0"}}]})
        assert backend.root is not root
        backend.pwritev(0, [b"\xcd" * 4096])
    check_clean(snap)
    check_clean(top)
    assert info(snap)["backing-filename"] == str(top)


def test_drive_copy_on_read_fills_the_top(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    with make_vm(tmp_path, top, ",copy-on-read=on") as vm:
        vm.start()
        backend = drive_backend(vm)
        assert isinstance(backend.root, CopyOnRead)
        assert read_all(backend) == bytes(expected_image())
    check_clean(top)
    subprocess.run(["qemu-img", "rebase", "-u", "-b", "", str(top)], check=True)
    mid.unlink()
    base.unlink()
    assert_contents(top, bytes(expected_image()))


def test_drive_snapshot_hands_the_image_to_the_overlay(tmp_path: Path) -> None:
    """-drive: snapshot by device name (auto-named overlay), stream by device name (job-id defaults to it);
    at close the drive closes the whole chain (both images clean, locks released)."""
    base, mid, top = make_chain(tmp_path)
    snap = tmp_path / "snap.qcow2"
    with make_vm(tmp_path, top, "") as vm:
        vm.start()
        backend = drive_backend(vm)
        root = backend.root
        with pytest.raises(CommandError):
            vm.execute("transaction", {"actions": [
                {"type": "blockdev-snapshot-sync", "data": {"device": "d0", "snapshot-file": str(snap)}},
                {"type": "abort", "data": {}}]})
        assert backend.root is root and not root.closed  # the drive's own image was handed back, open
        assert vm.execute("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": str(snap)}) == {}
        backend.pwritev(6 * MiB, [b"\xee" * 65536])
        assert vm.execute("block-stream", {"device": "d0"}) == {}
        event = vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        assert event.data["device"] == "d0"
    check_clean(snap)
    check_clean(top)
    assert "backing-filename" not in info(snap)
    expected = expected_image()
    expected[6 * MiB:6 * MiB + 65536] = b"\xee" * 65536
    assert_contents(snap, bytes(expected))
    # The old top got none of the writes made after the snapshot.
    assert_contents(top, bytes(expected_image()))


@pytest.mark.parametrize("policy", ["report", "stop"])
def test_stream_read_error_policy(tmp_path: Path, policy: str) -> None:
    """A backing read error: on-error=report fails the job and keeps the backing link; on-error=stop
    pauses it (BLOCK_JOB_ERROR, io-status failed) and job-resume retries the step."""
    import errno
    import threading as _threading

    from pyemu.block.backing_link import backing_of
    from pyemu.block.errors import BlockIOError
    from pyemu.testing.job_events import JobEventLog

    base, mid, top = make_chain(tmp_path)
    registry = NodeRegistry()
    entry = open_blockdev({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": str(top)}},
                          registry)
    mid_node = backing_of(entry.node)
    broken = _threading.Event()
    broken.set()
    real_preadv = mid_node.preadv

    def failing_preadv(offset: int, buffers: Any) -> None:
        if broken.is_set():
            raise BlockIOError("injected", errno=errno.EIO, offset=offset, length=0)
        real_preadv(offset, buffers)

    mid_node.preadv = failing_preadv
    log = JobEventLog()
    jobs = JobManager(log)
    job = create_stream({"device": "top", "job-id": "s", "on-error": policy}, resolve=registry.lookup,
                        backends_of=lambda n: [], emit=log, check_id=jobs.check_new_id, registry=registry)
    jobs.add(job)
    job.start()
    if policy == "report":
        assert job.wait(WAIT)
        assert job.error == "Input/output error"
        assert ("BLOCK_JOB_ERROR", {"device": "s", "operation": "read", "action": "report"}) in log.events
    else:
        log.wait_status("s", "paused")
        assert ("BLOCK_JOB_ERROR", {"device": "s", "operation": "read", "action": "stop"}) in log.events
        assert job.block_info()["io-status"] == "failed"
        broken.clear()
        job.user_resume()
        assert job.wait(WAIT)
        assert job.error is None
    close_all(registry)
    check_clean(top)
    if policy == "report":
        assert info(top)["backing-filename"] == str(mid)
    else:
        assert "backing-filename" not in info(top)
        assert_contents(top, bytes(expected_image()))


def test_drive_copy_on_read_read_only_is_disabled() -> None:
    """QEMU 7.2: 'warning: disabling copy-on-read on read-only drive' and no filter."""
    from pyemu.block.options import DriveOptions

    options = DriveOptions(file="x.qcow2", format="qcow2", readonly=True, copy_on_read=True)
    assert "-drive: warning: disabling copy-on-read on read-only drive" in options.notes


def test_stream_cancelled_midway_under_writes(tmp_path: Path) -> None:
    """A cancelled stream (after it copied part of the chain) leaves the image consistent: every write
    there, the backing link unchanged, the filter gone."""
    from pyemu.testing.job_events import JobEventLog

    base, mid, top = make_chain(tmp_path)
    registry = NodeRegistry()
    entry = open_blockdev({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": str(top)}},
                          registry)
    backend = BlockBackend(entry.node, read_only=False, id="d0", owns_root=False)
    log = JobEventLog()
    jobs = JobManager(log)
    job = create_stream({"device": "top", "job-id": "s", "speed": 64 * 1024}, resolve=registry.lookup,
                        backends_of=lambda n: [backend], emit=log, check_id=jobs.check_new_id, registry=registry)
    jobs.add(job)
    writer = Writer(backend, every=3)
    writer.start()
    job.start()
    progressed = threading.Event()
    deadline = time.monotonic() + WAIT
    while not progressed.wait(0.01) and time.monotonic() < deadline:  # progress sets no event: poll it
        if job.current_progress > 0 or job.status.value not in ("created", "running"):
            progressed.set()
    assert job.status.value == "running"  # 1 MiB copied, then the speed limit holds it for ~16 s
    job.cancel()
    assert job.wait(WAIT)
    writer.stop.set()
    writer.join(WAIT)
    assert writer.error is None
    assert "BLOCK_JOB_CANCELLED" in log.names()
    assert not isinstance(backend.root, CopyOnRead)
    expected = expected_image()
    writer.apply(expected)
    assert read_all(backend) == bytes(expected)
    backend.close()
    close_all(registry)
    check_clean(top)
    assert info(top)["backing-filename"] == str(mid)
    assert_contents(top, bytes(expected))


def test_the_old_top_is_read_only_after_a_snapshot(tmp_path: Path) -> None:
    """QEMU 7.2 reopens the node under a new overlay read-only when the snapshot commits (qemu-storage-daemon:
    its ``ro`` turns true and its write lock goes); a later commit into it reopens it read-write again."""
    base, mid, top = make_chain(tmp_path)
    ov1 = tmp_path / "ov1.qcow2"
    with make_vm(tmp_path, top) as vm:
        vm.start()
        ro = {n["node-name"]: n["ro"] for n in vm.execute("query-named-block-nodes", {})}
        assert ro["d0"] is False
        vm.execute("transaction", {"actions": [{"type": "blockdev-snapshot-sync", "data": {
            "node-name": "d0", "snapshot-file": str(ov1), "snapshot-node-name": "ov1"}}]})
        ro = {n["node-name"]: n["ro"] for n in vm.execute("query-named-block-nodes", {})}
        assert ro["d0"] is True and ro["ov1"] is False
        assert subprocess.run(["qemu-io", "-r", "-c", "read 0 512", str(top)],
                              capture_output=True).returncode == 0  # no write lock on it any more
        drive_backend(vm).pwritev(0, [b"\x07" * 512])  # the guest's writes go to the overlay
        vm.execute("block-commit", {"job-id": "c", "device": "ov1", "base-node": "d0"})
        vm.events.wait_for("BLOCK_JOB_READY", WAIT)
        vm.execute("job-complete", {"id": "c"})
        vm.events.wait_for("BLOCK_JOB_COMPLETED", WAIT)
        (block,) = vm.execute("query-block", {})
        assert block["inserted"]["node-name"] == "d0" and block["inserted"]["ro"] is False
    check_clean(top)
    qemu_io(top, "read -P 7 0 512")
