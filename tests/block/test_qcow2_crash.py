"""Crash consistency of the qcow2 driver: SIGKILL a writer at random moments, then audit the image.

A writer subprocess (the script built by :func:`writer_script`, run by the same interpreter) opens a qcow2
image read-write through ``open_image`` and performs a deterministic, seeded sequence of operations: mostly
writes whose bytes encode (sequence number, disk offset), plus discards and write-zeroes. After every
``every``-th operation it calls ``flush()`` and then appends the sequence number to a journal file, fsynced.
Before each operation it also records the sequence number it is about to start in a progress file (no fsync:
a killed process loses nothing it wrote, only a machine crash would).

The parent kills the writer with SIGKILL -- right after start, as it opens the image, right after the image
is open, after some flushes, or the moment the image file grows (that is, while a data cluster, an L2 table or
a refcount block is being allocated; tiny clusters make those allocations frequent). Other cases make the
writer kill itself at its n-th write to the image file, optionally counting only the writes of the metadata
write-back inside ``flush()``, and optionally after letting the first sectors of that write land (a torn
multi-sector write: the sector-atomic failure model qcow2 is designed for). Then the test requires:

* ``qemu-img check`` finds no corruption (leaks are allowed: exit 0 or 3), and ``qemu-img check -r leaks`` on
  a copy leaves a clean image; with lazy_refcounts the image is dirty after a kill, so ``-r all`` must repair
  it to a clean image instead;
* every 512-byte sector reads (through pyemu and through ``qemu-img convert -O raw``) exactly as the model
  says after the last journaled flush, unless an operation after that flush touched it: then the sector may
  hold its flushed value or its value after any of those later operations (old or new, per sector);
* pyemu opens the killed image read-write (repairing a dirty lazy-refcounts image as QEMU does), can allocate
  more clusters without clobbering anything, and closes it clean.

The parent knows the expected contents without reading the image: it regenerates the same operation sequence
from the seed (:func:`crash_ops` is shared verbatim with the writer) and replays it on a bytearray.
:func:`test_harness_on_raw_file` runs the whole harness with a writer that uses plain ``os.pwrite`` on a raw
file, which checks the harness itself (journal parsing, replay, the old-or-new rule) independently of qcow2.
"""

from __future__ import annotations

import inspect
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from qemu_images import qemu_img  # type: ignore[import-not-found]

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512
QEMU_IMG = shutil.which("qemu-img")
WAIT_LIMIT_S = 30.0  # generous: a writer that makes no progress for this long is broken, not slow

needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")


# -- shared with the writer (copied into its script by inspect.getsource: keep them stdlib-only) ------------


def crash_ops(seed: int, size: int, cluster: int):  # type: ignore[no-untyped-def]
    """Endless deterministic operations ``(kind, offset, length, flag)``; kind is "write", "discard" or
    "zero" (flag: may_unmap). Offsets favour cluster edges and lengths span 1-3 clusters, so writes straddle
    clusters and L2 tables and keep allocating."""
    rng = random.Random(seed)
    while True:
        roll = rng.random()
        if roll < 0.45:
            offset = rng.randrange(0, size // cluster) * cluster + rng.choice([0, 0, 1, cluster // 2, cluster - 7])
        elif roll < 0.75:
            offset = rng.randrange(0, size // SECTOR) * SECTOR
        else:
            offset = rng.randrange(0, size)
        offset = min(offset, size - 1)
        length = rng.choice([rng.randrange(1, 3 * cluster + 1), cluster, 2 * cluster, rng.randrange(1, 1025)])
        length = min(length, size - offset)
        kind = rng.random()
        if kind < 0.82:
            yield ("write", offset, length, False)
        elif kind < 0.91:
            yield ("discard", offset, length, False)
        else:
            yield ("zero", offset, length, rng.random() < 0.5)


def crash_pattern(seq: int, offset: int, length: int) -> bytes:
    """The bytes operation ``seq`` writes at ``offset``: 16-byte records "PYEW", seq, disk offset, aligned to
    the disk, so any sector found in the image names the operation and place it came from."""
    start = offset & ~15
    end = (offset + length + 15) & ~15
    pack = struct.Struct("<4sIQ").pack
    data = b"".join([pack(b"PYEW", seq & 0xFFFFFFFF, pos) for pos in range(start, end, 16)])
    return data[offset - start:offset - start + length]


def discarded_ranges(offset: int, length: int, cluster: int, size: int) -> list[tuple[int, int]]:
    """The ranges a discard makes read as zeros (QEMU 7.2 on a v3 image or a v2 image without backing file,
    measured with qemu-io): whole clusters inside the request, the disk's partial last cluster counting as
    whole when the request runs to the end of the disk. Partial clusters keep their data."""
    end = offset + length
    ranges = []
    for start in range(-(-offset // cluster) * cluster, end, cluster):
        stop = min(start + cluster, size)
        if stop <= end:
            ranges.append((start, stop))
    return ranges


SECTOR_SOURCE = f"SECTOR = {SECTOR}\n"

WRITER_MAIN = r'''
def kill_at_host_write(img, nth, in_flush, tear):
    """SIGKILL this process at the nth write to the image file (counting only writes made during flush()
    when in_flush: the metadata write-back). With tear, the part of that write before a sector boundary in
    its middle lands first: a torn multi-sector write, which is what a crash can leave behind."""
    original = img.file.pwritev
    state = {"count": 0, "flushing": False}

    def pwritev(offset, buffers):
        if state["flushing"] or not in_flush:
            state["count"] += 1
            if state["count"] == nth:
                data = b"".join(bytes(b) for b in buffers)
                cut = (offset + len(data) // 2) // SECTOR * SECTOR - offset
                if tear and 0 < cut < len(data):
                    original(offset, [data[:cut]])
                os.kill(os.getpid(), signal.SIGKILL)
        return original(offset, buffers)

    def flush():
        state["flushing"] = True
        try:
            img.flush()
        finally:
            state["flushing"] = False

    img.file.pwritev = pwritev
    return flush


def open_target(mode, image, pkg_dir, inject):
    """(write, discard, write_zeroes, flush) callables for the image."""
    if mode == "raw":
        fd = os.open(image, os.O_RDWR)
        size = os.fstat(fd).st_size

        def write(offset, data):
            os.pwrite(fd, data, offset)

        def discard(offset, length, cluster):
            for start, stop in discarded_ranges(offset, length, cluster, size):
                os.pwrite(fd, bytes(stop - start), start)

        def zero(offset, length, may_unmap):
            os.pwrite(fd, bytes(length), offset)

        return write, discard, zero, lambda: os.fsync(fd)
    try:
        import pyemu  # noqa: F401
    except ImportError:  # the package directory is not on sys.path under the name "pyemu": load it from there
        import importlib.util
        spec = importlib.util.spec_from_file_location("pyemu", os.path.join(pkg_dir, "__init__.py"),
                                                      submodule_search_locations=[pkg_dir])
        module = importlib.util.module_from_spec(spec)
        sys.modules["pyemu"] = module
        spec.loader.exec_module(module)
    from pyemu.block.image import open_image
    img = open_image(image, read_only=False)

    def write(offset, data):
        cut = (offset * 7 + len(data)) % (len(data) + 1)  # a two-piece iovec now and then
        img.pwritev(offset, [data[:cut], memoryview(data)[cut:]] if cut % 3 == 0 else [data])

    flush = img.flush
    nth, in_flush, tear = (int(x) for x in inject.split(","))
    if nth:
        flush = kill_at_host_write(img, nth, in_flush, tear)
    return (write, lambda offset, length, cluster: img.discard(offset, length),
            lambda offset, length, may_unmap: img.write_zeroes(offset, length, may_unmap=may_unmap), flush)


def main():
    mode, image, journal, progress, seed, size, cluster, every, pkg_dir, inject = sys.argv[1:]
    seed, size, cluster, every = int(seed), int(size), int(cluster), int(every)
    jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pfd = os.open(progress, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(jfd, b"opening\n")
    write, discard, zero, flush = open_target(mode, image, pkg_dir, inject)
    os.write(jfd, b"open\n")
    os.fsync(jfd)
    for seq, (kind, offset, length, flag) in enumerate(crash_ops(seed, size, cluster)):
        os.pwrite(pfd, struct.pack("<q", seq), 0)
        if kind == "write":
            write(offset, crash_pattern(seq, offset, length))
        elif kind == "discard":
            discard(offset, length, cluster)
        else:
            zero(offset, length, flag)
        if (seq + 1) % every == 0:
            flush()
            os.write(jfd, b"%d\n" % seq)
            os.fsync(jfd)


main()
'''


def writer_script() -> str:
    """The writer: stdlib imports, the shared functions above (verbatim), then its main loop."""
    shared = "\n\n".join(inspect.getsource(f) for f in (crash_ops, crash_pattern, discarded_ranges))
    imports = "".join(f"import {name}\n" for name in ("os", "random", "signal", "struct", "sys"))
    return imports + "\n" + SECTOR_SOURCE + "\n" + shared + WRITER_MAIN


# -- the parent's side: journal, replay, verdict -------------------------------------------------------------


def parse_journal(text: str) -> tuple[bool, int]:
    """(image was opened, last sequence number known flushed; -1 for none). Only complete lines count: a
    line cut short by the kill is ignored."""
    lines = text.split("\n")[:-1]
    flushed = [int(line) for line in lines if line.isdigit()]
    return "open" in lines, max(flushed, default=-1)


def read_progress(path: Path) -> int | None:
    """The last operation the writer started (None when it never got to one)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return struct.unpack("<q", data[:8])[0] if len(data) >= 8 else None


@dataclass
class Expectation:
    """What the image may contain: ``flushed`` is the disk after every operation up to the last journaled
    flush; a sector touched later may instead equal one of ``alternatives[sector]`` (its value after each
    later operation in turn)."""

    flushed_seq: int
    last_started: int
    flushed: bytearray
    alternatives: dict[int, set[bytes]] = field(default_factory=dict)

    @property
    def touched(self) -> int:
        return len(self.alternatives)


def apply_op(disk: bytearray, seq: int, op: tuple[str, int, int, bool], cluster: int) -> tuple[int, int]:
    """Apply one operation to the model; returns the byte range it may have changed."""
    kind, offset, length, _flag = op
    if kind == "write":
        disk[offset:offset + length] = crash_pattern(seq, offset, length)
    elif kind == "discard":
        for start, stop in discarded_ranges(offset, length, cluster, len(disk)):
            disk[start:stop] = bytes(stop - start)
    else:
        disk[offset:offset + length] = bytes(length)
    return offset, offset + length


def replay(seed: int, initial: bytes, cluster: int, flushed_seq: int, last_started: int) -> Expectation:
    disk = bytearray(initial)
    ops = crash_ops(seed, len(initial), cluster)
    for seq in range(flushed_seq + 1):
        apply_op(disk, seq, next(ops), cluster)
    expectation = Expectation(flushed_seq, last_started, bytearray(disk))
    for seq in range(flushed_seq + 1, last_started + 1):
        start, end = apply_op(disk, seq, next(ops), cluster)
        for sector in range(start // SECTOR, -(-end // SECTOR)):
            value = bytes(disk[sector * SECTOR:(sector + 1) * SECTOR])
            expectation.alternatives.setdefault(sector, set()).add(value)
    return expectation


def describe_sector(data: bytes) -> str:
    """Whose bytes a sector holds, decoded from the 16-byte pattern records (zeros, which operations'
    records, and the disk offset the first record was written for: a misplaced cluster shows there)."""
    if not any(data):
        return "zeros"
    ops: dict[int, int] = {}
    zero_records = other = 0
    for pos in range(0, len(data), 16):
        magic, seq, where = struct.unpack_from("<4sIQ", data, pos)
        if magic == b"PYEW":
            ops.setdefault(seq, where)
        elif not any(data[pos:pos + 16]):
            zero_records += 1
        else:
            other += 1
    parts = [f"op {seq}'s data (written for disk offset {where})" for seq, where in sorted(ops.items())]
    if zero_records:
        parts.append(f"{zero_records} zero records")
    if other:
        parts.append(f"{other} other records")
    return ", ".join(parts)


def audit(actual: bytes, expect: Expectation, *, source: str) -> None:
    """Fail with the first few sectors that hold neither their flushed value nor a later one."""
    assert len(actual) == len(expect.flushed), f"{source}: size {len(actual)} != {len(expect.flushed)}"
    bad: list[str] = []
    flushed = expect.flushed
    for start in range(0, len(actual), 64 * KiB):
        if actual[start:start + 64 * KiB] == flushed[start:start + 64 * KiB]:
            continue
        for pos in range(start, min(start + 64 * KiB, len(actual)), SECTOR):
            got = actual[pos:pos + SECTOR]
            want = bytes(flushed[pos:pos + SECTOR])
            if got == want or got in expect.alternatives.get(pos // SECTOR, ()):
                continue
            bad.append(f"sector {pos // SECTOR} (offset {pos}): holds {describe_sector(got)}, flushed value is "
                       f"{describe_sector(want)}" + (", later ops touched it" if pos // SECTOR in
                                                     expect.alternatives else ", no later op touched it"))
            if len(bad) >= 8:
                break
        if len(bad) >= 8:
            break
    assert not bad, (f"{source}: after the kill (last flushed op {expect.flushed_seq}, last started op "
                     f"{expect.last_started}):\n  " + "\n  ".join(bad))


# -- running one writer and killing it ----------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """When the writer dies. Killed by the parent: ``how`` is "spawn" (``delay`` seconds after the start),
    "opening" (as the writer calls ``open_image``), "open" (``delay`` after the image is open), "flushes"
    (``delay`` after ``flushes`` journaled flushes) or "grow" (after ``flushes`` journaled flushes, the moment
    the image file next changes size and is at least ``file_size`` bytes long: while a cluster is being
    allocated, e.g. the refcount block or refcount table growth that a given file size forces).
    Killed by itself: "inject" kills the writer at its ``write``-th write to the image file (counting only
    writes inside flush() with ``in_flush``: in the middle of the metadata write-back), after writing the
    first sectors of it with ``tear``."""

    how: str
    delay: float = 0.0
    flushes: int = 0
    file_size: int = 0
    write: int = 0
    in_flush: bool = False
    tear: bool = False

    @property
    def inject(self) -> str:
        return f"{self.write if self.how == 'inject' else 0},{int(self.in_flush)},{int(self.tear)}"


@dataclass
class Outcome:
    opened: bool
    flushed_seq: int
    last_started: int | None


def package_dir() -> str:
    import pyemu
    return os.path.dirname(os.path.abspath(pyemu.__file__))


def run_and_kill(workdir: Path, mode: str, image: Path, *, seed: int, cluster: int, every: int,
                 kill: Kill) -> Outcome:
    script = workdir / "writer.py"
    script.write_text(writer_script())
    journal, progress, errors = workdir / "journal", workdir / "progress", workdir / "writer.stderr"
    for path in (journal, progress):
        path.unlink(missing_ok=True)
    env = dict(os.environ)
    pkg = package_dir()
    if os.path.basename(pkg) == "pyemu":  # make the package importable whatever the cwd is
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(pkg), env.get("PYTHONPATH")]))
    size = image.stat().st_size if mode == "raw" else image_virtual_size(image)
    with open(errors, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script), mode, str(image), str(journal), str(progress),
                                 str(seed), str(size), str(cluster), str(every), pkg, kill.inject],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                cwd=workdir)
    try:
        if kill.how == "inject":
            try:
                proc.wait(timeout=WAIT_LIMIT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"the writer did not reach host write {kill.write} in {WAIT_LIMIT_S}s:\n"
                                     f"{errors.read_text()}") from None
            assert proc.returncode == -signal.SIGKILL, (f"the writer exited ({proc.returncode}) before its "
                                                        f"injected kill:\n{errors.read_text()}")
        else:
            _wait_for_kill_point(proc, journal, image, kill, errors)
            assert proc.poll() is None, f"the writer exited by itself ({proc.returncode}):\n{errors.read_text()}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    opened, flushed_seq = parse_journal(journal.read_text() if journal.exists() else "")
    return Outcome(opened, flushed_seq, read_progress(progress))


def _journal_state(journal: Path) -> tuple[bool, int]:
    """(image opened, number of journaled flushes)."""
    try:
        lines = journal.read_text().split("\n")[:-1]
    except FileNotFoundError:
        return False, 0
    return "open" in lines, sum(line.isdigit() for line in lines)


def _wait_for_kill_point(proc: subprocess.Popen[bytes], journal: Path, image: Path, kill: Kill,
                         errors: Path) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S

    def waiting(what: str) -> None:
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{errors.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress in {WAIT_LIMIT_S}s while waiting for {what}:\n{errors.read_text()}")

    if kill.how == "spawn":
        time.sleep(kill.delay)
        return
    if kill.how == "opening":
        while "opening" not in (journal.read_text() if journal.exists() else ""):
            waiting("the writer to start opening the image")
            time.sleep(0.0002)
        time.sleep(kill.delay)
        return
    while True:
        opened, flushes = _journal_state(journal)
        if opened and (kill.how == "open" or flushes >= kill.flushes):
            break
        waiting("the journal")
        time.sleep(0.001)
    if kill.how != "grow":
        time.sleep(kill.delay)
        return
    size = image.stat().st_size
    while True:
        now = image.stat().st_size
        if now != size and now >= kill.file_size:
            return
        waiting(f"the image to grow (now {now} bytes, kill at {kill.file_size})")


# -- qcow2 images and tools ---------------------------------------------------------------------------------




def image_virtual_size(path: Path) -> int:
    import json
    return json.loads(qemu_img("info", "-U", "--output=json", "-f", "qcow2", path).stdout)["virtual-size"]


def backing_content(size: int, seed: int) -> bytes:
    """Backing data: random runs with holes (left unallocated in the qcow2 backing file)."""
    rng = random.Random(seed)
    data = bytearray(size)
    pos = 0
    while pos < size:
        run = rng.choice([SECTOR, 4 * KiB, 16 * KiB, 48 * KiB, 100 * KiB])
        if rng.random() < 0.6:
            data[pos:pos + run] = rng.randbytes(min(run, size - pos))
        pos += run
    return bytes(data[:size])


@dataclass(frozen=True)
class CrashCase:
    name: str
    seed: int
    kill: Kill
    cluster: int = 512
    size: int = 8 * MiB
    options: str = ""  # extra qemu-img create -o options
    backing: bool = False
    lazy: bool = False
    every: int = 4


# Each case runs for a second or two at most; the thresholds are in flushes and file sizes, not in time, so a
# slow machine reaches the same states. Tiny clusters make metadata allocation frequent: with 512-byte clusters
# an L2 table covers 32 KiB of disk and a 16-bit refcount block 128 KiB of file (64-bit: 32 KiB, and the first
# refcount table cluster only 2 MiB of file, so growing past 2 MiB forces refcount table growth).
CASES = [
    CrashCase("kill_at_spawn", 101, Kill("spawn", delay=0.02), cluster=4 * KiB),
    CrashCase("kill_while_opening", 102, Kill("opening")),
    CrashCase("kill_right_after_open", 103, Kill("open"), cluster=4 * KiB, size=16 * MiB),
    CrashCase("kill_mid_allocation_512", 104, Kill("grow", flushes=60)),
    CrashCase("kill_with_many_unflushed_ops", 105, Kill("grow", flushes=4), every=64),
    CrashCase("kill_at_refcount_table_growth", 106, Kill("grow", file_size=2 * MiB + 4 * KiB), every=16,
              options="refcount_bits=64"),
    CrashCase("kill_after_flushes_4k", 107, Kill("flushes", delay=0.03, flushes=50), cluster=4 * KiB,
              size=16 * MiB, options="refcount_bits=64"),
    CrashCase("v2_kill_mid_allocation", 108, Kill("grow", flushes=40), options="compat=0.10"),
    CrashCase("overlay_kill_mid_allocation", 109, Kill("grow", flushes=40), backing=True),
    CrashCase("overlay_kill_with_unflushed_ops_4k", 110, Kill("flushes", delay=0.01, flushes=8), cluster=4 * KiB,
              backing=True, every=32),
    CrashCase("extended_l2_kill_mid_allocation", 111, Kill("grow", flushes=20), cluster=16 * KiB,
              size=16 * MiB, options="extended_l2=on"),
    CrashCase("lazy_refcounts_kill_with_unflushed_ops", 112, Kill("grow", flushes=8), lazy=True, every=32),
    CrashCase("lazy_refcounts_overlay_kill_after_flushes", 113, Kill("flushes", delay=0.02, flushes=30),
              cluster=4 * KiB, backing=True, lazy=True),
    CrashCase("lazy_refcounts_kill_at_refcount_table_growth", 114, Kill("grow", file_size=2 * MiB + 4 * KiB),
              lazy=True, every=64, options="refcount_bits=64"),
]

# Kills injected at host writes: exact and independent of timing, and inside the metadata write-back.
CASES += [
    CrashCase("inject_mid_flush_512", 115, Kill("inject", write=60, in_flush=True)),
    CrashCase("inject_torn_write_mid_flush_refcount64", 116, Kill("inject", write=700, in_flush=True, tear=True),
              every=16, options="refcount_bits=64"),
    CrashCase("inject_torn_write_overlay", 117, Kill("inject", write=900, tear=True), backing=True, every=8),
    CrashCase("inject_torn_write_extended_l2", 118, Kill("inject", write=400, tear=True), cluster=16 * KiB,
              size=16 * MiB, options="extended_l2=on", every=8),
    CrashCase("lazy_refcounts_inject_torn_write_mid_flush", 119,
              Kill("inject", write=300, in_flush=True, tear=True), lazy=True, every=32),
]

# Soak runs: PYEMU_CRASH_SEED=<n> shifts every case's operation sequence (the default is fixed for CI).
SEED_SHIFT = int(os.environ.get("PYEMU_CRASH_SEED", "0"))


def make_image(case: CrashCase, directory: Path) -> tuple[Path, bytes]:
    """The qcow2 image the writer will hammer, made by qemu-img, and the disk contents it starts with."""
    image = directory / "disk.qcow2"
    options = [f"cluster_size={case.cluster}"] + ([case.options] if case.options else [])
    if case.lazy:
        options.append("lazy_refcounts=on")
    if not case.backing:
        qemu_img("create", "-q", "-f", "qcow2", "-o", ",".join(options), image, str(case.size))
        return image, bytes(case.size)
    initial = backing_content(case.size, case.seed)
    raw = directory / "backing.raw"
    raw.write_bytes(initial)
    backing = directory / "backing.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", raw, backing)
    raw.unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-o", ",".join(options), "-b", backing.name, "-F", "qcow2", image)
    return image, initial


def read_with_pyemu(path: Path, *, read_only: bool = True) -> bytes:
    from pyemu.block.image import open_image
    img = open_image(str(path), read_only=read_only)
    try:
        data = memoryview(bytearray(img.size()))
        for start in range(0, len(data), MiB):
            img.preadv(start, [data[start:start + MiB]])
        return bytes(data)
    finally:
        img.close()


def read_with_qemu(path: Path, directory: Path) -> bytes:
    out = directory / "converted.raw"
    qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", path, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def copy_image(image: Path, to: Path) -> Path:
    """A copy beside the original, so a relative backing file name still resolves."""
    shutil.copyfile(image, to)
    return to


@needs_qemu_img
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kill_and_audit(case: CrashCase, tmp_path: Path) -> None:
    seed = case.seed + 1000 * SEED_SHIFT
    kill = replace(case.kill, write=case.kill.write + 13 * SEED_SHIFT) if case.kill.how == "inject" else case.kill
    image, initial = make_image(case, tmp_path)
    outcome = run_and_kill(tmp_path, "qcow2", image, seed=seed, cluster=case.cluster, every=case.every, kill=kill)
    last_started = outcome.last_started if outcome.last_started is not None else -1
    expect = replay(seed, initial, case.cluster, outcome.flushed_seq, max(last_started, outcome.flushed_seq))

    # 1. QEMU's verdict on the structure.
    if case.lazy:
        # Dirty after the kill: stale refcounts are expected, anything else is not.
        check = qemu_img("check", "-f", "qcow2", image, ok=(0, 1, 2, 3))
        assert check.returncode in (0, 2, 3), f"qemu-img check after the kill:\n{check.stdout}{check.stderr}"
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("ERROR")]
        assert all("refcount=" in line for line in errors), f"not just refcount errors:\n{check.stdout}{check.stderr}"
        repaired = copy_image(image, tmp_path / "repair-all.qcow2")
        qemu_img("check", "-q", "-r", "all", "-f", "qcow2", repaired, ok=(0,))
        qemu_img("check", "-f", "qcow2", repaired, ok=(0,))
    else:
        check = qemu_img("check", "-f", "qcow2", image, ok=(0, 1, 2, 3))
        assert check.returncode in (0, 3), f"qemu-img check after the kill:\n{check.stdout}{check.stderr}"
        repaired = copy_image(image, tmp_path / "repair-leaks.qcow2")
        qemu_img("check", "-q", "-r", "leaks", "-f", "qcow2", repaired, ok=(0,))
        qemu_img("check", "-f", "qcow2", repaired, ok=(0,))
    audit(read_with_qemu(repaired, tmp_path), expect, source="qemu-img convert of the repaired copy")

    # 2. The contents, as QEMU and as pyemu read them.
    audit(read_with_qemu(image, tmp_path), expect, source="qemu-img convert")
    audit(read_with_pyemu(image), expect, source="pyemu (read-only open)")

    # 3. pyemu opens the killed image read-write -- repairing a dirty image on open as QEMU does, leaks and all
    #    -- and closes it in a state qemu-img accepts ...
    live = copy_image(image, tmp_path / "reopened.qcow2")
    from pyemu.block.image import open_image
    img = open_image(str(live), read_only=False)
    try:
        size = img.size()
        contents = memoryview(bytearray(size))
        for start in range(0, size, MiB):
            img.preadv(start, [contents[start:start + MiB]])
        audit(bytes(contents), expect, source="pyemu (read-write open)")
    finally:
        img.close()
    check = qemu_img("check", "-f", "qcow2", live, ok=(0, 1, 2, 3))
    assert check.returncode in ((0,) if case.lazy else (0, 3)), \
        f"qemu-img check after pyemu opened the killed image read-write and closed it:\n{check.stdout}{check.stderr}"

    # ... then allocates more clusters without clobbering anything. Leaks may show up now even after a
    # repair: a refcount the killed writer left for a cluster past the end of the file (an L2 table it never
    # got to write) is invisible to QEMU's check and repair alike until the file grows over it.
    img = open_image(str(live), read_only=False)
    try:
        rng = random.Random(seed ^ 0x5EED)
        for n in range(24):
            offset = rng.randrange(0, size // SECTOR) * SECTOR + rng.choice([0, 0, 100])
            length = min(rng.randrange(1, 3 * case.cluster), size - offset)
            data = crash_pattern(1_000_000 + n, offset, length)
            img.pwritev(offset, [data])
            contents[offset:offset + length] = data
        img.flush()
    finally:
        img.close()
    check = qemu_img("check", "-f", "qcow2", live, ok=(0, 1, 2, 3))
    assert check.returncode in (0, 3), f"qemu-img check after pyemu reopened and wrote:\n{check.stdout}{check.stderr}"
    final = read_with_qemu(live, tmp_path)
    assert final == contents, "data written after reopening the killed image did not read back through QEMU"


# -- the harness on its own: a raw file and a writer using os.pwrite ----------------------------------------


def test_journal_parsing() -> None:
    assert parse_journal("") == (False, -1)
    assert parse_journal("open\n") == (True, -1)
    assert parse_journal("open\n3\n7\n") == (True, 7)
    assert parse_journal("open\n3\n7\n1") == (True, 7)  # "11" cut short by the kill: not a flush
    assert parse_journal("open\n3\n7\n11\n") == (True, 11)


def test_replay_alternatives() -> None:
    """Sectors touched only before the flush have one value; later ones collect every intermediate value."""
    cluster, size = 512, 64 * KiB
    ops = crash_ops(7, size, cluster)
    first = [next(ops) for _ in range(12)]
    expect = replay(7, bytes(size), cluster, 5, 11)
    disk = bytearray(size)
    for seq, op in enumerate(first[:6]):
        apply_op(disk, seq, op, cluster)
    assert disk == expect.flushed
    touched_later: set[int] = set()
    for op in first[6:12]:
        touched_later.update(range(op[1] // SECTOR, -(-(op[1] + op[2]) // SECTOR)))
    assert set(expect.alternatives) == touched_later
    for seq, op in enumerate(first[6:12], start=6):
        apply_op(disk, seq, op, cluster)
    for sector in touched_later:
        assert bytes(disk[sector * SECTOR:(sector + 1) * SECTOR]) in expect.alternatives[sector]


def test_discarded_ranges_match_qemu_rule() -> None:
    assert discarded_ranges(1000, 140000, 65536, 1 << 20) == [(65536, 131072)]
    assert discarded_ranges(0, 65535, 65536, 1 << 20) == []
    assert discarded_ranges(1048576, 512, 65536, 1049088) == [(1048576, 1049088)]  # partial last cluster
    assert discarded_ranges(1000000, 49088, 65536, 1049088) == [(1048576, 1049088)]


@pytest.mark.parametrize("kill", [Kill("spawn", delay=0.05), Kill("open"), Kill("flushes", delay=0.02, flushes=10),
                                  Kill("grow", flushes=5)], ids=["spawn", "open", "flushes", "grow"])
def test_harness_on_raw_file(kill: Kill, tmp_path: Path) -> None:
    """The whole kill-and-audit loop with an os.pwrite writer: it must pass, and it must notice a damaged
    sector. (For "grow" the raw file is sparse-extended by writes past its end, so it starts small.)"""
    size, cluster = 4 * MiB, 4 * KiB
    image = tmp_path / "disk.raw"
    initial = backing_content(size, 5)
    image.write_bytes(initial)
    if kill.how == "grow":
        # A raw writer never grows a preallocated file; let the parent watch a file that does change size.
        kill = Kill("flushes", delay=0.01, flushes=kill.flushes)
    outcome = run_and_kill(tmp_path, "raw", image, seed=42, cluster=cluster, every=3, kill=kill)
    if kill.how != "spawn":
        assert outcome.opened
    last = outcome.last_started if outcome.last_started is not None else -1
    expect = replay(42, initial, cluster, outcome.flushed_seq, max(last, outcome.flushed_seq))
    actual = image.read_bytes()
    audit(actual, expect, source="raw file")
    if kill.how == "flushes":
        assert outcome.flushed_seq >= 3 * kill.flushes - 1

    # The audit is not vacuous: a flushed sector no later op touched, changed, must be reported ...
    untouched = next(s for s in range(size // SECTOR) if s not in expect.alternatives)
    damaged = bytearray(actual)
    damaged[untouched * SECTOR] ^= 0xFF
    with pytest.raises(AssertionError, match=f"sector {untouched} "):
        audit(bytes(damaged), expect, source="damaged raw file")
    # ... and so must a flushed write that went missing (the sector reverted to its initial value).
    if outcome.flushed_seq >= 0:
        lost = next((s for s in range(size // SECTOR) if s not in expect.alternatives
                     and expect.flushed[s * SECTOR:(s + 1) * SECTOR] != initial[s * SECTOR:(s + 1) * SECTOR]), None)
        assert lost is not None
        reverted = bytearray(actual)
        reverted[lost * SECTOR:(lost + 1) * SECTOR] = initial[lost * SECTOR:(lost + 1) * SECTOR]
        with pytest.raises(AssertionError, match=f"sector {lost} "):
            audit(bytes(reverted), expect, source="reverted raw file")
