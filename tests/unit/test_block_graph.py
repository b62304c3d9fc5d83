"""In-process node permissions: two writers of one node, or a writer of a node used as a backing file, are
refused with a message naming the other user; closing a user frees its permissions."""

from __future__ import annotations

import subprocess

import pytest

from pyemu.block import graph
from pyemu.block.backend import BlockBackend
from pyemu.block.file import FileProtocol
from pyemu.block.image import open_image
from pyemu.block.locking import BlockPerm
from pyemu.block.raw import RawFormat


def test_second_writable_backend_on_one_node_is_refused(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    node = RawFormat(FileProtocol.open(str(path)))
    first = BlockBackend(node, read_only=False, id="d0")
    with pytest.raises(graph.PermissionConflict, match="Conflicts with use by drive 'd0' as 'root', which does "
                                                       "not allow 'write'"):
        BlockBackend(node, read_only=False, id="d1")
    with pytest.raises(graph.PermissionConflict):
        BlockBackend(node, read_only=True, id="d2")  # a reader refuses writers, but d0 already writes
    first.close()
    assert graph.users(node) == []


def test_backing_node_cannot_be_written_by_a_device(tmp_path):
    base, overlay = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)],
                   check=True)
    top = open_image(str(overlay), read_only=False)
    backing = top.backing
    assert backing is not None
    assert [(a.role, a.perm) for a in graph.users(backing)] == [("backing", graph.BACKING_PERM)]
    with pytest.raises(graph.PermissionConflict, match="as 'backing', which does not allow 'write'"):
        graph.attach(backing, user="a block job", role="target", perm=BlockPerm.WRITE)
    reader = BlockBackend(backing, read_only=True, id="reader")  # reading a backing file is fine
    reader._attachment.detach()
    top.close()
    assert graph.users(backing) == []
    assert [role for role, _ in graph.children(top)] == ["file", "backing"]
