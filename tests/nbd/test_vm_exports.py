"""A VM's NBD server and block exports over QMP (nbd-server-start/-stop, block-export-add/-del,
query-block-exports, nbd-server-add/-remove, BLOCK_EXPORT_DELETED), read and written by real NBD tools.

The VMs are in-process (``pyemu.VM``) with a spinning guest under ``-S``: nothing here needs Linux. Error
messages are QEMU 7.2's, as qemu-storage-daemon 7.2 gives them for the same requests.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import pyemu
from nbd_helpers import RawPeer, need, run, url, wait_for_socket
from pyemu.api.errors import CommandError
from pyemu.block.errors import BlockIOError
from pyemu.block.nbd import protocol as P
from pyemu.block.nbd.client import NbdClient
from pyemu.block.nbd.uri import parse_nbd_url
from pyemu.target.x86.boot.synthetic import make_multiboot_binary

SIZE = 16 << 20
EVENT_TIMEOUT = 60.0
# Data the images start with: (offset, byte) runs of 64 KiB.
PATTERN = ((0, 0x11), (1 << 20, 0x22), (SIZE - 65536, 0x33))


@pytest.fixture
def tmp(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pyemu-exp-", dir="/tmp"))  # sun_path is short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_qcow2(path: Path) -> None:
    need("qemu-img", "qemu-io")
    run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    for offset, byte in PATTERN:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {byte} {offset} 65536", str(path))


@pytest.fixture
def vm(tmp: Path) -> Iterator[pyemu.VM]:
    """A paused VM with a qcow2 -blockdev node 'd0' (over 'f0') and a qcow2 -drive 'disk0' on a virtio
    device, plus a read-only raw node 'ro0'."""
    kernel = tmp / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    make_qcow2(tmp / "d0.qcow2")
    make_qcow2(tmp / "disk.qcow2")
    (tmp / "ro.raw").write_bytes(b"\x5a" * (1 << 20))
    machine = pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-S",
                       "-blockdev", f"driver=file,filename={tmp / 'd0.qcow2'},node-name=f0",
                       "-blockdev", "driver=qcow2,file=f0,node-name=d0",
                       "-blockdev", f"driver=file,filename={tmp / 'ro.raw'},node-name=ro0,read-only=on",
                       "-drive", f"file={tmp / 'disk.qcow2'},format=qcow2,if=virtio,id=disk0")
    machine.start()
    try:
        yield machine
    finally:
        machine.close()


def start_server(vm: pyemu.VM, tmp: Path) -> Path:
    sock = tmp / "nbd.sock"
    assert vm.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}) == {}
    return sock


def error_of(vm: pyemu.VM, command: str, args: dict[str, Any]) -> str:
    with pytest.raises(CommandError) as info:
        vm.execute(command, args)
    assert info.value.error_class == "GenericError"
    return str(info.value.desc)


def export(vm: pyemu.VM, export_id: str, node: str, **extra: Any) -> None:
    assert vm.execute("block-export-add", {"type": "nbd", "id": export_id, "node-name": node, **extra}) == {}


def deleted_events(vm: pyemu.VM, count: int) -> list[str]:
    return [vm.events.wait_for("BLOCK_EXPORT_DELETED", EVENT_TIMEOUT).data["id"] for _ in range(count)]


def expected_bytes() -> bytes:
    data = bytearray(SIZE)
    for offset, byte in PATTERN:
        data[offset:offset + 65536] = bytes([byte]) * 65536
    return bytes(data)


def drive_node(vm: pyemu.VM) -> str:
    (block,) = vm.execute("query-block", {})
    return str(block["inserted"]["node-name"])


# -- the server -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("addr, extra, message", [
    ({"type": "unix"}, {}, "Parameter 'addr.data' is missing"),
    ({"type": "unix", "data": {}}, {}, "Parameter 'addr.data.path' is missing"),
    ({"type": "bogus", "data": {}}, {}, "Parameter 'type' does not accept value 'bogus'"),
    ({"type": "unix", "data": {"path": "/nonexistent-dir/x.sock"}}, {},
     "Failed to bind socket to /nonexistent-dir/x.sock: No such file or directory"),
    ({"type": "inet", "data": {"host": "127.0.0.1", "port": 5}}, {},
     "Invalid parameter type for 'addr.data.port', expected: string"),
    ({"type": "inet", "data": {"host": "127.0.0.1", "port": "abc"}}, {},
     "address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype"),
    ({"type": "unix", "data": {"path": "/tmp/x.sock", "x": 1}}, {}, "Parameter 'addr.data.x' is unexpected"),
    ({"type": "unix", "data": {"path": "/tmp/x.sock"}, "y": 2}, {}, "Parameter 'addr.y' is unexpected"),
    ("foo", {}, "Invalid parameter type for 'addr', expected: object"),
    ({"type": "unix", "data": {"path": "/tmp/x.sock"}}, {"max-connections": -1},
     "Parameter 'max-connections' expects uint32_t"),
])
def test_server_start_refusals(vm: pyemu.VM, addr: Any, extra: dict[str, Any], message: str) -> None:
    assert error_of(vm, "nbd-server-start", {"addr": addr, **extra}) == message
    assert error_of(vm, "nbd-server-stop", {}) == "NBD server not running"


def test_server_start_stop_and_unsupported(vm: pyemu.VM, tmp: Path) -> None:
    desc = error_of(vm, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp / "s")}},
                                             "tls-creds": "tls0"})
    assert desc.startswith("No TLS credentials with id 'tls0'") and "TLS" in desc
    assert "not supported" in error_of(vm, "nbd-server-start", {"addr": {"type": "fd", "data": {"str": "x"}}})
    assert error_of(vm, "block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0"}) == \
        "NBD server not running"
    assert error_of(vm, "nbd-server-add", {"device": "d0"}) == "NBD server not running"
    sock = start_server(vm, tmp)
    assert error_of(vm, "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp / "t")}}}) == \
        "NBD server already running"
    wait_for_socket(sock)
    assert vm.execute("nbd-server-stop", {}) == {}
    assert error_of(vm, "nbd-server-stop", {}) == "NBD server not running"
    # Started again on TCP (port "0": the kernel picks one; QEMU's port is a string).
    assert vm.execute("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
                                           "max-connections": 4}) == {}
    export(vm, "e0", "d0")
    host, port = vm._control().exports.server_address
    info = json.loads(run("nbdinfo", "--json", f"nbd://{host}:{port}/d0").stdout)
    assert info["exports"][0]["export-size"] == SIZE
    assert vm.execute("nbd-server-stop", {}) == {}
    assert deleted_events(vm, 1) == ["e0"]
    # A Linux abstract socket (QEMU's "abstract": true): no file, the server greets on "\0name".
    name = f"pyemu-test-{tmp.name}"
    assert vm.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": name, "abstract": True}}}) == {}
    with socket.socket(socket.AF_UNIX) as peer:
        peer.settimeout(EVENT_TIMEOUT)
        peer.connect(b"\0" + name.encode())
        magic, option, _ = P.HANDSHAKE_HEAD.unpack(P.recv_exact(peer, P.HANDSHAKE_HEAD.size))
        assert (magic, option) == (P.NBDMAGIC, P.IHAVEOPT)
    assert vm.execute("nbd-server-stop", {}) == {}


# -- block-export-add / nbd-server-add refusals ---------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ({"type": "fuse", "id": "e0", "node-name": "d0"}, "No driver found for the requested export type"),
    ({"type": "nbd", "id": "e 0", "node-name": "d0"}, "Invalid block export id"),
    ({"type": "nbd", "id": "e0", "node-name": "zz"}, "Cannot find device='' nor node-name='zz'"),
    ({"type": "nbd", "id": "e0", "node-name": "disk0"}, "Cannot find device='' nor node-name='disk0'"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "bitmaps": ["nob"]}, "Bitmap 'nob' is not found"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "bitmaps": [{"node": "d0", "name": "nob"}]},
     "Dirty bitmap 'nob' not found"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "bitmaps": [{"node": "zz", "name": "nob"}]},
     "Node 'zz' not found"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "bitmaps": [7]},
     "Invalid parameter type for 'bitmaps[0]', expected: BlockDirtyBitmapOrStr"),
    ({"type": "nbd", "id": "e0", "node-name": "ro0", "writable": True}, "Cannot export read-only node as writable"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "name": "x" * 5000}, f"export name '{'x' * 5000}' too long"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "description": "y" * 5000},
     f"description '{'y' * 5000}' too long"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "iothread": "io0"}, 'iothread "io0" not found'),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "foo": 1}, "Parameter 'foo' is unexpected"),
    ({"type": "nbd", "id": "e0", "node-name": "d0", "writable": "yes"},
     "Invalid parameter type for 'writable', expected: boolean"),
])
def test_export_add_refusals(vm: pyemu.VM, tmp: Path, args: dict[str, Any], message: str) -> None:
    start_server(vm, tmp)
    assert error_of(vm, "block-export-add", args) == message
    assert vm.execute("query-block-exports", {}) == []
    # Nothing was left behind: the node is not "in use" by a half-made export.
    assert vm.execute("blockdev-del", {"node-name": "d0"}) == {}


def test_export_add_name_and_bitmap_conflicts(vm: pyemu.VM, tmp: Path) -> None:
    start_server(vm, tmp)
    vm.execute("block-dirty-bitmap-add", {"node": "d0", "name": "on"})
    vm.execute("block-dirty-bitmap-add", {"node": "d0", "name": "off", "disabled": True})
    assert error_of(vm, "block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0", "bitmaps": ["on"]}) == \
        "Enabled bitmap 'on' incompatible with readonly export"
    export(vm, "e0", "d0", bitmaps=["off", "off"])  # QEMU accepts a bitmap named twice
    assert error_of(vm, "block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0"}) == \
        "Block export id 'e0' is already in use"
    assert error_of(vm, "block-export-add", {"type": "nbd", "id": "e1", "node-name": "d0", "name": "d0"}) == \
        "NBD server already has export named 'd0'"
    assert error_of(vm, "block-export-add", {"type": "nbd", "id": "e1", "node-name": "d0", "name": "n1",
                                             "bitmaps": ["off"]}) == \
        "Bitmap 'off' is currently in use by another operation and cannot be used"
    # A writable export may carry an enabled bitmap.
    export(vm, "e1", "d0", name="n1", writable=True, bitmaps=["on"])
    assert vm.execute("query-block-exports", {}) == [
        {"id": "e1", "type": "nbd", "node-name": "d0", "shutting-down": False},
        {"id": "e0", "type": "nbd", "node-name": "d0", "shutting-down": False}]


def test_nbd_server_add_spelling(vm: pyemu.VM, tmp: Path) -> None:
    sock = start_server(vm, tmp)
    assert error_of(vm, "nbd-server-add", {"device": "nope"}) == "Cannot find device='nope' nor node-name='nope'"
    # A drive id works, the export id is the name, and a read-only node is quietly exported read-only.
    assert vm.execute("nbd-server-add", {"device": "disk0", "name": "x1"}) == {}
    assert vm.execute("nbd-server-add", {"device": "ro0", "writable": True}) == {}
    assert error_of(vm, "nbd-server-add", {"device": "d0", "name": "x1"}) == "Block export id 'x1' is already in use"
    exports = vm.execute("query-block-exports", {})
    assert [(e["id"], e["node-name"]) for e in exports] == [("ro0", "ro0"), ("x1", drive_node(vm))]
    info = json.loads(run("nbdinfo", "--json", url(sock, "ro0")).stdout)
    assert info["exports"][0]["is_read_only"] is True
    assert error_of(vm, "nbd-server-remove", {"name": "nope"}) == "Export 'nope' is not found"
    assert vm.execute("nbd-server-remove", {"name": "x1"}) == {}
    assert deleted_events(vm, 1) == ["x1"]


# -- reading and writing through real tools -----------------------------------------------------------------

def test_tools_read_a_drive_export(vm: pyemu.VM, tmp: Path) -> None:
    need("nbdinfo", "nbdcopy", "qemu-img")
    sock = start_server(vm, tmp)
    export(vm, "e0", drive_node(vm), name="disk")
    info = json.loads(run("nbdinfo", "--json", url(sock, "disk")).stdout)["exports"][0]
    assert info["export-size"] == SIZE and info["is_read_only"] is True
    assert info["can_multi_conn"] is True  # QEMU advertises multi-conn on read-only exports
    run("nbdcopy", url(sock, "disk"), str(tmp / "copy.raw"))
    assert (tmp / "copy.raw").read_bytes() == expected_bytes()
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", url(sock, "disk"), str(tmp / "conv.raw"))
    assert (tmp / "conv.raw").read_bytes() == expected_bytes()
    # -U: the VM holds the image's write lock; qemu-img only reads it.
    out = run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", url(sock, "disk"), str(tmp / "disk.qcow2"))
    assert "Images are identical" in out.stdout
    # base:allocation through nbdinfo --map: the written runs are data, the rest reads as zero.
    extents = json.loads(run("nbdinfo", "--json", "--map", url(sock, "disk")).stdout)
    data = [(e["offset"], e["length"]) for e in extents if e["type"] & 1 == 0]
    assert data == [(offset, 65536) for offset, _ in PATTERN]


def test_writable_export_marks_bitmap_and_dirty_map(vm: pyemu.VM, tmp: Path) -> None:
    """Writes from nbdcopy and qemu-io land in the node and mark its enabled bitmap; exported read-only
    afterwards, the (disabled) bitmap's extents show through qemu:dirty-bitmap:."""
    need("nbdinfo", "nbdcopy", "qemu-io")
    sock = start_server(vm, tmp)
    vm.execute("block-dirty-bitmap-add", {"node": "d0", "name": "b0", "granularity": 65536})
    export(vm, "w", "d0", writable=True, bitmaps=["b0"])
    payload = bytes([0x77]) * (128 << 10)
    (tmp / "src.raw").write_bytes(payload)
    run("nbdcopy", str(tmp / "src.raw"), url(sock, "d0"))  # a smaller source: only [0, 128 KiB) is written
    run("qemu-io", "-f", "raw", "-c", "write -P 0x66 4M 64k", url(sock, "d0"))
    out = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x66 4M 64k", "-c", "read -P 0x77 0 128k",
              url(sock, "d0"))
    assert "Pattern verification failed" not in out.stdout + out.stderr
    assert vm.execute("block-export-del", {"id": "w"}) == {}
    assert deleted_events(vm, 1) == ["w"]
    vm.execute("block-dirty-bitmap-disable", {"node": "d0", "name": "b0"})
    export(vm, "r", "d0", bitmaps=["b0"])
    extents = json.loads(run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0", url(sock, "d0")).stdout)
    dirty = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    assert dirty == [(0, 128 << 10), (4 << 20, 65536)]
    # And the data as the VM's node now has it, through nbdcopy.
    run("nbdcopy", url(sock, "d0"), str(tmp / "after.raw"))
    after = (tmp / "after.raw").read_bytes()
    assert after[:len(payload)] == payload and after[4 << 20:(4 << 20) + 65536] == b"\x66" * 65536
    assert after[1 << 20:(1 << 20) + 65536] == b"\x22" * 65536  # untouched data stays


def test_nbdcopy_writes_a_whole_export(vm: pyemu.VM, tmp: Path) -> None:
    need("nbdcopy", "qemu-img")
    sock = start_server(vm, tmp)
    export(vm, "w", "d0", writable=True)
    source = bytes(range(256)) * (SIZE // 256)
    (tmp / "src.raw").write_bytes(source)
    run("nbdcopy", str(tmp / "src.raw"), url(sock, "d0"))
    out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", url(sock, "d0"), str(tmp / "src.raw"))
    assert "Images are identical" in out.stdout


def test_two_clients_and_a_garbage_client(vm: pyemu.VM, tmp: Path) -> None:
    sock = start_server(vm, tmp)
    export(vm, "e0", "d0")
    target = parse_nbd_url(url(sock, "d0"))
    first, second = NbdClient.open(target, read_only=True), NbdClient.open(target, read_only=True)
    try:
        garbage = socket.socket(socket.AF_UNIX)
        garbage.connect(str(sock))
        garbage.settimeout(EVENT_TIMEOUT)
        garbage.recv(18)
        garbage.sendall(b"\xff" * 4 + b"\x49\x48\x41\x56" * 64)  # bad client flags, then noise
        try:
            assert garbage.recv(4096) == b""  # that one client is dropped...
        except ConnectionResetError:
            pass  # ...with its unread noise making the close a reset
        garbage.close()
        hostile = RawPeer.connect(sock)
        hostile.go("d0", structured=False)
        hostile.sock.sendall(P.Request(0, P.CMD_READ, 7, SIZE - 512, 1 << 30).pack())  # out of range, huge
        assert P.SIMPLE_REPLY.unpack(P.recv_exact(hostile.sock, 16)) == (P.SIMPLE_REPLY_MAGIC, P.NBD_EINVAL, 7)
        results: list[bytes] = []

        def read(client: NbdClient) -> None:
            buf = bytearray(65536)
            for _ in range(20):
                client.preadv(1 << 20, [memoryview(buf)])
            results.append(bytes(buf))

        threads = [threading.Thread(target=read, args=(c,)) for c in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(EVENT_TIMEOUT)
        assert results == [b"\x22" * 65536] * 2
        hostile.close()
        assert vm.execute("query-status", {})["status"] == "prelaunch"
    finally:
        first.close()
        second.close()


# -- removal -------------------------------------------------------------------------------------------------

def test_safe_and_hard_removal_with_a_client(vm: pyemu.VM, tmp: Path) -> None:
    sock = start_server(vm, tmp)
    vm.execute("block-dirty-bitmap-add", {"node": "d0", "name": "b0", "disabled": True})
    export(vm, "e0", "d0", bitmaps=["b0"])
    client = NbdClient.open(parse_nbd_url(url(sock, "d0")), read_only=True)
    try:
        assert error_of(vm, "block-export-del", {"id": "e0"}) == "export 'e0' still in use"
        assert error_of(vm, "block-export-del", {"id": "e0", "mode": "safe"}) == "export 'e0' still in use"
        assert error_of(vm, "blockdev-del", {"node-name": "d0"}) == "Node d0 is in use"
        assert error_of(vm, "block-dirty-bitmap-remove", {"node": "d0", "name": "b0"}) == \
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        assert vm.execute("block-export-del", {"id": "e0", "mode": "hard"}) == {}
        assert deleted_events(vm, 1) == ["e0"]
        with pytest.raises(BlockIOError):
            client.preadv(0, [memoryview(bytearray(512))])
    finally:
        client.close()
    assert vm.execute("query-block-exports", {}) == []
    assert error_of(vm, "block-export-del", {"id": "e0", "mode": "hard"}) == "Export 'e0' is not found"
    # Everything the export held is free again.
    assert vm.execute("block-dirty-bitmap-remove", {"node": "d0", "name": "b0"}) == {}
    assert vm.execute("blockdev-del", {"node-name": "d0"}) == {}


def test_safe_removal_without_clients_and_server_stop(vm: pyemu.VM, tmp: Path) -> None:
    sock = start_server(vm, tmp)
    export(vm, "e0", "d0")
    export(vm, "e1", "d0", name="second")
    export(vm, "e2", drive_node(vm), name="disk")
    assert vm.execute("block-export-del", {"id": "e0"}) == {}
    assert deleted_events(vm, 1) == ["e0"]
    client = NbdClient.open(parse_nbd_url(url(sock, "second")), read_only=True)
    try:
        assert vm.execute("nbd-server-stop", {}) == {}
        assert sorted(deleted_events(vm, 2)) == ["e1", "e2"]
        assert vm.execute("query-block-exports", {}) == []
        with pytest.raises(BlockIOError):
            client.preadv(0, [memoryview(bytearray(512))])
    finally:
        client.close()
    assert not sock.exists() or not _connectable(sock)
    assert vm.execute("blockdev-del", {"node-name": "d0"}) == {}


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def test_writable_export_of_a_device_disk_conflicts(vm: pyemu.VM, tmp: Path) -> None:
    """As in QEMU, the guest's device refuses other writers (share-rw=off): a writable export of its disk is
    a permission conflict, a read-only one is fine."""
    start_server(vm, tmp)
    node = drive_node(vm)
    assert "Conflicts with use by" in error_of(vm, "block-export-add", {"type": "nbd", "id": "w", "node-name": node,
                                                                        "writable": True})
    export(vm, "r", node)


def test_vm_close_with_a_connected_client(tmp: Path) -> None:
    kernel = tmp / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    make_qcow2(tmp / "d0.qcow2")
    machine = pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-S",
                       "-blockdev", f"driver=file,filename={tmp / 'd0.qcow2'},node-name=f0",
                       "-blockdev", "driver=qcow2,file=f0,node-name=d0")
    machine.start()
    sock = start_server(machine, tmp)
    export(machine, "w", "d0", writable=True)
    client = NbdClient.open(parse_nbd_url(url(sock, "d0")))
    try:
        client.pwritev(0, [b"\x99" * 65536])
        machine.close()
        with pytest.raises(BlockIOError):
            client.preadv(0, [memoryview(bytearray(512))])
    finally:
        client.close()
    out = run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x99 0 64k", str(tmp / "d0.qcow2"))
    assert "Pattern verification failed" not in out.stdout
    run("qemu-img", "check", str(tmp / "d0.qcow2"))


# -- fleecing: a snapshot-access export and QEMU's NBD errno for EACCES ---------------------------------------

def test_fleecing_export_reads_outside_bitmap_fail_with_einval(vm: pyemu.VM, tmp: Path) -> None:
    """A snapshot-access read outside the copy-before-write bitmap fails EACCES in the block layer; QEMU's
    NBD server maps every errno outside NBD's list to EINVAL (system_errno_to_nbd_errno), so that is what
    the client sees. Discarding a region through the export stops copying it (the node has discard=unmap,
    as QEMU needs for a TRIM to reach it)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", str(tmp / "tmp.qcow2"), str(SIZE))
    vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "tmp0",
                                "file": {"driver": "file", "filename": str(tmp / "tmp.qcow2")}})
    vm.execute("block-dirty-bitmap-add", {"node": "d0", "name": "fl"})
    sock = start_server(vm, tmp)
    export(vm, "w", "d0", writable=True, name="live")
    writer = NbdClient.open(parse_nbd_url(url(sock, "live")))
    try:
        writer.pwritev(0, [b"\x11" * (2 << 20)])  # marks [0, 2 MiB) in 'fl': the snapshot's bitmap
    finally:
        writer.close()
    vm.execute("block-export-del", {"id": "w", "mode": "hard"})  # the writer may still be leaving
    deleted_events(vm, 1)
    vm.execute("block-dirty-bitmap-disable", {"node": "d0", "name": "fl"})
    vm.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "d0", "target": "tmp0",
                                "bitmap": {"node": "d0", "name": "fl"}})
    vm.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "acc", "file": "cbw",
                                "discard": "unmap"})
    export(vm, "fl", "acc", name="snap", bitmaps=["fl"])
    target = parse_nbd_url(url(sock, "snap"))
    reader = NbdClient.open(target, read_only=True)
    try:
        buf = bytearray(65536)
        reader.preadv(0, [memoryview(buf)])
        assert bytes(buf) == b"\x11" * 65536
        with pytest.raises(BlockIOError) as info:
            reader.preadv(4 << 20, [memoryview(buf)])
        assert info.value.errno == errno.EINVAL
    finally:
        reader.close()
    extents = json.loads(run("nbdinfo", "--json", "--map=qemu:dirty-bitmap:fl", url(sock, "snap")).stdout)
    assert [(e["offset"], e["length"]) for e in extents if e["type"] & 1] == [(0, 2 << 20)]
    assert vm.execute("block-export-del", {"id": "fl"}) == {}
    assert deleted_events(vm, 1) == ["fl"]


# -- over a real QMP socket -----------------------------------------------------------------------------------

def test_qmp_socket_client_sees_deleted_events(tmp: Path) -> None:
    """QEMU's own client library (qemu.qmp) drives the export over the VM's QMP socket and receives
    BLOCK_EXPORT_DELETED there, after a hard removal that disconnected an NBD client."""
    qmp_module = pytest.importorskip("qemu.qmp")
    import asyncio

    kernel = tmp / "spin.bin"
    kernel.write_bytes(make_multiboot_binary(b"\xeb\xfe"))
    make_qcow2(tmp / "d0.qcow2")
    qmp_sock, nbd_sock = tmp / "qmp.sock", tmp / "nbd.sock"
    machine = pyemu.VM("-kernel", str(kernel), "-m", "32", "-accel", "tcg", "-S",
                       "-blockdev", f"driver=file,filename={tmp / 'd0.qcow2'},node-name=f0",
                       "-blockdev", "driver=qcow2,file=f0,node-name=d0",
                       "-qmp", f"unix:{qmp_sock},server=on,wait=off")
    machine.start()

    async def scenario() -> list[str]:
        client = qmp_module.QMPClient("export-test")
        await client.connect(str(qmp_sock))
        try:
            with client.listener(("BLOCK_EXPORT_DELETED",)) as listener:
                await client.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
                await client.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0"})
                await client.execute("block-export-add", {"type": "nbd", "id": "e1", "node-name": "d0",
                                                          "name": "other"})
                nbd = await asyncio.to_thread(NbdClient.open, parse_nbd_url(url(nbd_sock, "d0")), read_only=True)
                try:
                    with pytest.raises(qmp_module.ExecuteError) as info:
                        await client.execute("block-export-del", {"id": "e0"})
                    assert str(info.value) == "export 'e0' still in use"
                    await client.execute("block-export-del", {"id": "e0", "mode": "hard"})
                    first = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
                    await client.execute("nbd-server-stop")
                    second = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
                finally:
                    await asyncio.to_thread(nbd.close)
                assert await client.execute("query-block-exports") == []
                return [first["data"]["id"], second["data"]["id"]]
        finally:
            await client.disconnect()

    try:
        assert asyncio.run(scenario()) == ["e0", "e1"]
    finally:
        machine.close()


def test_bitmap_name_found_down_the_backing_chain(vm: pyemu.VM, tmp: Path) -> None:
    """``bitmaps: ["name"]`` looks on the exported node, then down its filter/backing chain (QEMU's
    bdrv_filter_or_cow_bs walk): an overlay's export offers its backing node's bitmap, busy while exported."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(tmp / "d0.qcow2"), "-F", "qcow2",
        str(tmp / "ov.qcow2"), str(SIZE))
    vm.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "d0",
                                "file": {"driver": "file", "filename": str(tmp / "ov.qcow2")}})
    vm.execute("block-dirty-bitmap-add", {"node": "d0", "name": "base", "disabled": True})
    sock = start_server(vm, tmp)
    export(vm, "e0", "ov", bitmaps=["base"])
    assert error_of(vm, "block-dirty-bitmap-clear", {"node": "d0", "name": "base"}) == \
        "Bitmap 'base' is currently in use by another operation and cannot be used"
    info = json.loads(run("nbdinfo", "--json", "--list", url(sock)).stdout)
    contexts = info["exports"][0]["contexts"]
    assert "qemu:dirty-bitmap:base" in contexts
    out = run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", url(sock, "ov"), str(tmp / "d0.qcow2"))
    assert "Images are identical" in out.stdout
    assert vm.execute("block-export-del", {"id": "e0"}) == {}
    assert deleted_events(vm, 1) == ["e0"]
    assert vm.execute("block-dirty-bitmap-clear", {"node": "d0", "name": "base"}) == {}
