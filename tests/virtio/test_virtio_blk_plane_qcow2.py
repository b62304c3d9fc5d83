"""virtio-blk's C data plane on a qcow2 drive: reads mapped cluster by cluster through the image's read map
(block/qcow2/read_map.py), everything else left to Python.

The image is made by qemu-img and qemu-io with small clusters so that one request crosses many: data
clusters stored out of order (the plane splits a request where the file is not contiguous), zero,
compressed and unallocated clusters (over a backing file), and a partial last cluster. The property test
requires the guest to see exactly what the Python path gives it; the others pin that the plane really
serves mapped reads, and that the map follows the image: copy-on-write after an internal snapshot, discard,
zero writes, snapshot apply, resize and damage.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyemu.block.qcow2.driver import Qcow2Format
from pyemu.block.qcow2.read_map import ZEROES
from pyemu.hw.virtio import blk as vblk

from .test_virtio_blk_plane import Request, Setup, device_on, offer, run_batch, serve

SECTOR = 512
CLUSTER = 4096
SIZE = 1 << 20
CLUSTERS = SIZE // CLUSTER
BACKING = bytes((i * 7 + (i >> 12)) & 0xFF for i in range(SIZE))


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


def cluster_pattern(index: int) -> int:
    return (index * 37 + 11) & 0xFF


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clusters written back to front (host order reversed), every 5th zero, every 7th compressed, every
    4th left to the backing file; written with O_DIRECT-friendly sizes."""
    directory = tmp_path_factory.mktemp("qcow2-plane")
    backing = directory / "backing.raw"
    backing.write_bytes(BACKING)
    path = directory / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", "-b", str(backing),
                    "-F", "raw", str(path)], check=True)
    commands = []
    for index in reversed(range(CLUSTERS)):
        if index % 4 == 0:
            continue
        if index % 5 == 0:
            commands.append(f"write -z {index * CLUSTER} {CLUSTER}")
        elif index % 7 == 0:
            commands.append(f"write -c -P {cluster_pattern(index)} {index * CLUSTER} {CLUSTER}")
        else:
            commands.append(f"write -P {cluster_pattern(index)} {index * CLUSTER} {CLUSTER}")
    qemu_io(path, *commands)
    return path


def expected(offset: int, length: int) -> bytes:
    out = bytearray()
    for pos in range(offset, offset + length):
        index = pos // CLUSTER
        if index % 4 == 0:
            out.append(BACKING[pos])
        elif index % 5 == 0:
            out.append(0)
        else:
            out.append(cluster_pattern(index))
    return bytes(out)


def plain(index: int) -> bool:
    return index % 4 != 0 and index % 5 != 0 and index % 7 != 0


PLAIN_RUNS = [i for i in range(CLUSTERS - 3) if all(plain(j) for j in range(i, i + 3))]
"""Clusters that start three plain data clusters in a row (stored back to front: not contiguous)."""


def qcow2_requests() -> st.SearchStrategy[list[Request]]:
    """Requests anywhere, and often inside runs of plain clusters: the plane serves only from the head of
    the queue up to the first request it cannot map."""
    in_a_run = st.builds(lambda cluster, sector: cluster * (CLUSTER // SECTOR) + sector,
                         st.sampled_from(PLAIN_RUNS), st.integers(0, CLUSTER // SECTOR - 1))
    return st.lists(st.builds(
        Request,
        kind=st.sampled_from([vblk.T_IN] * 8 + [vblk.T_OUT, vblk.T_FLUSH]),
        sector=st.one_of(in_a_run, in_a_run, st.integers(0, SIZE // SECTOR + 4)),
        size=st.sampled_from([4096, 8192, 512, 1024, 65536, 16384, 24576]),
        pages=st.booleans(),
        align=st.sampled_from([4096, 512]),
        indirect=st.booleans(),
    ), min_size=1, max_size=8)


def look_up_the_table(s: Setup) -> None:
    """What the guest's first read of the disk does: the L2 table (one covers this disk) is looked up, and
    the read map filled from it, so the plane can serve the batch."""
    root = s.backend.root
    assert isinstance(root, Qcow2Format)
    s.backend.begin_pass_through()  # makes the map
    s.backend.end_pass_through()
    root.map.l2_table(0)


@pytest.mark.parametrize("cache", ["writeback", "none"])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests=qcow2_requests())
def test_the_plane_on_qcow2_changes_nothing_the_guest_sees(image: Path, cache: str, requests: list[Request]) -> None:
    with_plane = run_batch(image, cache, requests, plane=True, fmt="qcow2", prepare=look_up_the_table)
    without = run_batch(image, cache, requests, plane=False, fmt="qcow2", prepare=look_up_the_table)
    assert without["served_by_plane"] == 0
    assert with_plane["reported"] and without["reported"]
    for key in ("used", "statuses", "data", "image", "broken"):
        assert with_plane[key] == without[key], key


@pytest.fixture
def copy(image: Path, tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(image.read_bytes())
    return path


def read_through(s, sector: int, size: int, seed: int = 0) -> bytes:  # type: ignore[no-untyped-def]
    head, pieces, status = offer(s.driver, Request(vblk.T_IN, sector, size, pages=True, align=4096,
                                                   indirect=True), seed)
    serve(s.transport)
    assert s.driver.used(0)[-1] == (head, size + 1) and s.memory.read_u8(status) == vblk.S_OK
    return b"".join(s.memory.read(a, n) for a, n in pieces)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_mapped_reads_go_through_the_plane_and_others_do_not(copy: Path, cache: str) -> None:
    """A read of plain data clusters (stored back to front: a host read each) and zero clusters is the
    plane's once the L2 table was looked up (the first read of the table is Python's); a read that touches a
    compressed cluster, or an unallocated one over a backing file, is Python's."""
    with device_on(copy, cache, plane=True, fmt="qcow2") as s:
        assert read_through(s, 0, 4096) == expected(0, 4096)  # backing: Python, publishes the table
        plane = s.device._planes[0]
        assert plane.served == 0
        run = next(i for i in range(CLUSTERS) if all(plain(j) for j in range(i, i + 2)))
        for first, count in ((run, 2), (1, 1), (run, 1)):
            before = plane.served
            assert read_through(s, first * CLUSTER // SECTOR, count * CLUSTER) == expected(first * CLUSTER,
                                                                                      count * CLUSTER)
            assert plane.served == before + (1 if all(plain(j) for j in range(first, first + count)) else 0)
        before = plane.served
        for index in (4, 7):  # backing, compressed
            assert read_through(s, index * CLUSTER // SECTOR, CLUSTER) == expected(index * CLUSTER, CLUSTER)
        assert plane.served == before
        assert read_through(s, 5 * CLUSTER // SECTOR, 2 * CLUSTER) == expected(5 * CLUSTER, 2 * CLUSTER)
        assert plane.served == before + 1  # a zero cluster and a data cluster: zeros are a memset in C


def test_the_map_follows_copy_on_write_discard_zero_writes_and_snapshot_apply(copy: Path) -> None:
    cluster = next(i for i in range(CLUSTERS) if plain(i))
    sector = cluster * CLUSTER // SECTOR
    with device_on(copy, "writeback", plane=True, fmt="qcow2", extra=(("discard", "unmap"),)) as s:
        root = s.backend.root
        assert isinstance(root, Qcow2Format)
        read_through(s, 0, 4096)
        assert read_through(s, sector, CLUSTER) == expected(cluster * CLUSTER, CLUSTER)
        read_map = root.map.read_map
        assert read_map is not None and read_map.host_of(cluster)
        old_host = read_map.host_of(cluster)

        root.create_snapshot("before")  # the cluster is shared now: a write copies it elsewhere
        assert read_map.host_of(cluster) == 0  # a tree-wide change starts the map again
        read_through(s, 0, 4096)
        head, _, status = offer(s.driver, Request(vblk.T_OUT, sector, CLUSTER, pages=True, align=4096,
                                                  indirect=False), 3)
        serve(s.transport)
        assert s.memory.read_u8(status) == vblk.S_OK
        new_host = read_map.host_of(cluster)
        assert new_host and new_host != old_host
        served = s.device._planes[0].served
        assert read_through(s, sector, CLUSTER) == bytes((3 + i) & 0xFF for i in range(CLUSTER))
        assert s.device._planes[0].served == served + 1

        root.discard(cluster * CLUSTER, CLUSTER)
        assert read_map.host_of(cluster) == ZEROES  # over a backing file a discarded cluster is a zero one
        assert read_through(s, sector, CLUSTER) == bytes(CLUSTER)  # over a backing file it reads as zeros

        other = next(i for i in range(cluster + 1, CLUSTERS) if plain(i))
        read_through(s, other * CLUSTER // SECTOR, CLUSTER)
        assert read_map.host_of(other)
        root.write_zeroes(other * CLUSTER, CLUSTER, may_unmap=True)
        assert read_map.host_of(other) == ZEROES
        assert read_through(s, other * CLUSTER // SECTOR, CLUSTER) == bytes(CLUSTER)

        root.apply_snapshot("before")
        assert read_through(s, sector, CLUSTER) == expected(cluster * CLUSTER, CLUSTER)
        assert read_through(s, other * CLUSTER // SECTOR, CLUSTER) == expected(other * CLUSTER, CLUSTER)
        assert read_map.host_of(cluster) == old_host


def test_a_resize_gives_a_new_map_and_damage_retires_it(copy: Path) -> None:
    with device_on(copy, "writeback", plane=True, fmt="qcow2") as s:
        root = s.backend.root
        assert isinstance(root, Qcow2Format)
        assert root.map.read_map is None  # made at the first offer to a C reader
        read_through(s, 0, 4096)
        old = root.map.read_map
        assert old is not None and old.clusters == CLUSTERS
        root.truncate(2 * SIZE)
        new = root.map.read_map
        assert new is not None and new is not old and new.clusters == 2 * CLUSTERS and not old.usable
        cluster = next(i for i in range(CLUSTERS) if plain(i))
        read_through(s, 0, 4096)
        assert read_through(s, cluster * CLUSTER // SECTOR, CLUSTER) == expected(cluster * CLUSTER, CLUSTER)
        assert new.host_of(cluster)
        root.corruption("a test says so")
        assert not new.usable and new.host_of(cluster) == 0
        assert s.backend.begin_pass_through() is None  # a corrupt image is Python's alone


def damage_entry(image: Path, cluster: int, word: int) -> None:
    """Overwrite the standard L2 entry of guest ``cluster`` (the disk's one L2 table) with ``word``."""
    data = bytearray(image.read_bytes())
    l1_offset = int.from_bytes(data[40:48], "big")
    l2_offset = int.from_bytes(data[l1_offset:l1_offset + 8], "big") & 0x00FFFFFFFFFFFE00
    data[l2_offset + 8 * cluster:l2_offset + 8 * cluster + 8] = word.to_bytes(8, "big")
    image.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["past the end", "unaligned", "the L1 table's cluster", "reserved bits"])
def test_damaged_entries_get_the_same_answer_with_the_plane(image: Path, tmp_path: Path, damage: str) -> None:
    """An L2 entry that points past the end of the file or off a cluster boundary, or has reserved bits set,
    never reaches the read map: the guest gets Python's answer (EIO, the image marked corrupt) whether or not
    the plane runs, and so do the reads around it. One that names a metadata cluster (here the L1 table's)
    reads that cluster in both, as QEMU's reads do (only writes are checked against metadata)."""
    damaged = tmp_path / "damaged.qcow2"
    damaged.write_bytes(image.read_bytes())
    cluster = PLAIN_RUNS[0] + 1
    size = damaged.stat().st_size
    l1_offset = int.from_bytes(damaged.read_bytes()[40:48], "big")
    word = {"past the end": (1 << 63) | (size + 16 * CLUSTER), "unaligned": (1 << 63) | (3 * CLUSTER + 512),
            "the L1 table's cluster": (1 << 63) | l1_offset,
            "reserved bits": (1 << 63) | (1 << 57) | (2 * CLUSTER)}[damage]
    damage_entry(damaged, cluster, word)
    start = PLAIN_RUNS[0] * (CLUSTER // SECTOR)
    requests = [Request(vblk.T_IN, start, CLUSTER, pages=True, align=4096, indirect=False),
                Request(vblk.T_IN, start, 3 * CLUSTER, pages=True, align=4096, indirect=True),
                Request(vblk.T_IN, start + 2 * (CLUSTER // SECTOR), CLUSTER, pages=True, align=4096,
                        indirect=False)]
    with_plane = run_batch(damaged, "none", requests, plane=True, fmt="qcow2", prepare=look_up_the_table)
    without = run_batch(damaged, "none", requests, plane=False, fmt="qcow2", prepare=look_up_the_table)
    for key in ("used", "statuses", "data", "broken"):
        assert with_plane[key] == without[key], key
    assert with_plane["statuses"][0] == vblk.S_OK  # the cluster before the damaged one reads fine
    assert with_plane["statuses"][1] == (vblk.S_OK if damage == "the L1 table's cluster" else vblk.S_IOERR)


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_without_a_backing_file_unallocated_clusters_are_zeros_in_c(tmp_path: Path, cache: str) -> None:
    """No backing file: an unallocated cluster, and a whole L2 table's span that has no table yet (4 KiB
    clusters: one table maps 2 MiB), read as zeros in C; a write there makes the cluster data, read in C
    too (under O_DIRECT as well: the file grew by that cluster, and what it grows by keeps O_DIRECT)."""
    path = tmp_path / "fresh.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", str(path), "4M"],
                   check=True)
    qemu_io(path, f"write -P 0x5a {CLUSTER} {CLUSTER}")
    with device_on(path, cache, plane=True, fmt="qcow2") as s:
        root = s.backend.root
        assert isinstance(root, Qcow2Format)
        assert read_through(s, 0, 4096) == bytes(4096)  # Python: looks the table up
        plane = s.device._planes[0]
        assert read_through(s, 0, 3 * CLUSTER) == bytes(CLUSTER) + b"\x5a" * CLUSTER + bytes(CLUSTER)
        assert plane.served == 1
        far = (3 << 20) // SECTOR  # in the second table's span: no table there
        assert read_through(s, far, CLUSTER) == bytes(CLUSTER)  # Python: finds no table, publishes zeros
        assert read_through(s, far, 2 * CLUSTER) == bytes(2 * CLUSTER)
        assert plane.served == 2
        head, _, status = offer(s.driver, Request(vblk.T_OUT, far, CLUSTER, pages=True, align=4096,
                                                  indirect=False), 9)
        serve(s.transport)
        assert s.memory.read_u8(status) == vblk.S_OK
        assert read_through(s, far, 2 * CLUSTER) == bytes((9 + i) & 0xFF for i in range(CLUSTER)) + bytes(CLUSTER)
        assert plane.served == 3
