"""The named-node registry, the ``-blockdev`` syntaxes and schema, opening definitions as node graphs, and
borrowed children's permissions -- without a VM (the QMP side is tests/monitor/test_qmp_blockdev.py).

Messages are QEMU 7.2's, measured with ``qemu-system-x86_64 -M microvm -S -qmp`` and blockdev-add/del."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pyemu.block import graph
from pyemu.block.backend import BlockBackend
from pyemu.block.blockdev import (BlockdevError, activate, deactivate, delete_blockdev, open_blockdev,
                                  parse_blockdev_arg, validate)
from pyemu.block.borrowed import BorrowedNode
from pyemu.block.errors import BlockConfigError
from pyemu.block.graph import PermissionConflict
from pyemu.block.keyval import KeyvalError, parse_keyval
from pyemu.block.registry import (NodeEntry, NodeInUseError, NodeNotFoundError, NodeRegistry, NodeRegistryError,
                                  check_node_name)

MiB = 1 << 20


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "a.raw"
    path.write_bytes(b"\0" * (4 * MiB))
    return path


def add(registry: NodeRegistry, text: str) -> NodeEntry:
    definition, keyval = parse_blockdev_arg(text)
    return open_blockdev(definition, registry, keyval=keyval)


# -- keyval ---------------------------------------------------------------------------------------------
def test_keyval_nests_dotted_keys_and_unescapes_commas() -> None:
    assert parse_keyval("driver=qcow2,node-name=d,file.driver=file,file.filename=/a,,b,cache.direct=on") == {
        "driver": "qcow2", "node-name": "d", "file": {"driver": "file", "filename": "/a,b"},
        "cache": {"direct": "on"}}
    assert parse_keyval("a=1,a=2") == {"a": "2"}  # the last one wins, as in QEMU


@pytest.mark.parametrize("text, message", [
    ("file=f0,file.driver=file", "Parameters 'file.*' used inconsistently"),
    ("file.driver=file,file=f0", "Parameter 'file' used inconsistently"),
    ("driver", "Expected '=' after parameter 'driver'"),
    ("a..b=1", "Invalid parameter 'a..b'"),
])
def test_keyval_errors(text: str, message: str) -> None:
    with pytest.raises(KeyvalError, match=message.replace("*", r"\*").replace(".", r"\.")):
        parse_keyval(text)


# -- schema ---------------------------------------------------------------------------------------------
def test_keyval_values_are_converted_json_values_are_not() -> None:
    assert validate({"driver": "raw", "file": "f", "offset": "1k", "read-only": "on"}, keyval=True) == {
        "driver": "raw", "file": "f", "offset": 1024, "read-only": True}
    with pytest.raises(BlockdevError, match="Invalid parameter type for 'offset', expected: integer"):
        validate({"driver": "raw", "file": "f", "offset": "1k"})
    with pytest.raises(BlockdevError, match="Parameter 'read-only' expects 'on' or 'off'"):
        validate({"driver": "raw", "file": "f", "read-only": "maybe"}, keyval=True)


@pytest.mark.parametrize("definition, message", [
    ({"driver": "foo"}, "Parameter 'driver' does not accept value 'foo'"),
    ({"driver": "raw", "file": "f0", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ({"driver": "raw"}, "Parameter 'file' is missing"),
    ({"driver": "file"}, "Parameter 'filename' is missing"),
    ({"driver": "raw", "file": "f0", "discard": "sometimes"}, "Parameter 'discard' does not accept value"),
    ({"driver": "raw", "file": "f0", "cache": {"direct": 1}}, "Invalid parameter type for 'cache.direct'"),
    ({"driver": "qcow2", "file": "f", "backing": 5}, "Invalid parameter type for 'backing'"),
])
def test_schema_errors(definition: dict, message: str) -> None:
    with pytest.raises(BlockdevError, match=message):
        validate(definition)


def test_json_blockdev_argument() -> None:
    definition, keyval = parse_blockdev_arg('{"driver": "raw", "node-name": "x", "file": {"driver": "file", '
                                            '"filename": "/a"}}')
    assert not keyval and definition["file"]["filename"] == "/a"
    with pytest.raises(BlockConfigError, match="JSON parse error"):
        parse_blockdev_arg('{"driver": ')


# -- registry -------------------------------------------------------------------------------------------
def test_node_names() -> None:
    check_node_name("disk-0.a_b")
    for bad, message in (("1bad", "Invalid node-name: '1bad'"), ("#block1", "Invalid node-name"),
                         ("a" * 32, "Node name too long")):
        with pytest.raises(NodeRegistryError, match=message):
            check_node_name(bad)
    registry = NodeRegistry()
    auto = registry.auto_name()
    assert auto.startswith("#block") and auto[6:].isdigit()


def test_open_by_keyval_json_and_reference(raw: Path) -> None:
    registry = NodeRegistry()
    add(registry, f"driver=file,node-name=f0,filename={raw}")
    d0 = add(registry, "driver=raw,node-name=d0,file=f0")
    inline = add(registry, f'{{"driver": "raw", "node-name": "d1", "read-only": true, '
                           f'"file": {{"driver": "file", "filename": "{raw}", "force-share": true, '
                           f'"read-only": true}}}}')
    assert d0.children == {"file": "f0"} and d0.node.size() == 4 * MiB
    child = registry.node(inline.children["file"])
    assert child.auto_named and child.owner == "d1" and child.name.startswith("#block")
    assert registry.lookup("d0") is d0.node
    with pytest.raises(NodeNotFoundError, match="Cannot find device='zz' nor node-name='zz'"):
        registry.lookup("zz")
    with pytest.raises(NodeRegistryError, match="Duplicate nodes with node-name='d0'"):
        add(registry, "driver=raw,node-name=d0,file=f0")
    with pytest.raises(NodeNotFoundError, match="Cannot find device='nope' nor node-name='nope'"):
        add(registry, "driver=raw,node-name=d2,file=nope")
    with pytest.raises(BlockdevError, match="'node-name' must be specified for the root node"):
        open_blockdev({"driver": "raw", "file": "f0"}, registry)
    # Deleting: a child in use, an inline child, then in order.
    with pytest.raises(NodeInUseError, match="Block device f0 is in use"):
        delete_blockdev(registry, "f0")
    with pytest.raises(NodeRegistryError, match=f"Node {child.name} is not owned by the monitor"):
        delete_blockdev(registry, child.name)
    with pytest.raises(NodeNotFoundError, match="Failed to find node with node-name='x'"):
        delete_blockdev(registry, "x")
    delete_blockdev(registry, "d1")
    assert child.name not in registry  # went with its parent
    delete_blockdev(registry, "d0")
    assert not getattr(registry.node("f0").node, "_closed")  # a borrowed child stays open
    registry.node("f0").node.preadv(0, [memoryview(bytearray(512))])
    delete_blockdev(registry, "f0")
    assert len(registry) == 0


def test_failed_open_leaves_nothing_behind(raw: Path, tmp_path: Path) -> None:
    registry = NodeRegistry()
    with pytest.raises(BlockConfigError, match="Could not open '/nonexistent': No such file or directory"):
        add(registry, "driver=raw,node-name=r,file.driver=file,file.filename=/nonexistent")
    assert len(registry) == 0
    # The inner file opened, then the raw window failed: the file must be closed again (its lock gone).
    with pytest.raises(BlockConfigError, match="cannot be greater than size"):
        add(registry, f"driver=raw,node-name=r,offset=8M,file.driver=file,file.filename={raw}")
    assert len(registry) == 0
    add(registry, f"driver=file,node-name=f,filename={raw}")  # a leaked node would hold the write lock
    assert "r" not in registry


def test_qcow2_with_backing_from_header_by_name_and_null(raw: Path, tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(top))
    raw.write_bytes(b"B" * 512 + raw.read_bytes()[512:])
    registry = NodeRegistry()
    implicit = add(registry, f"driver=qcow2,node-name=q1,read-only=on,file.driver=file,file.filename={top}")
    buf = bytearray(512)
    implicit.node.preadv(0, [memoryview(buf)])
    assert bytes(buf) == b"B" * 512 and implicit.children["backing"].startswith("#block")
    delete_blockdev(registry, "q1")
    add(registry, f"driver=file,node-name=bf,filename={raw},read-only=on")
    add(registry, "driver=raw,node-name=base,file=bf,read-only=on")
    named = add(registry, f"driver=qcow2,node-name=q2,backing=base,file.driver=file,file.filename={top}")
    assert named.children["backing"] == "base"
    named.node.preadv(0, [memoryview(buf)])
    assert bytes(buf) == b"B" * 512
    delete_blockdev(registry, "q2")
    none = add(registry, f'{{"driver": "qcow2", "node-name": "q3", "backing": null, "file": {{"driver": "file", '
                         f'"filename": "{top}"}}}}')
    none.node.preadv(0, [memoryview(buf)])
    assert bytes(buf) == bytes(512) and "backing" not in none.children


def test_borrowed_child_takes_write_permission_only_under_a_writer(raw: Path, tmp_path: Path) -> None:
    """QEMU's demand-driven permissions: an overlay over the disk a device writes may be added; once the
    device's backend moves onto the overlay, the overlay's backing edge refuses writers of the old disk."""
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(raw), "-F", "raw", str(top))
    registry = NodeRegistry()
    add(registry, f"driver=file,node-name=f0,filename={raw}")
    d0 = add(registry, "driver=raw,node-name=d0,file=f0")
    activate(d0.node)
    backend = BlockBackend(d0.node, read_only=False, owns_root=False, user="device 'v'")
    overlay = add(registry, f"driver=qcow2,node-name=ov,backing=d0,file.driver=file,file.filename={top}")
    edge = overlay.node.backing
    assert isinstance(edge, BorrowedNode)
    # Passive: the overlay holds only a read on d0, so the device keeps writing d0.
    assert [a.perm for a in graph.users(d0.node) if a.role == "backing"] == [graph.BACKING_PERM]
    backend.pwritev(0, [b"x" * 512])

    def prepare() -> None:
        deactivate(d0.node)
        activate(overlay.node)

    backend.replace_root(overlay.node, prepare=prepare)
    # Now the backing edge is active: another writer on d0 is refused.
    with pytest.raises(PermissionConflict):
        graph.attach(d0.node, user="someone", role="root", perm=graph.BlockPerm.WRITE)
    backend.pwritev(512, [b"y" * 512])
    buf = bytearray(1024)
    backend.preadv(0, [memoryview(buf)])
    assert bytes(buf) == b"x" * 512 + b"y" * 512
    # Swap back; the overlay goes passive, d0 is writable by the device again; the overlay can go.
    backend.replace_root(d0.node, prepare=lambda: (deactivate(overlay.node), activate(d0.node)))
    backend.pwritev(1024, [b"z" * 512])
    delete_blockdev(registry, "ov")
    backend.close()
    deactivate(d0.node)
    delete_blockdev(registry, "d0")
    delete_blockdev(registry, "f0")
    assert raw.read_bytes()[:1536] == b"x" * 512 + bytes(512) + b"z" * 512  # y went into the overlay


def test_replace_root_failure_keeps_the_old_root(raw: Path) -> None:
    registry = NodeRegistry()
    add(registry, f"driver=file,node-name=f0,filename={raw}")
    d0 = add(registry, "driver=raw,node-name=d0,file=f0")
    small = add(registry, "driver=raw,node-name=small,file=f0,size=1M,read-only=on")
    backend = BlockBackend(d0.node, read_only=False, owns_root=False)
    assert small.read_only
    with pytest.raises(BlockConfigError, match="the new node is 1048576 bytes, the device sees 4194304"):
        backend.replace_root(small.node)
    with pytest.raises(PermissionConflict):
        backend.replace_root(registry.node("f0").node, prepare=lambda: activate(d0.node),
                             revert=lambda: deactivate(d0.node))
    assert backend.root is d0.node
    backend.pwritev(0, [b"still here"])
    backend.close()


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed")
def test_nbd_node_over_a_qemu_nbd_export(raw: Path, tmp_path: Path) -> None:
    raw.write_bytes(b"N" * 512 + raw.read_bytes()[512:])
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "exp", "-k", str(sock), str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        registry = NodeRegistry()
        node = add(registry, f"driver=nbd,node-name=n0,server.type=unix,server.path={sock},export=exp")
        overlay = add(registry, "driver=raw,node-name=r0,file=n0")
        buf = bytearray(512)
        overlay.node.preadv(0, [memoryview(buf)])
        assert bytes(buf) == b"N" * 512 and node.node.size() == 4 * MiB
        overlay.node.pwritev(512, [b"W" * 512])
        overlay.node.flush()
        with pytest.raises(BlockdevError, match="Parameter 'server.type' does not accept value 'vsock'"):
            add(registry, f"driver=nbd,node-name=n1,server.type=vsock,server.path={sock}")
        delete_blockdev(registry, "r0")
        delete_blockdev(registry, "n0")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert raw.read_bytes()[512:1024] == b"W" * 512


def test_hostile_definitions_get_errors_not_tracebacks(raw: Path) -> None:
    registry = NodeRegistry()
    nested: dict = {"driver": "file", "filename": str(raw)}
    for _ in range(40):
        nested = {"driver": "raw", "file": nested}
    nested["node-name"] = "deep"
    with pytest.raises(BlockdevError, match="nested too deeply"):
        open_blockdev(nested, registry)
    with pytest.raises(KeyvalError, match="nested too deeply"):
        parse_keyval("driver=raw," + ".".join(["file"] * 40) + "=x")
    for bad in ({"driver": "raw", "node-name": "x", "file": 5}, {"driver": ["raw"]},
                {"driver": "file", "node-name": "x", "filename": "a\0b"},
                {"driver": "raw", "node-name": "x", "file": "f", "offset": -1},
                {"driver": "raw", "node-name": "x", "file": "f", "size": 1 << 70},
                {"driver": "raw", "node-name": 7, "file": "f"}):
        with pytest.raises((BlockdevError, NodeRegistryError)):
            open_blockdev(bad, registry)
    assert len(registry) == 0
