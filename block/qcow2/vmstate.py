"""The VM-state area of a qcow2 image: where ``savevm`` keeps a snapshot's VM state, inside the image.

QEMU (docs/interop/qcow2.txt, "Snapshots") stores an internal snapshot's VM state in guest-invisible space
right after the virtual disk: it starts at the first L1 index past the disk's last L1 entry (so at
``l1_entries_for(size) * bytes_per_L1_entry``, QEMU's ``qcow2_vm_state_offset``) and is mapped by the same
L1/L2 tables as guest data. The state is written into the *active* tables, the snapshot then copies the L1
table (taking the state with it), and the active image drops its references again (QEMU discards the area so
the next snapshot does not copy-on-write it). Loading reads through the snapshot's own L1 table, so the
state can be checked before anything is reverted. The snapshot table records the size (32-bit field plus the
64-bit one in the extra data) -- :mod:`pyemu.block.qcow2.snapshot` writes both.

The bytes are whatever the VMM writes: pyemu puts its own migration stream there
(:mod:`pyemu.migration.savevm`); QEMU cannot load it (and pyemu cannot load QEMU's), but qemu-img lists,
checks, applies and deletes such snapshots like any other.
"""

from __future__ import annotations

import errno
import io
from typing import TYPE_CHECKING

from pyemu.block.errors import BlockError
from pyemu.block.qcow2.layout import FLAG_COMPRESSED, OFFSET_MASK, ClusterKind
from pyemu.block.qcow2.mapping import decode, entry_problem

if TYPE_CHECKING:
    from pyemu.block.qcow2.driver import Qcow2Format
    from pyemu.block.qcow2.snapshot import SnapshotInfo

WRITE_CHUNK = 1 << 20
"""The writer hands the image 1 MiB at a time (the stream arrives in small sections)."""


class VmStateError(BlockError):
    """The VM-state area cannot be read or written (no such state, out of range, an unusable mapping)."""

    def __init__(self, message: str, *, errno: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


def vm_state_offset(image: "Qcow2Format", disk_size: int | None = None) -> int:
    """Guest offset where the VM-state area starts: the first L1 entry past the disk (QEMU's rule)."""
    geometry = image.geometry
    size = image.header.size if disk_size is None else disk_size
    return geometry.l1_entries_for(size) * (geometry.l2_entries << image.cluster_bits)


def read_snapshot_vmstate(image: "Qcow2Format", snap: "SnapshotInfo", l1: list[int], pos: int,
                          length: int) -> bytes:
    """``length`` bytes at ``pos`` of ``snap``'s VM state, mapped by the snapshot's L1 table ``l1``.
    Unallocated and zero clusters read as zeros; compressed ones are refused (savevm never writes them)."""
    if pos < 0 or length < 0 or pos + length > snap.vm_state_size:
        raise VmStateError(f"VM state read [{pos}, {pos + length}) outside the snapshot's "
                           f"{snap.vm_state_size}-byte state")
    geometry = image.geometry
    cs = image.cluster_size
    base = vm_state_offset(image, snap.disk_size)
    out = bytearray(length)
    done = 0
    while done < length:
        guest = base + pos + done
        vcluster = guest >> image.cluster_bits
        in_cluster = guest & (cs - 1)
        step = min(cs - in_cluster, length - done)
        l1_index, l2_index = vcluster >> geometry.l2_bits, vcluster & ((1 << geometry.l2_bits) - 1)
        l2_offset = l1[l1_index] & OFFSET_MASK if l1_index < len(l1) else 0
        if l2_offset:
            table = image.map.load_l2(l2_offset, what=f"snapshot '{snap.name}' L1 index {l1_index:#x}")
            word, bitmap = image.map.table_entry(table, l2_index)
            problem = entry_problem(geometry, word, bitmap)
            if problem:
                raise image.corruption(f"{problem} (snapshot '{snap.name}' VM state cluster {vcluster})")
            if word & FLAG_COMPRESSED:
                raise VmStateError(f"snapshot '{snap.name}': compressed VM state clusters are not supported",
                                   errno=errno.ENOTSUP)
            sub = in_cluster // geometry.subcluster_size if geometry.extended_l2 else 0
            mapping = decode(geometry, word, bitmap, sub)
            if mapping.kind is ClusterKind.NORMAL:
                host = word & OFFSET_MASK
                if host < cs or host >= image.file.size():
                    raise image.corruption(f"VM state cluster offset {host:#x} is outside the image")
                if geometry.extended_l2:
                    step = min(step, geometry.subcluster_size - in_cluster % geometry.subcluster_size)
                out[done:done + step] = image.read_meta(host + in_cluster, step)
        done += step
    return bytes(out)


def drop_active_vmstate(image: "Qcow2Format") -> None:
    """The active image forgets its VM-state area (after the snapshot took its copy of the L1 table): its L1
    entries past the disk are cleared on disk first, then their references dropped, so a crash in between
    only leaks clusters. Callers hold the metadata lock and the exclusive I/O gate."""
    from pyemu.block.qcow2.snapshot import adjust_tree, fix_copied_flags

    first = image.geometry.l1_entries_for(image.header.size)
    dropped = [entry for entry in image.map.l1[first:] if entry & OFFSET_MASK]
    if not dropped:
        return
    image.quiesce_metadata()
    image.map.l1[first:] = [0] * (len(image.map.l1) - first)
    image.map.l1_dirty = True
    image.quiesce_metadata()
    adjust_tree(image, dropped, -1, "active VM state")
    fix_copied_flags(image)
    image.map.drop_cache()
    image.quiesce_metadata()


class VmStateWriter(io.RawIOBase):
    """A write-only stream into the image's VM-state area, from offset 0, in :data:`WRITE_CHUNK` pieces.
    :meth:`finish` writes the tail and returns the state's size (what the snapshot records)."""

    def __init__(self, image: "Qcow2Format") -> None:
        super().__init__()
        self._image = image
        self._pending = bytearray()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._pending += data
        if len(self._pending) >= WRITE_CHUNK:
            self._push()
        return len(data)

    def _push(self) -> None:
        if self._pending:
            self._image.write_vmstate(self.size, bytes(self._pending))
            self.size += len(self._pending)
            self._pending.clear()

    def finish(self) -> int:
        self._push()
        return self.size


class VmStateReader(io.RawIOBase):
    """A read-only stream over one snapshot's VM state (through the snapshot's L1 table)."""

    def __init__(self, image: "Qcow2Format", snap: "SnapshotInfo") -> None:
        super().__init__()
        self._image = image
        self._snap = snap
        self._l1 = image.snapshot_l1(snap)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._snap.vm_state_size - self._pos, WRITE_CHUNK)
        if count <= 0:
            return 0
        view[:count] = self._image.read_snapshot_vmstate(self._snap, self._l1, self._pos, count)
        self._pos += count
        return count
