"""Hostile qcow2 images: pyemu must fail cleanly or return data -- never crash, hang, hog memory or write
where it should not.

An image file is untrusted input (a user downloads it; a guest with write access to an image's backing chain
crafts one). Starting from small valid images QEMU made (data, a zero cluster, a compressed cluster, an
internal snapshot, a backing file; plain v3, extended L2 and v2 variants), hypothesis mutates bytes in the
header, header extensions, L1 and L2 tables, refcount table and blocks, snapshot table and snapshot L1 tables
-- whose offsets this test finds by parsing the header itself, per the qcow2 specification -- and pyemu then
opens the image, reads it, walks block_status, lists snapshots and runs check(). Allowed outcomes: a typed
error (``BlockError``, or ``BlockConfigError`` which open-time errors use) or data. Anything else -- another
exception, a hang, a MemoryError, a read slower than a few seconds, a process killed by the kernel -- fails.

Each example runs in a forked worker process with an address-space limit (so an attempt to allocate
gigabytes for a giant L1 table shows up as MemoryError instead of swapping the host) and a per-example
timeout enforced by the parent. A read-only open must leave the image file byte-for-byte unchanged; the
read-write variant writes inside the virtual disk only, and the file may then grow but not explode (at most
16x its size), and the backing file is never touched.

Named tests below cover hand-made hostile cases whose expected outcome is known exactly (QEMU refuses them
at open, or must report corruption).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import resource
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qemu_images import KiB, MiB, create, qemu_img, qemu_io, qemu_tools_missing

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ModuleNotFoundError:  # pragma: no cover -- hypothesis is in the test extras
    pytest.skip("hypothesis not installed", allow_module_level=True)

try:
    from pyemu.block.errors import BlockConfigError, BlockError
    from pyemu.block.image import open_image
except ModuleNotFoundError as exc:  # the qcow2 driver has not landed yet: skip, but never hide other errors
    if exc.name not in ("pyemu.block.image", "pyemu.block.qcow2"):
        raise
    DRIVER_MISSING: str | None = f"qcow2 driver not available yet ({exc.name} missing)"
    ALLOWED: tuple[type[BaseException], ...] = ()
else:
    DRIVER_MISSING = None
    ALLOWED = (BlockError, BlockConfigError)
pytestmark = [pytest.mark.skipif(qemu_tools_missing() is not None, reason=str(qemu_tools_missing()))]

EXAMPLE_TIMEOUT_S = 20.0   # the whole example (open, reads, status walk, check, close) in the worker
SLOW_OP_S = 4.0            # any single operation
READ_LIMIT = 4 * MiB       # how much of the (possibly mutated) virtual disk is read
MEMORY_HEADROOM = 1 << 30  # address space the worker may add to what it had at fork
GROWTH_FACTOR = 16
# PYEMU_FUZZ_EXAMPLES=5000 PYEMU_FUZZ_RANDOM=1 for a longer, non-reproducible exploration run.
FUZZ_EXAMPLES = int(os.environ.get("PYEMU_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
    derandomize=os.environ.get("PYEMU_FUZZ_RANDOM") is None,  # reproducible in CI; set the variable to explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------------------------------
# qcow2 layout, parsed here independently of pyemu (docs/interop/qcow2.txt)

HEADER_FIELDS: dict[str, tuple[int, int]] = {  # name -> (offset, width)
    "magic": (0, 4), "version": (4, 4), "backing_file_offset": (8, 8), "backing_file_size": (16, 4),
    "cluster_bits": (20, 4), "size": (24, 8), "crypt_method": (32, 4), "l1_size": (36, 4),
    "l1_table_offset": (40, 8), "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4), "snapshots_offset": (64, 8), "incompatible_features": (72, 8),
    "compatible_features": (80, 8), "autoclear_features": (88, 8), "refcount_order": (96, 4),
    "header_length": (100, 4),
}
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00   # bits 9..55 of L1/L2/refcount-table entries
COPIED = 1 << 63
COMPRESSED = 1 << 62


def get_field(data: bytes | bytearray, name: str) -> int:
    offset, width = HEADER_FIELDS[name]
    return int.from_bytes(data[offset:offset + width], "big")


def set_field(data: bytearray, name: str, value: int) -> None:
    offset, width = HEADER_FIELDS[name]
    data[offset:offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")


def u64(data: bytes | bytearray, offset: int) -> int:
    return struct.unpack_from(">Q", data, offset)[0]


def put_u64(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">Q", data, offset, value % (1 << 64))


@dataclass
class Layout:
    """Where the metadata of a (valid) image lies: name -> list of (offset, length) byte ranges."""

    cluster_size: int
    file_size: int
    regions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    l1_offset: int = 0
    l1_entries: list[int] = field(default_factory=list)
    l2_entry_bytes: int = 8

    def add(self, name: str, offset: int, length: int) -> None:
        if length > 0 and offset + length <= self.file_size:
            self.regions.setdefault(name, []).append((offset, length))


def parse_layout(data: bytes) -> Layout:
    """Locate header, extensions, L1/L2, refcount table/blocks, snapshot table and snapshot L1/L2 tables."""
    version = get_field(data, "version")
    cluster_size = 1 << get_field(data, "cluster_bits")
    layout = Layout(cluster_size, len(data))
    header_length = 72 if version == 2 else get_field(data, "header_length")
    incompatible = get_field(data, "incompatible_features") if version >= 3 else 0
    extended_l2 = bool(incompatible & (1 << 4))
    layout.l2_entry_bytes = 16 if extended_l2 else 8
    layout.add("header", 0, header_length)
    layout.add("extensions", header_length, min(cluster_size, 4096) - header_length)

    def tables(prefix: str, l1_offset: int, l1_size: int) -> list[int]:
        layout.add(f"{prefix}l1", l1_offset, l1_size * 8)
        entries = [u64(data, l1_offset + 8 * i) for i in range(l1_size)]
        for entry in entries:
            if entry & OFFSET_MASK:
                layout.add(f"{prefix}l2", entry & OFFSET_MASK, cluster_size)
        return entries

    layout.l1_offset = get_field(data, "l1_table_offset")
    layout.l1_entries = tables("", layout.l1_offset, get_field(data, "l1_size"))
    rt_offset = get_field(data, "refcount_table_offset")
    rt_length = get_field(data, "refcount_table_clusters") * cluster_size
    layout.add("refcount_table", rt_offset, rt_length)
    for i in range(rt_length // 8):
        block = u64(data, rt_offset + 8 * i) & ~0x1FF
        if block:
            layout.add("refcount_block", block, cluster_size)
    pos = get_field(data, "snapshots_offset")
    start = pos
    for _ in range(get_field(data, "nb_snapshots")):
        sn_l1_offset, sn_l1_size, id_size, name_size = struct.unpack_from(">QIHH", data, pos)
        extra_size = struct.unpack_from(">I", data, pos + 36)[0]
        tables("snapshot_", sn_l1_offset, sn_l1_size)
        pos += 40 + extra_size + id_size + name_size
        pos = (pos + 7) & ~7
    layout.add("snapshot_table", start, pos - start)
    layout.add("anywhere", 0, len(data))
    return layout


# --------------------------------------------------------------------------------------------------------------
# the worker


def _address_space_now() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def exercise(path: str, writable: bool, fmt: str | None) -> dict[str, Any]:
    """Open ``path`` with pyemu and do everything a guest and a user could: read, block_status, snapshots,
    check (and writes when ``writable``). Returns a summary; ``bug`` holds the traceback of any exception
    that is not one of the allowed typed errors."""
    out: dict[str, Any] = {"open_error": None, "bug": None, "chunks": [], "max_op_s": 0.0, "slowest": "",
                           "check": None, "snapshots_error": None}

    def timed(what: str, fn, *args, **kwargs):
        start = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.monotonic() - start
            if elapsed > out["max_op_s"]:
                out["max_op_s"], out["slowest"] = elapsed, what

    try:
        drv = timed("open", open_image, path, format=fmt, read_only=not writable)
    except ALLOWED as exc:
        out["open_error"] = f"{type(exc).__name__}: {exc}"
        return out
    except BaseException:  # noqa: BLE001 -- this is what the test is looking for
        out["bug"] = "open: " + traceback.format_exc()
        return out
    try:
        size = drv.size()
        assert type(size) is int and size >= 0, f"size() returned {size!r}"  # noqa: E721
        limit = min(size, READ_LIMIT)
        ranges = [(lo, min(64 * KiB, limit - lo)) for lo in range(0, limit, 64 * KiB)]
        if size > limit:
            tail = min(size, 4096)
            ranges += [((size * k // 4) & ~0xFFF, 4096) for k in (1, 2, 3)] + [(size - tail, tail)]
        for offset, length in ranges:
            buf = bytearray(length)
            try:
                timed(f"read {offset}+{length}", drv.preadv, offset, [memoryview(buf)])
                out["chunks"].append((offset, length, "ok", hashlib.sha1(buf).hexdigest()))
            except ALLOWED as exc:
                out["chunks"].append((offset, length, f"error {type(exc).__name__}", str(exc)))
        pos, steps = 0, 0
        try:
            while pos < limit and steps < 20000:
                status = timed(f"block_status {pos}", drv.block_status, pos, limit - pos)
                assert status.offset == pos and 0 < status.length <= limit - pos, f"bad extent {status} at {pos}"
                pos += status.length
                steps += 1
        except ALLOWED:
            pass
        if hasattr(drv, "snapshots"):
            try:
                timed("snapshots", drv.snapshots)
            except ALLOWED as exc:
                out["snapshots_error"] = f"{type(exc).__name__}: {exc}"
        if writable:
            for offset, length, kind in ((0, 4096, "write"), (limit // 2 + 123, 5000, "write"),
                                         (max(0, limit - 3000), 3000, "write"), (8192, 8192, "zero"),
                                         (limit // 3 & ~0xFFFF, 64 * KiB, "discard")):
                length = min(length, limit - offset)
                if length <= 0:
                    continue
                try:
                    if kind == "write":
                        timed(f"write {offset}", drv.pwritev, offset, [memoryview(b"\xa7" * length)])
                    elif kind == "zero":
                        timed(f"zero {offset}", drv.write_zeroes, offset, length, may_unmap=True)
                    else:
                        timed(f"discard {offset}", drv.discard, offset, length)
                except ALLOWED:
                    pass
            try:
                timed("flush", drv.flush)
            except ALLOWED:
                pass
        if hasattr(drv, "check"):
            try:
                result = timed("check", drv.check)
                out["check"] = {"corruptions": result.corruptions, "leaks": result.leaks,
                                "check_errors": result.check_errors}
            except ALLOWED as exc:
                out["check"] = {"error": f"{type(exc).__name__}: {exc}"}
    except ALLOWED as exc:
        out["late_error"] = f"{type(exc).__name__}: {exc}"
    except BaseException:  # noqa: BLE001
        out["bug"] = traceback.format_exc()
    finally:
        try:
            timed("close", drv.close)
        except ALLOWED:
            pass
        except BaseException:  # noqa: BLE001
            out["bug"] = (out["bug"] or "") + "close: " + traceback.format_exc()
    return out


def _worker_main(conn) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space_now() + MEMORY_HEADROOM
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    while True:
        request = conn.recv()
        if request is None:
            break
        conn.send(exercise(*request))
    conn.close()


class Worker:
    """A forked process that runs :func:`exercise`; restarted after a hang or a crash."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("fork")
        self._start()

    def _start(self) -> None:
        self.conn, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def _restart(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        self._start()

    def run(self, path: Path, *, writable: bool = False, fmt: str | None = "qcow2") -> dict[str, Any]:
        self.conn.send((str(path), writable, fmt))
        if not self.conn.poll(EXAMPLE_TIMEOUT_S):
            self._restart()
            raise AssertionError(f"pyemu hung on {path} (no answer within {EXAMPLE_TIMEOUT_S} s)")
        try:
            return self.conn.recv()
        except EOFError:
            code = self.proc.exitcode
            self._restart()
            raise AssertionError(f"the worker died on {path} (exit code {code}: killed by the kernel or a crash)")

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture(scope="module")
def worker():
    """Every test that runs pyemu goes through this fixture, so they all skip while the driver is missing
    (the layout self-test still runs)."""
    if DRIVER_MISSING is not None:
        pytest.skip(DRIVER_MISSING)
    instance = Worker()
    yield instance
    instance.stop()


def assert_clean(outcome: dict[str, Any], what: str = "") -> None:
    """Only typed errors or data: no other exception, nothing slow."""
    assert outcome["bug"] is None, f"{what}: pyemu raised an untyped exception:\n{outcome['bug']}"
    assert outcome["max_op_s"] < SLOW_OP_S, f"{what}: {outcome['slowest']} took {outcome['max_op_s']:.1f} s"


# --------------------------------------------------------------------------------------------------------------
# the seed images


@dataclass
class FuzzBase:
    name: str
    directory: Path
    data: bytes = field(repr=False)
    layout: Layout = field(repr=False)
    backing: Path = field(repr=False)
    backing_sha: str = field(repr=False)

    @property
    def target(self) -> Path:
        """Where mutated images are written (next to the backing file, which they name relatively)."""
        return self.directory / "fuzz.qcow2"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_fuzz_base(root: Path, name: str, *, compat: str, cluster: int, size: int,
                    extended_l2: bool = False) -> FuzzBase:
    """A seed image: data, a zero cluster (v3), a compressed cluster, an internal snapshot taken before more
    writes (so the snapshot has its own L1 and shares clusters), and a relative backing file."""
    directory = root / name
    directory.mkdir()
    backing = directory / "base.qcow2"
    create(backing, size, compat=compat, cluster_size=cluster)
    qemu_io(backing, [f"write -P 0x61 0 {size}"])
    seed = directory / "seed.qcow2"
    options: dict[str, Any] = {"compat": compat, "cluster_size": cluster}
    if extended_l2:
        options["extended_l2"] = True
    create(seed, None, backing="base.qcow2", **options)
    second = 2 * MiB if size > 2 * MiB + 64 * KiB else size // 2  # in the second L2 table where there is one
    commands = [f"write -P 0x11 0 {4 * cluster}", f"write -P 0x12 {second + 100} 5000",
                f"write -c -P 0x13 {16 * cluster} {cluster}", f"write -P 0x14 {20 * cluster + 512} 512"]
    if compat == "1.1":
        commands.append(f"write -z {8 * cluster} {cluster}")
    qemu_io(seed, commands)
    qemu_img("snapshot", "-c", "snap", seed)
    qemu_io(seed, [f"write -P 0x21 {cluster // 2} {cluster}", f"write -P 0x22 {second + cluster * 3} 100",
                   f"write -P 0x23 {size - 700} 700"])
    proc = qemu_img("check", seed, check=False)
    assert proc.returncode == 0, proc.stdout
    data = seed.read_bytes()
    layout = parse_layout(data)
    for needed in ("header", "l1", "l2", "refcount_table", "refcount_block", "snapshot_table", "snapshot_l1"):
        assert needed in layout.regions, f"{name}: no {needed} found"
    return FuzzBase(name, directory, data, layout, backing, sha256(backing))


@pytest.fixture(scope="module")
def fuzz_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FuzzBase]:
    reason = qemu_tools_missing()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("qcow2-fuzz")
    return {
        # 4 KiB clusters: an L2 table maps 2 MiB, so 2.25 MiB needs two.
        "v3": build_fuzz_base(root, "v3", compat="1.1", cluster=4 * KiB, size=2 * MiB + 256 * KiB),
        "v2": build_fuzz_base(root, "v2", compat="0.10", cluster=4 * KiB, size=2 * MiB + 256 * KiB),
        # Subclusters make every status query finer-grained: keep this disk small.
        "extl2": build_fuzz_base(root, "extl2", compat="1.1", cluster=16 * KiB, size=768 * KiB, extended_l2=True),
    }


def test_fuzz_selftest_layout_parser(fuzz_bases: dict[str, FuzzBase]) -> None:
    """The test's own parser finds QEMU's structures where ``qemu-img info``/``check`` say they are (this runs
    without pyemu's qcow2 code)."""
    for base in fuzz_bases.values():
        layout = base.layout
        assert len(layout.regions["l1"]) == 1
        if layout.cluster_size == 4 * KiB:
            assert len(layout.regions["l2"]) >= 2        # the disk spans two L2 tables
        assert len(layout.regions["snapshot_l1"]) == 1
        for name, ranges in layout.regions.items():
            for offset, length in ranges:
                if name not in ("header", "extensions", "anywhere", "snapshot_table"):
                    assert offset % layout.cluster_size == 0, (base.name, name, offset)
                assert offset + length <= len(base.data)
        # The mutation target reads like the seed through QEMU (with its relative backing file).
        base.target.write_bytes(base.data)
        assert qemu_img("check", base.target, check=False).returncode == 0


# --------------------------------------------------------------------------------------------------------------
# mutations


def interesting_values(base: FuzzBase) -> list[int]:
    cs = base.layout.cluster_size
    end = (len(base.data) + cs - 1) // cs * cs
    l2 = base.layout.regions["l2"][0][0]
    return [0, 1, 2, 7, 8, 9, 16, 21, 22, 63, 64, 0x7F, 0xFF, 0x1FF, 512, cs - 1, cs, cs + 512, 2 * cs,
            end, end + cs, end + (1 << 20) * cs, 1 << 31, (1 << 31) - 1, (1 << 32) - 1, 1 << 32,
            1 << 40, 1 << 55, 1 << 56, (1 << 62) - cs, 1 << 62, 1 << 63, (1 << 64) - 1, (1 << 64) - cs,
            COPIED | l2, COPIED | base.layout.l1_offset, COPIED | 0, COMPRESSED | l2, COMPRESSED | (end - 1),
            COMPRESSED | ((1 << 62) - 1), l2 + 512, COPIED | 1, 1 << 4, 1 << 3, (1 << 5) | 1]


@st.composite
def mutations(draw, base: FuzzBase) -> list[tuple[int, int, bytes]]:
    """1..6 edits ``(offset, width, new bytes)`` aimed at one metadata region each."""
    values = interesting_values(base)
    edits = []
    region_names = sorted(base.layout.regions)
    for _ in range(draw(st.integers(1, 6))):
        region = draw(st.sampled_from(region_names))
        ranges = base.layout.regions[region]
        offset, length = ranges[draw(st.integers(0, len(ranges) - 1))]
        kind = draw(st.sampled_from(("byte", "bitflip", "word", "word", "word")))
        if kind == "word":
            width = draw(st.sampled_from((8, 8, 4, 2)))
            step = 4 if region == "header" else width
            position = offset + draw(st.integers(0, max(0, length - width))) // step * step
            value = draw(st.one_of(st.sampled_from(values), st.integers(0, (1 << (8 * width)) - 1)))
            edits.append((position, width, (value % (1 << (8 * width))).to_bytes(width, "big")))
        else:
            position = offset + draw(st.integers(0, max(0, length - 1)))
            if kind == "byte":
                new = draw(st.integers(0, 255))
            else:
                new = base.data[position] ^ (1 << draw(st.integers(0, 7)))
            edits.append((position, 1, bytes([new])))
    return edits


def apply_edits(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    out = bytearray(data)
    for position, width, new in edits:
        out[position:position + width] = new
    return bytes(out)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_read_only(fuzz_bases: dict[str, FuzzBase], worker: Worker, data: st.DataObject) -> None:
    base = fuzz_bases[data.draw(st.sampled_from(sorted(fuzz_bases)), label="base")]
    edits = data.draw(mutations(base), label="edits")
    mutated = apply_edits(base.data, edits)
    base.target.write_bytes(mutated)
    outcome = worker.run(base.target)
    assert_clean(outcome, f"{base.name} {edits}")
    assert base.target.read_bytes() == mutated, "a read-only open wrote to the image"
    assert sha256(base.backing) == base.backing_sha, "the backing file was modified"


@settings(FUZZ_SETTINGS, max_examples=max(1, FUZZ_EXAMPLES // 3))
@given(data=st.data())
def test_fuzz_read_write(fuzz_bases: dict[str, FuzzBase], worker: Worker, data: st.DataObject) -> None:
    base = fuzz_bases[data.draw(st.sampled_from(sorted(fuzz_bases)), label="base")]
    edits = data.draw(mutations(base), label="edits")
    base.target.write_bytes(apply_edits(base.data, edits))
    outcome = worker.run(base.target, writable=True)
    assert_clean(outcome, f"{base.name} {edits}")
    grown = base.target.stat().st_size
    assert grown <= GROWTH_FACTOR * len(base.data), f"the image grew from {len(base.data)} to {grown} bytes"
    assert sha256(base.backing) == base.backing_sha, "the backing file was modified"


# --------------------------------------------------------------------------------------------------------------
# hand-made hostile images


def hostile(base: FuzzBase, edit) -> Path:
    """Write the seed image with ``edit(bytearray)`` applied to the mutation target and return its path."""
    data = bytearray(base.data)
    edit(data)
    base.target.write_bytes(bytes(data))
    return base.target


def run_read_only(worker: Worker, path: Path, what: str) -> dict[str, Any]:
    before = path.read_bytes()
    outcome = worker.run(path)
    assert_clean(outcome, what)
    assert path.read_bytes() == before, f"{what}: a read-only open wrote to the image"
    return outcome


def assert_open_refused(outcome: dict[str, Any], what: str) -> None:
    assert outcome["open_error"] is not None, f"{what}: pyemu opened the image instead of refusing it"


def l2_coverage(base: FuzzBase) -> int:
    return base.layout.cluster_size // base.layout.l2_entry_bytes * base.layout.cluster_size


@pytest.mark.parametrize("kind", ["v3", "extl2"])
def test_hostile_l1_entry_past_eof(fuzz_bases, worker, kind: str) -> None:
    base = fuzz_bases[kind]
    cs = base.layout.cluster_size
    past = ((len(base.data) + cs - 1) // cs + 4096) * cs
    path = hostile(base, lambda d: put_u64(d, base.layout.l1_offset, COPIED | past))
    outcome = run_read_only(worker, path, "L1 entry past EOF")
    check = outcome["check"]
    if outcome["open_error"] is None and check is not None and "error" not in check:
        assert check["corruptions"] + check["check_errors"] > 0, "check() missed an L2 table past the end of file"


@pytest.mark.parametrize("kind", ["v3", "v2", "extl2"])
def test_hostile_unaligned_l2_offset(fuzz_bases, worker, kind: str) -> None:
    base = fuzz_bases[kind]
    l1_0 = base.layout.l1_entries[0]
    path = hostile(base, lambda d: put_u64(d, base.layout.l1_offset, l1_0 + 512))
    outcome = run_read_only(worker, path, "unaligned L2 offset")
    if outcome["open_error"] is None:
        coverage = l2_coverage(base)
        served = [c for c in outcome["chunks"] if c[0] < coverage and c[2] == "ok"]
        assert not served, f"data served through an unaligned L2 table: {served[:3]}"


def first_l2_entry_offset(base: FuzzBase) -> int:
    """File offset of the L2 entry that maps guest cluster 0 (allocated data in every seed)."""
    return base.layout.l1_entries[0] & OFFSET_MASK


@pytest.mark.parametrize("kind", ["v3", "v2"])
@pytest.mark.parametrize("target", ["header", "l1", "snapshot_table", "refcount_table"])
def test_hostile_l2_entry_points_into_metadata(fuzz_bases, worker, kind: str, target: str) -> None:
    """A data cluster that is really the L1 table (or another metadata cluster): reading it may return the
    metadata bytes, but check() must see the double reference, and a write must never land on the metadata.

    A standard L2 entry with host offset 0 means "unallocated", so the header cluster is aimed at with a
    compressed-cluster descriptor instead (host offset 0, one sector)."""
    base = fuzz_bases[kind]
    meta_offset, meta_length = base.layout.regions[target][0]
    meta_cluster = meta_offset // base.layout.cluster_size * base.layout.cluster_size
    entry_at = first_l2_entry_offset(base)
    entry = COMPRESSED | 0 if target == "header" else COPIED | meta_cluster
    path = hostile(base, lambda d: put_u64(d, entry_at, entry))
    outcome = run_read_only(worker, path, f"L2 entry -> {target}")
    check = outcome["check"]
    if outcome["open_error"] is None and check is not None and "error" not in check:
        assert check["corruptions"] > 0, "check() missed a data cluster that overlaps metadata"
    before = path.read_bytes()
    outcome = worker.run(path, writable=True)
    assert_clean(outcome, f"L2 entry -> {target}, read-write")
    after = path.read_bytes()
    if target == "header":
        # pyemu may rewrite the header itself (to set the corrupt bit, say), so compare what it says, not
        # its bytes: QEMU must still read the same disk geometry and backing file.
        info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
        assert info["virtual-size"] == get_field(base.data, "size")
        assert info["backing-filename"] == "base.qcow2"
        assert after[:4] == b"QFI\xfb"
        return
    assert after[meta_offset:meta_offset + meta_length] == before[meta_offset:meta_offset + meta_length], \
        f"a guest write overwrote the {target}"


@pytest.mark.parametrize("value", [0xFFFF_FFFF_FFFF_0000, 12345, 1 << 62])
def test_hostile_refcount_table_offset(fuzz_bases, worker, value: int) -> None:
    """Unaligned, or so large that offset + table size overflows a signed 64-bit file offset: refused at open.
    (2**62 is aligned and representable: QEMU opens it and reads an all-zero table; pyemu may refuse it or
    treat it as corrupt, but must not write near that offset.)"""
    base = fuzz_bases["v3"]
    path = hostile(base, lambda d: set_field(d, "refcount_table_offset", value))
    outcome = run_read_only(worker, path, f"refcount_table_offset={value:#x}")
    strict = value != 1 << 62
    if strict:
        assert_open_refused(outcome, "absurd refcount table offset")
    outcome = worker.run(path, writable=True)
    assert_clean(outcome, "absurd refcount table offset, read-write")
    if strict:
        assert_open_refused(outcome, "absurd refcount table offset, read-write")
    assert path.stat().st_size <= GROWTH_FACTOR * len(base.data)


@pytest.mark.parametrize("value", [1 << 63, (1 << 64) - 1, 1 << 62])
def test_hostile_virtual_size(fuzz_bases, worker, value: int) -> None:
    base = fuzz_bases["v3"]
    path = hostile(base, lambda d: set_field(d, "size", value))
    outcome = run_read_only(worker, path, f"size={value:#x}")
    assert_open_refused(outcome, f"size {value:#x}")


@pytest.mark.parametrize("value", [0xFFFF_FFFF, 1 << 25, 0x8000_0000])
def test_hostile_l1_size_huge(fuzz_bases, worker, value: int) -> None:
    """A giant L1 table must be refused from the header alone, not allocated (the worker's address-space
    limit turns an attempt into MemoryError, which fails the test)."""
    base = fuzz_bases["v3"]
    path = hostile(base, lambda d: set_field(d, "l1_size", value))
    outcome = run_read_only(worker, path, f"l1_size={value:#x}")
    assert_open_refused(outcome, f"l1_size {value:#x}")


def test_hostile_l1_size_too_small(fuzz_bases, worker) -> None:
    base = fuzz_bases["v3"]
    path = hostile(base, lambda d: set_field(d, "l1_size", 0))
    outcome = run_read_only(worker, path, "l1_size=0")
    assert_open_refused(outcome, "an L1 table too small for the disk")


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_hostile_snapshot_table_overlapping_header(fuzz_bases, worker, kind: str) -> None:
    base = fuzz_bases[kind]
    path = hostile(base, lambda d: set_field(d, "snapshots_offset", 0))
    run_read_only(worker, path, "snapshot table at offset 0")
    outcome = worker.run(path, writable=True)
    assert_clean(outcome, "snapshot table at offset 0, read-write")


@pytest.mark.parametrize("value", [0xFFFF_FFFF, 70000, 0x8000_0000])
def test_hostile_nb_snapshots_huge(fuzz_bases, worker, value: int) -> None:
    base = fuzz_bases["v3"]
    path = hostile(base, lambda d: set_field(d, "nb_snapshots", value))
    outcome = run_read_only(worker, path, f"nb_snapshots={value}")
    assert outcome["open_error"] is not None or outcome["snapshots_error"] is not None, \
        f"nb_snapshots={value} was accepted"


@pytest.mark.parametrize("field_name,value", [("backing_file_offset", None), ("backing_file_size", 2000),
                                              ("backing_file_size", 0xFFFF_FFFF),
                                              ("backing_file_offset", (1 << 64) - 8)])
def test_hostile_backing_name_location(fuzz_bases, worker, field_name: str, value: int | None) -> None:
    """The backing file name must lie inside the header cluster and be at most 1023 bytes."""
    base = fuzz_bases["v3"]
    value = base.layout.cluster_size + 16 if value is None else value
    path = hostile(base, lambda d: set_field(d, field_name, value))
    outcome = run_read_only(worker, path, f"{field_name}={value:#x}")
    assert_open_refused(outcome, f"{field_name}={value:#x}")


@pytest.mark.parametrize("name", [b"base\x00qcow2", b"\xff\xfe.qcow2", b"/proc/self/fd/../../x"])
def test_hostile_backing_file_name(fuzz_bases, worker, name: bytes) -> None:
    """Backing names are bytes from the file: a NUL byte or invalid UTF-8 must be a typed open error (a NUL
    makes os.path functions raise ValueError), a name that does not exist too."""
    base = fuzz_bases["v3"]
    offset = get_field(base.data, "backing_file_offset")

    def edit(data: bytearray) -> None:
        data[offset:offset + len(name)] = name
        set_field(data, "backing_file_size", len(name))

    outcome = run_read_only(worker, hostile(base, edit), f"backing file name {name!r}")
    assert_open_refused(outcome, f"backing file name {name!r}")


@pytest.mark.parametrize("bits", [0, 8, 22, 63, 0xFFFF_FFFF])
def test_hostile_cluster_bits(fuzz_bases, worker, bits: int) -> None:
    base = fuzz_bases["v3"]
    path = hostile(base, lambda d: set_field(d, "cluster_bits", bits))
    outcome = run_read_only(worker, path, f"cluster_bits={bits}")
    assert_open_refused(outcome, f"cluster_bits={bits}")


@pytest.mark.parametrize("field_name,value", [
    ("version", 1), ("version", 4), ("crypt_method", 1), ("crypt_method", 2), ("refcount_order", 7),
    ("header_length", 8), ("header_length", 1 << 20), ("incompatible_features", 1 << 20),
    ("l1_table_offset", 1000), ("refcount_table_clusters", 0), ("snapshots_offset", 1000),
])
def test_hostile_header_fields_refused(fuzz_bases, worker, field_name: str, value: int) -> None:
    base = fuzz_bases["v3"]
    path = hostile(base, lambda d: set_field(d, field_name, value))
    outcome = run_read_only(worker, path, f"{field_name}={value:#x}")
    if field_name == "snapshots_offset":  # QEMU still opens, the snapshot table is then unusable
        assert outcome["open_error"] is not None or outcome["snapshots_error"] is not None
    else:
        assert_open_refused(outcome, f"{field_name}={value:#x}")


def test_hostile_compressed_entry_past_eof(fuzz_bases, worker) -> None:
    """A compressed cluster descriptor pointing past the end of the file: reading it is an error or data."""
    base = fuzz_bases["v3"]
    cs = base.layout.cluster_size
    entry_at = first_l2_entry_offset(base) + 16 * 8  # guest cluster 16 holds the compressed write
    x = 62 - (base.layout.cluster_size.bit_length() - 1 - 8)
    path = hostile(base, lambda d: put_u64(d, entry_at, COMPRESSED | (1 << x) * 3 | (len(base.data) + 100 * cs)))
    run_read_only(worker, path, "compressed cluster past EOF")


def test_hostile_refcount_block_overlaps_l1(fuzz_bases, worker) -> None:
    base = fuzz_bases["v3"]
    rt_offset = base.layout.regions["refcount_table"][0][0]
    path = hostile(base, lambda d: put_u64(d, rt_offset, base.layout.l1_offset))
    outcome = run_read_only(worker, path, "refcount block = L1 table")
    outcome = worker.run(path, writable=True)
    assert_clean(outcome, "refcount block = L1 table, read-write")


# --- backing chains -------------------------------------------------------------------------------------------


def test_hostile_backing_loop_two_images(tmp_path: Path, worker) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(b, 1 * MiB)
    create(a, None, backing="b.qcow2")
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", b, cwd=tmp_path)
    outcome = run_read_only(worker, a, "backing loop a -> b -> a")
    assert_open_refused(outcome, "a backing loop a -> b -> a")


def test_hostile_backing_is_itself(tmp_path: Path, worker) -> None:
    a = tmp_path / "a.qcow2"
    create(a, 1 * MiB)
    qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", a, cwd=tmp_path)
    outcome = run_read_only(worker, a, "backing file is the image itself")
    assert_open_refused(outcome, "an image that is its own backing file")
    # Also by another name for the same file.
    link = tmp_path / "alias.qcow2"
    link.symlink_to(a)
    qemu_img("rebase", "-u", "-b", "alias.qcow2", "-F", "qcow2", a, cwd=tmp_path)
    outcome = run_read_only(worker, a, "backing file is a symlink to the image")
    assert_open_refused(outcome, "an image whose backing file is a symlink to itself")


def test_hostile_backing_chain_too_deep(tmp_path: Path, worker) -> None:
    """70 images deep: refused (the limit is 64), not a recursion error."""
    create(tmp_path / "l00.qcow2", 1 * MiB)
    create(tmp_path / "l01.qcow2", None, backing="l00.qcow2")
    template = (tmp_path / "l01.qcow2").read_bytes()
    assert template.count(b"l00.qcow2") == 1
    for depth in range(2, 71):
        image = template.replace(b"l00.qcow2", f"l{depth - 1:02d}.qcow2".encode())
        (tmp_path / f"l{depth:02d}.qcow2").write_bytes(image)
    outcome = run_read_only(worker, tmp_path / "l70.qcow2", "chain of 70")
    assert_open_refused(outcome, "a 70-deep backing chain")
    outcome = run_read_only(worker, tmp_path / "l40.qcow2", "chain of 40")
    assert outcome["open_error"] is None, outcome["open_error"]
