"""Model-based test of the qcow2 driver: random operation sequences against a qcow2 image and a bytearray.

A hypothesis :class:`~hypothesis.stateful.RuleBasedStateMachine` drives pyemu's :class:`Qcow2Format` with
scatter-gather writes and reads at awkward offsets, discards, write-zeroes, internal snapshots (create, apply,
delete), flushes, close/reopen cycles and growing truncates, and mirrors every operation into a plain
``bytearray``. Every read must agree with the model. At the end of each run the image is closed and judged by
QEMU itself: ``qemu-img check`` must find it clean and ``qemu-img compare`` must find it identical to a raw
file written from the model. The images are made by ``qemu-img create`` (so a bug in pyemu's create cannot
hide a bug in the driver) plus one variant made by pyemu's ``create_qcow2``.

Discard semantics follow what QEMU 7.2 does, measured with qemu-io (see :meth:`Qcow2Machine._model_discard`):
a cluster lying entirely inside the range reads as zeros afterwards (v3: zero flag; v2 without a backing file:
unallocated), the last cluster of a disk whose size is not a cluster multiple counts as entire when the range
runs to the end of the disk, and partial clusters are left unchanged -- also with extended L2 entries,
where discard still works on whole clusters. (A v2 image with a backing file ignores discard altogether in
QEMU; no variant here is such an image, but the model encodes it.)
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from qemu_images import qemu_img  # type: ignore[import-not-found]
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from pyemu.block.errors import BlockError, BlockIOError
from pyemu.block.image import open_image
from pyemu.block.qcow2.create import create_qcow2
from pyemu.block.qcow2.driver import Qcow2Format

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
QEMU_IMG = shutil.which("qemu-img")
MAX_SNAPSHOTS = 4
# Soak runs: PYEMU_QCOW2_MODEL_SCALE=10 runs ten times as many examples per variant (CI uses the default).
EXAMPLES_SCALE = float(os.environ.get("PYEMU_QCOW2_MODEL_SCALE", "1"))
HOT_CLUSTERS = 6
# Data operations are most of a run; the rest (snapshots, reopen, truncate ...) punctuate it.
IO_MIX = ("write",) * 4 + ("read",) * 2 + ("discard", "write_zeroes")

pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")




def first_difference(got: bytes | bytearray, want: bytes | bytearray) -> int:
    """Index of the first differing byte (callers know the two differ)."""
    for chunk in range(0, min(len(got), len(want)), 4096):
        if got[chunk:chunk + 4096] != want[chunk:chunk + 4096]:
            return next(i for i in range(chunk, chunk + 4096) if got[i] != want[i])
    return min(len(got), len(want))


def describe_mismatch(what: str, base: int, got: bytes, want: bytes | bytearray) -> str:
    at = first_difference(got, want)
    return (f"{what}: first difference at disk offset {base + at} (byte {at} of {len(want)}): "
            f"got {bytes(got[at:at + 16]).hex()} want {bytes(want[at:at + 16]).hex()}")


# -- image variants ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backing:
    """A qcow2 backing file and the bytes it presents (the overlay's initial model)."""

    path: Path
    data: bytes


@dataclass(frozen=True)
class Variant:
    name: str
    version: int
    cluster_size: int
    size: int
    max_size: int
    create: Callable[[Path, "Backing | None"], None]
    extended_l2: bool = False
    lazy_refcounts: bool = False
    uses_backing: bool = False
    max_examples: int = 30


def qemu_create(options: str, size: int) -> Callable[[Path, Backing | None], None]:
    def create(path: Path, backing: Backing | None) -> None:
        if backing is None:
            qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, str(size))
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-o", options, "-b", backing.path, "-F", "qcow2", path)
    return create


def pyemu_create(size: int, **options: object) -> Callable[[Path, Backing | None], None]:
    def create(path: Path, backing: Backing | None) -> None:
        assert backing is None
        create_qcow2(str(path), size, **options)  # type: ignore[arg-type]
    return create


BACKING_SIZE = 1536 * KiB

VARIANTS = {
    "v3_64k": Variant("v3_64k", 3, 64 * KiB, 2 * MiB, 3 * MiB, qemu_create("cluster_size=65536", 2 * MiB)),
    "v3_4k": Variant("v3_4k", 3, 4 * KiB, 1 * MiB, 2 * MiB, qemu_create("cluster_size=4096", 1 * MiB)),
    "v2_4k": Variant("v2_4k", 2, 4 * KiB, 1 * MiB, 2 * MiB,
                     qemu_create("compat=0.10,cluster_size=4096", 1 * MiB)),
    "extl2_32k": Variant("extl2_32k", 3, 32 * KiB, 2 * MiB, 3 * MiB,
                         qemu_create("extended_l2=on,cluster_size=32768", 2 * MiB), extended_l2=True),
    "lazy_4k": Variant("lazy_4k", 3, 4 * KiB, 1 * MiB, 2 * MiB,
                       qemu_create("lazy_refcounts=on,cluster_size=4096", 1 * MiB), lazy_refcounts=True),
    "overlay_16k": Variant("overlay_16k", 3, 16 * KiB, BACKING_SIZE, 2 * MiB + 512 * KiB,
                           qemu_create("cluster_size=16384", 0), uses_backing=True),
    "pyemu_create_8k": Variant("pyemu_create_8k", 3, 8 * KiB, 1 * MiB, 2 * MiB,
                               pyemu_create(1 * MiB, cluster_size=8192)),
}


def make_backing(directory: Path) -> Backing:
    """A qcow2 backing file with known contents: patterned runs, zero runs (left unallocated by convert) and
    odd-sized pieces, so the overlay reads through data, holes and partial clusters of its backing file."""
    rng = random.Random(0x9E3779B9)
    data = bytearray(BACKING_SIZE)
    pos = 0
    while pos < BACKING_SIZE:
        run = rng.choice([512, 3000, 4096, 20 * KiB, 64 * KiB, 100 * KiB])
        if rng.random() < 0.6:
            data[pos:pos + run] = rng.randbytes(min(run, BACKING_SIZE - pos))
        pos += run
    del data[BACKING_SIZE:]
    raw = directory / "backing.raw"
    raw.write_bytes(data)
    path = directory / "backing.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", raw, path)
    return Backing(path, bytes(data))


# -- the state machine ---------------------------------------------------------------------------------------


class Qcow2Machine(RuleBasedStateMachine):
    """One example = one fresh image. Subclasses made by :func:`machine_for` set the class attributes."""

    variant: Variant
    workdir: Path
    backing: Backing | None = None

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ex-", dir=self.workdir))
        self.path = self.dir / "disk.qcow2"
        self.variant.create(self.path, self.backing)
        self.model = bytearray(self.backing.data if self.backing else bytes(self.variant.size))
        self.snapshots: dict[str, bytes] = {}
        self.names = itertools.count()
        self.writes = itertools.count()
        self.img = self._open()
        self.is_open = True

    def _open(self) -> Qcow2Format:
        img = open_image(str(self.path), read_only=False)
        assert isinstance(img, Qcow2Format), img
        assert img.name == "qcow2"
        assert not img.read_only
        header = img.header
        assert header.version == self.variant.version
        assert header.cluster_size == self.variant.cluster_size
        assert header.extended_l2 == self.variant.extended_l2
        assert header.lazy_refcounts == self.variant.lazy_refcounts
        assert (img.backing is not None) == (self.backing is not None)
        assert img.size() == len(self.model)
        assert sorted(s.name for s in img.snapshots()) == sorted(self.snapshots)
        return img

    # -- request generation

    @property
    def size(self) -> int:
        return len(self.model)

    def _range(self, data: st.DataObject, *, label: str) -> tuple[int, int]:
        """An (offset, length) inside the disk, biased to cluster and sector edges, and mostly inside a hot
        zone of a few clusters so that operations overlap (on a whole disk, random ranges rarely meet)."""
        size, cs = self.size, self.variant.cluster_size
        hot = min(size, HOT_CLUSTERS * cs)

        def near_edge(limit: int) -> st.SearchStrategy[int]:
            return st.builds(lambda c, d: min(max(c * cs + d, 0), size), st.integers(0, limit // cs),
                             st.integers(-cs // 2, cs // 2))
        offset = data.draw(st.one_of(
            st.integers(0, hot),
            st.integers(0, hot // cs - 1).map(lambda c: c * cs),
            near_edge(hot),
            st.integers(0, hot // SECTOR - 1).map(lambda s: s * SECTOR),
            st.integers(0, size),
            near_edge(size),
            st.integers(max(0, size - 2 * cs), size),  # the tail, a partial cluster after odd-sized growth
        ), label=f"{label} offset")
        length = data.draw(st.one_of(
            st.integers(0, 3 * cs),
            st.integers(1, 4).map(lambda n: n * cs),
            st.integers(1, 1200),
            st.integers(1, 16).map(lambda n: n * SECTOR),
            st.just(size),  # to the end of the disk
        ), label=f"{label} length")
        return offset, min(length, size - offset)

    @staticmethod
    def _cuts(data: st.DataObject, length: int) -> list[tuple[int, int]]:
        """Split [0, length) into 1-4 pieces (empty pieces allowed: an iovec may carry them)."""
        points = sorted(data.draw(st.lists(st.integers(0, length), max_size=3), label="iovec cuts"))
        bounds = [0, *points, length]
        return list(zip(bounds, bounds[1:]))

    # -- rules

    @initialize(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        """Start every run with data in the hot zone, so discards and zero writes have something to remove."""
        for _ in range(data.draw(st.integers(1, 4), label="initial writes")):
            self.write(data)

    @rule(data=st.data())
    def io(self, data: st.DataObject) -> None:
        op = data.draw(st.sampled_from(IO_MIX), label="op")
        if op == "write_zeroes":
            self.write_zeroes(data, data.draw(st.booleans(), label="may_unmap"))
        else:
            getattr(self, op)(data)

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        offset, length = self._range(data, label="write")
        seed = data.draw(st.integers(0, 2**32 - 1), label="payload seed")
        # The write counter keeps payloads distinct when shrinking drives every seed to 0: a write of the same
        # bytes as before would hide a lost or misplaced write.
        payload = random.Random(seed * 1_000_003 + next(self.writes)).randbytes(length)
        buffers: list[bytes | memoryview] = []
        for start, end in self._cuts(data, length):
            kind = data.draw(st.sampled_from(["bytes", "bytearray", "memoryview"]), label="buffer type")
            piece = payload[start:end]
            # bytearray is not in the protocol's annotation, but byte_views takes any buffer: guests' RAM views
            buffers.append(piece if kind == "bytes" else memoryview(bytearray(piece)) if kind == "memoryview"
                           else bytearray(piece))  # type: ignore[arg-type]
        self.img.pwritev(offset, buffers)
        self.model[offset:offset + length] = payload

    @rule(data=st.data())
    def write_batch(self, data: st.DataObject) -> None:
        """Several writes at once (what convert hands a qcow2 target), the same as writing them in turn:
        whole clusters, fresh or not, gathered with partial ones, overlapping ones in order."""
        cs = self.variant.cluster_size
        writes: list[tuple[int, memoryview]] = []
        for _ in range(data.draw(st.integers(1, 5), label="batched writes")):
            if data.draw(st.booleans(), label="whole clusters"):
                clusters = self.size // cs
                if not clusters:
                    continue
                first = data.draw(st.integers(0, min(clusters, HOT_CLUSTERS) - 1), label="batch cluster")
                offset = first * cs
                length = data.draw(st.integers(1, min(4, clusters - first)), label="batch clusters") * cs
            else:
                offset, length = self._range(data, label="batch write")
            seed = data.draw(st.integers(0, 2**32 - 1), label="batch payload seed")
            payload = random.Random(seed * 1_000_003 + next(self.writes)).randbytes(length)
            writes.append((offset, memoryview(payload)))
        self.img.write_batch(writes)
        for offset, payload in writes:
            self.model[offset:offset + len(payload)] = payload

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        offset, length = self._range(data, label="read")
        buffers = [memoryview(bytearray(end - start)) for start, end in self._cuts(data, length)]
        for buf in buffers:  # stale garbage must be overwritten, not left in place
            buf[:] = b"\xa5" * len(buf)
        self.img.preadv(offset, buffers)
        got = b"".join(bytes(b) for b in buffers)
        want = self.model[offset:offset + length]
        assert got == want, describe_mismatch(f"preadv({offset}, {length})", offset, got, want)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        offset, length = self._range(data, label="discard")
        self.img.discard(offset, length)
        self._model_discard(offset, length)

    def _model_discard(self, offset: int, length: int) -> None:
        """QEMU 7.2, measured with qemu-io: whole clusters inside the range read as zeros afterwards (the
        disk's last, partial cluster counts as whole when the range runs to the end of the disk); partial
        clusters keep their data (also with extended L2: discard does not work on subclusters). A v2 overlay
        ignores discard, since an unallocated cluster would show the backing file again."""
        if self.variant.version == 2 and self.backing is not None:
            return
        cs, end = self.variant.cluster_size, offset + length
        first = -(-offset // cs) * cs
        for start in range(first, end, cs):
            stop = min(start + cs, self.size)
            if stop <= end:
                self.model[start:stop] = bytes(stop - start)

    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, may_unmap: bool) -> None:
        offset, length = self._range(data, label="write_zeroes")
        self.img.write_zeroes(offset, length, may_unmap=may_unmap)
        self.model[offset:offset + length] = bytes(length)

    @rule(data=st.data())
    def block_status(self, data: st.DataObject) -> None:
        """The status of this layer must not contradict the contents: zero extents read as zeros, extents
        left to the backing file read as the backing file (zeros past its end, or without one)."""
        offset = data.draw(st.integers(0, self.size - 1), label="status offset")
        length = data.draw(st.integers(1, min(4 * self.variant.cluster_size, self.size - offset)),
                           label="status length")
        status = self.img.block_status(offset, length)
        assert status.offset == offset and 0 < status.length <= length, status
        region = self.model[offset:offset + status.length]
        if status.zero:
            assert region == bytes(status.length), describe_mismatch(f"zero extent {status}", offset,
                                                                     bytes(status.length), region)
        if not status.allocated:
            below = self.backing.data[offset:offset + status.length] if self.backing else b""
            below += bytes(status.length - len(below))
            assert region == below, describe_mismatch(f"unallocated extent {status}", offset, below, region)

    @rule(data=st.data())
    def out_of_range(self, data: st.DataObject) -> None:
        """Requests crossing the end of the disk are refused with EINVAL and change nothing."""
        offset = data.draw(st.integers(max(0, self.size - 3 * SECTOR), self.size), label="bad offset")
        length = self.size - offset + data.draw(st.integers(1, 2 * SECTOR), label="excess")
        op = data.draw(st.sampled_from(["read", "write", "discard", "write_zeroes"]), label="bad op")
        with pytest.raises(BlockIOError):
            if op == "read":
                self.img.preadv(offset, [memoryview(bytearray(length))])
            elif op == "write":
                self.img.pwritev(offset, [b"\xee" * length])
            elif op == "discard":
                self.img.discard(offset, length)
            else:
                self.img.write_zeroes(offset, length, may_unmap=True)

    @precondition(lambda self: len(self.snapshots) < MAX_SNAPSHOTS)
    @rule()
    def create_snapshot(self) -> None:
        name = f"snap{next(self.names)}"
        info = self.img.create_snapshot(name)
        assert info.name == name
        assert info.disk_size == self.size
        self.snapshots[name] = bytes(self.model)
        assert sorted(s.name for s in self.img.snapshots()) == sorted(self.snapshots)

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def apply_snapshot(self, data: st.DataObject) -> None:
        """Applying restores the contents and also the disk size the snapshot was taken at (QEMU 7.2 does:
        the disk is resized back when the sizes differ)."""
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot to apply")
        self.img.apply_snapshot(name)
        self.model = bytearray(self.snapshots[name])
        assert self.img.size() == self.size
        assert sorted(s.name for s in self.img.snapshots()) == sorted(self.snapshots)

    @precondition(lambda self: bool(self.snapshots))
    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)), label="snapshot to delete")
        self.img.delete_snapshot(name)
        del self.snapshots[name]
        assert sorted(s.name for s in self.img.snapshots()) == sorted(self.snapshots)

    @rule()
    def flush(self) -> None:
        self.img.flush()

    @rule()
    def reopen(self) -> None:
        self.img.close()
        self.is_open = False  # a failed open must not be closed again at teardown
        self.img = self._open()
        self.is_open = True

    # QEMU refuses to resize a v2 image that has snapshots (its snapshot table cannot record a disk size).
    @precondition(lambda self: self.size + SECTOR <= self.variant.max_size
                  and not (self.variant.version == 2 and self.snapshots))
    @rule(data=st.data())
    def truncate_grow(self, data: st.DataObject) -> None:
        room = (self.variant.max_size - self.size) // SECTOR
        sectors = data.draw(st.one_of(st.integers(1, room), st.integers(1, min(room, 4))), label="grow sectors")
        new_size = self.size + sectors * SECTOR
        self.img.truncate(new_size)
        self.model += bytes(new_size - len(self.model))
        assert self.img.size() == new_size

    @invariant()
    def size_agrees(self) -> None:
        if self.is_open:
            assert self.img.size() == self.size

    # -- the verdict

    def teardown(self) -> None:
        try:
            if not self.is_open:
                return
            whole = memoryview(bytearray(self.size))
            for start in range(0, self.size, MiB):
                self.img.preadv(start, [whole[start:start + MiB]])
            assert whole == self.model, describe_mismatch("full read before close", 0, bytes(whole), self.model)
            self.is_open = False
            self.img.close()
            check = qemu_img("check", "-f", "qcow2", self.path, ok=(0, 1, 2, 3))
            assert check.returncode == 0, f"qemu-img check after a clean close:\n{check.stdout}{check.stderr}"
            raw = self.dir / "model.raw"
            raw.write_bytes(self.model)
            compare = qemu_img("compare", "-f", "qcow2", "-F", "raw", self.path, raw, ok=(0, 1, 2))
            assert compare.returncode == 0, f"qemu-img compare with the model:\n{compare.stdout}{compare.stderr}"
        finally:
            if self.is_open:
                try:
                    self.img.close()
                except BlockError:
                    pass
            shutil.rmtree(self.dir, ignore_errors=True)


def machine_for(variant: Variant, workdir: Path, backing: Backing | None) -> type[Qcow2Machine]:
    return type(f"Qcow2Machine_{variant.name}", (Qcow2Machine,),
                {"variant": variant, "workdir": workdir, "backing": backing})


def run_variant(name: str, tmp_path: Path) -> None:
    variant = VARIANTS[name]
    backing = make_backing(tmp_path) if variant.uses_backing else None
    run_state_machine_as_test(
        machine_for(variant, tmp_path, backing),
        settings=settings(max_examples=max(1, round(variant.max_examples * EXAMPLES_SCALE)), stateful_step_count=30,
                          deadline=None, database=None, suppress_health_check=list(HealthCheck)))


def test_model_v3_64k_clusters(tmp_path: Path) -> None:
    run_variant("v3_64k", tmp_path)


def test_model_v3_4k_clusters(tmp_path: Path) -> None:
    run_variant("v3_4k", tmp_path)


def test_model_v2_4k_clusters(tmp_path: Path) -> None:
    run_variant("v2_4k", tmp_path)


def test_model_extended_l2_32k_clusters(tmp_path: Path) -> None:
    run_variant("extl2_32k", tmp_path)


def test_model_lazy_refcounts_4k_clusters(tmp_path: Path) -> None:
    run_variant("lazy_4k", tmp_path)


def test_model_overlay_on_qcow2_backing(tmp_path: Path) -> None:
    run_variant("overlay_16k", tmp_path)


def test_model_image_made_by_pyemu_create(tmp_path: Path) -> None:
    run_variant("pyemu_create_8k", tmp_path)
