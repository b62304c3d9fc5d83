"""A corpus of qcow2 images made by QEMU's own tools, each paired with a reference model of its contents.

pyemu's qcow2 driver must read what QEMU writes, bit for bit, so the test images are not hand-assembled: they
come from ``qemu-img`` / ``qemu-io`` (7.2 in CI). Every write issued to qemu-io is mirrored into a
:class:`Model` -- an ordered list of writes over an optional backing model -- so the expected guest-visible
bytes of any range are known without reading the image. The model is itself checked against QEMU
(:meth:`QemuImage.verify_with_qemu`: ``qemu-img convert -O raw``, or ``qemu-io read -P`` for images too big to
convert), which is what the fixture self-tests run; a wrong model therefore fails there, not as a confusing
pyemu failure.

Builders are plain functions ``build_<case>(directory) -> QemuImage`` registered in :data:`CASES`; the
:class:`Corpus` builds each one lazily, once per session. Images are shared between tests and must be treated
as read-only: a test that modifies one works on :meth:`QemuImage.copy_to`.

Offsets used below are deliberately awkward (unaligned starts, writes straddling cluster and L2 boundaries,
the last byte of the disk) because those are where mapping code goes wrong.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
TOOL_TIMEOUT_S = 120


def qemu_tools_missing() -> str | None:
    """Why the corpus cannot be built here (None when qemu-img and qemu-io are both installed)."""
    missing = [name for name, path in (("qemu-img", QEMU_IMG), ("qemu-io", QEMU_IO)) if path is None]
    return f"{' and '.join(missing)} not installed" if missing else None


class QemuToolError(AssertionError):
    """A qemu-img/qemu-io invocation failed while building or checking the corpus (a broken fixture, not a
    pyemu bug)."""


def run_tool(args: Sequence[str | Path], *, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a QEMU tool, capture its output, and raise :class:`QemuToolError` with that output on failure."""
    argv = [str(arg) for arg in args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=cwd)
    if check and proc.returncode != 0:
        raise QemuToolError(f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                            f"stderr:\n{proc.stderr}")
    return proc


def qemu_img(*args: str | Path, check: bool = True, cwd: Path | None = None,
             ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; with ``check`` an exit status outside ``ok`` raises QemuToolError with the output."""
    assert QEMU_IMG is not None, "qemu-img missing"
    proc = run_tool([QEMU_IMG, *args], check=False, cwd=cwd)
    if check and proc.returncode not in ok:
        raise QemuToolError(f"qemu-img {' '.join(str(a) for a in args)} exited {proc.returncode}\n"
                            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def qemu_io(path: Path, commands: Sequence[str], *, fmt: str = "qcow2", read_only: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``commands`` (each one ``-c`` argument) on ``path`` in one qemu-io process."""
    assert QEMU_IO is not None, "qemu-io missing"
    argv: list[str | Path] = [QEMU_IO, "-f", fmt]
    if read_only:
        argv.append("-r")
    for command in commands:
        argv += ["-c", command]
    argv.append(path)
    proc = run_tool(argv, check=check)
    # qemu-io reports a failed command on stdout and may still exit 0.
    if check and ("failed" in proc.stdout or "error" in proc.stdout.lower()):
        raise QemuToolError(f"qemu-io {commands} on {path} reported an error:\n{proc.stdout}{proc.stderr}")
    return proc


def qemu_info(path: Path) -> dict:
    """``qemu-img info --output=json`` (with -U, so it also works while another process holds the image)."""
    return json.loads(qemu_img("info", "-U", "--output=json", path).stdout)


def qemu_map(path: Path) -> list[dict]:
    """``qemu-img map --output=json``: the extents of the whole chain, with ``depth`` 0 for this layer."""
    return json.loads(qemu_img("map", "-U", "--output=json", path).stdout)


def layer_allocated_bytes(map_entries: Iterable[dict], start: int = 0, end: int | None = None) -> int:
    """Bytes the top layer defines itself (data or zero clusters), clipped to ``[start, end)``.

    QEMU marks those ``depth == 0`` and ``present == true``. ``depth == 0`` alone is not enough: in an image
    without a backing file the unallocated ranges are reported at depth 0 as well (``present: false``)."""
    total = 0
    for entry in map_entries:
        if entry["depth"] != 0 or not entry.get("present", entry["data"] or entry["zero"]):
            continue
        lo = max(start, entry["start"])
        hi = entry["start"] + entry["length"] if end is None else min(end, entry["start"] + entry["length"])
        total += max(0, hi - lo)
    return total


# --------------------------------------------------------------------------------------------------------------
# Reference model


Fill = int | bytes


@dataclass
class Model:
    """The guest-visible contents of one image layer: ``ops`` applied in order over ``backing`` (read as zeros
    past the backing's end, as QEMU does when an overlay is bigger than its backing file)."""

    size: int
    backing: "Model | None" = None
    ops: list[tuple[int, int, Fill]] = field(default_factory=list)

    def write(self, offset: int, length: int, fill: Fill) -> None:
        """Record a write of ``length`` bytes: a single repeated byte (int) or literal bytes."""
        if isinstance(fill, (bytes, bytearray)):
            assert len(fill) == length
            fill = bytes(fill)
        assert 0 <= offset and offset + length <= self.size, (offset, length, self.size)
        self.ops.append((offset, length, fill))

    def read(self, offset: int, length: int) -> bytes:
        """The expected bytes of ``[offset, offset + length)``."""
        assert 0 <= offset and offset + length <= self.size, (offset, length, self.size)
        buf = bytearray(length)
        if self.backing is not None:
            from_backing = max(0, min(length, self.backing.size - offset))
            if from_backing:
                buf[:from_backing] = self.backing.read(offset, from_backing)
        end = offset + length
        for op_off, op_len, fill in self.ops:
            lo, hi = max(offset, op_off), min(end, op_off + op_len)
            if lo >= hi:
                continue
            if isinstance(fill, int):
                buf[lo - offset:hi - offset] = bytes([fill]) * (hi - lo)
            else:
                buf[lo - offset:hi - offset] = fill[lo - op_off:hi - op_off]
        return bytes(buf)

    def contents(self) -> bytes:
        return self.read(0, self.size)

    def frozen(self) -> "Model":
        """A copy that later writes do not change (the model of an internal snapshot)."""
        return Model(self.size, self.backing, list(self.ops))

    def extents(self) -> list[tuple[int, int]]:
        """Ranges any layer of the chain wrote (for choosing what to read on images too big to read whole)."""
        ranges = [(o, min(l, self.size - o)) for o, l, _ in self.ops]
        if self.backing is not None:
            ranges += [(o, min(l, self.size - o)) for o, l in self.backing.extents() if o < self.size]
        return ranges


class Writer:
    """Pairs qemu-io commands with model updates, so a builder states each write once.

    Commands are batched and run by :meth:`commit` in a single qemu-io process (one open/close of the image,
    which keeps building the corpus fast)."""

    def __init__(self, path: Path, model: Model, *, fmt: str = "qcow2") -> None:
        self.path = path
        self.model = model
        self.fmt = fmt
        self.commands: list[str] = []

    def write(self, offset: int, length: int, pattern: int, *, compressed: bool = False) -> "Writer":
        flag = "-c " if compressed else ""
        self.commands.append(f"write {flag}-P 0x{pattern:02x} {offset} {length}")
        self.model.write(offset, length, pattern)
        return self

    def zero(self, offset: int, length: int, *, unmap: bool = False) -> "Writer":
        self.commands.append(f"write -z {'-u ' if unmap else ''}{offset} {length}")
        self.model.write(offset, length, 0)
        return self

    def discard(self, offset: int, length: int) -> "Writer":
        """Discard a cluster-aligned range. Only used where QEMU's result is "reads as zeros": qcow2 v3 (the
        clusters become zero clusters) and v2 without a backing file (they are deallocated)."""
        self.commands.append(f"discard {offset} {length}")
        self.model.write(offset, length, 0)
        return self

    def commit(self) -> None:
        if self.commands:
            qemu_io(self.path, self.commands, fmt=self.fmt)
        self.commands = []


# --------------------------------------------------------------------------------------------------------------
# The image record


@dataclass
class QemuImage:
    """One corpus image. ``model`` is the active layer; ``snapshots`` maps internal snapshot names to their
    models; ``chain`` lists the backing files, nearest first (each also a QemuImage, or a raw file's path);
    ``windows`` is None when the image is small enough to read whole, else the ranges to read."""

    name: str
    description: str
    path: Path
    model: Model
    options: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, Model] = field(default_factory=dict)
    chain: list[Path] = field(default_factory=list)
    windows: list[tuple[int, int]] | None = None
    dirty: bool = False

    @property
    def size(self) -> int:
        return self.model.size

    @property
    def huge(self) -> bool:
        return self.windows is not None

    def read_ranges(self) -> list[tuple[int, int]]:
        """What a test should read and compare: everything, or the chosen windows of a huge image."""
        return [(0, self.size)] if self.windows is None else list(self.windows)

    def expected(self, offset: int, length: int) -> bytes:
        return self.model.read(offset, length)

    def copy_to(self, directory: Path) -> Path:
        """Copy the image file (not its backing files: backing paths in the corpus are absolute, except in the
        relative-backing case, which is never modified) and return the copy's path."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / self.path.name
        shutil.copyfile(self.path, target)
        return target

    def verify_with_qemu(self, scratch: Path) -> None:
        """Check the model against QEMU's own reading of the image (the fixture self-test)."""
        if self.windows is None:
            assert_raw_equal(self.path, self.model, scratch / f"{self.name}.raw")
            for name, snap in self.snapshots.items():
                assert_raw_equal(self.path, snap, scratch / f"{self.name}.{name}.raw", snapshot=name)
        else:
            verify_windows_with_qemu_io(self.path, self.model, self.windows)


def assert_raw_equal(path: Path, model: Model, raw: Path, *, snapshot: str | None = None) -> None:
    """``qemu-img convert -O raw`` the image (or one of its internal snapshots) and compare with the model."""
    args: list[str | Path] = ["convert", "-U", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, path, raw)
    data = raw.read_bytes()
    raw.unlink()
    expected = model.contents()
    if data != expected:
        first = next(i for i in range(min(len(data), len(expected))) if data[i] != expected[i]) \
            if len(data) == len(expected) else min(len(data), len(expected))
        raise AssertionError(f"model of {path}{' snapshot ' + snapshot if snapshot else ''} differs from qemu-img "
                             f"convert output at byte {first} (qemu {data[first:first + 8].hex()} vs model "
                             f"{expected[first:first + 8].hex()}; sizes {len(data)} vs {len(expected)})")


def uniform_runs(data: bytes, base: int) -> list[tuple[int, int, int]]:
    """Split ``data`` (which starts at guest offset ``base``) into runs of one repeated byte."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(data) + 1):
        if i == len(data) or data[i] != data[start]:
            runs.append((base + start, i - start, data[start]))
            start = i
    return runs


def verify_windows_with_qemu_io(path: Path, model: Model, windows: Sequence[tuple[int, int]]) -> None:
    """Check ``windows`` of a (huge) image with ``qemu-io read -P``, one command per run of equal bytes."""
    commands = []
    for offset, length in windows:
        for run_off, run_len, byte in uniform_runs(model.read(offset, length), offset):
            commands.append(f"read -P 0x{byte:02x} {run_off} {run_len}")
    assert len(commands) < 500, "windows of a huge image must hold pattern data, not random bytes"
    proc = qemu_io(path, commands, read_only=True, check=False)
    if proc.returncode != 0 or "verification failed" in proc.stdout or "failed" in proc.stdout:
        raise AssertionError(f"qemu-io disagrees with the model of {path}:\n{proc.stdout}{proc.stderr}")


# --------------------------------------------------------------------------------------------------------------
# Builders


def create(path: Path, size: int | None, *, backing: Path | str | None = None, backing_fmt: str = "qcow2",
           **options: str | int | bool) -> dict[str, str]:
    """``qemu-img create -f qcow2`` with ``-o key=value`` options (booleans as on/off); returns the options."""
    opts = {key: ("on" if value is True else "off" if value is False else str(value)) for key, value in options.items()}
    args: list[str | Path] = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(f"{key}={value}" for key, value in opts.items())]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt]
    args.append(path)
    if size is not None:
        args.append(str(size))
    qemu_img(*args, cwd=path.parent)
    return opts


PATTERNS = [0x11, 0x22, 0x33, 0x44, 0x5a, 0x66, 0x77, 0x88, 0x99, 0xa5, 0xbb, 0xcc, 0xdd, 0xee, 0xf0, 0x0f,
            0x3c, 0xc3, 0x69, 0x96]


def scattered_writes(writer: Writer, cluster: int, size: int, *, first_pattern: int = 0) -> None:
    """Writes at awkward places: unaligned, straddling clusters and L2 tables, overlapping, the disk's tail."""
    l2_span = cluster * (cluster // 8)  # guest bytes one L2 table maps (standard entries)
    candidates = [
        (0, 1),                                    # first byte
        (cluster // 2 + 3, cluster),               # unaligned, straddles clusters 0/1
        (3 * cluster, 2 * cluster),                # aligned, two whole clusters
        (3 * cluster + 100, 200),                  # overwrite inside them
        (7 * cluster - 17, 34),                    # tiny straddle
        (l2_span - cluster // 2, cluster),         # straddles the first L2 table boundary
        (size // 2 + 4095, 3 * cluster + 1),       # mid-disk, unaligned start and end
        (size - cluster - 5, cluster + 5),         # ends at the last byte
        (size // 3, 4096),                         # maybe sharing a cluster with nothing
    ]
    seen = 0
    for offset, length in candidates:
        if offset < 0 or offset + length > size or length <= 0:
            continue
        writer.write(offset, length, PATTERNS[(first_pattern + seen) % len(PATTERNS)])
        seen += 1


def _case_dir(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def build_plain(root: Path, name: str, *, compat: str, cluster: int, size: int) -> QemuImage:
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    opts = create(path, size, compat=compat, cluster_size=cluster)
    model = Model(size)
    writer = Writer(path, model)
    scattered_writes(writer, cluster, size)
    writer.commit()
    return QemuImage(name, f"compat={compat} cluster_size={cluster} size={size}, scattered pattern writes", path,
                     model, opts)


def build_zeros_v3(root: Path, name: str = "zeros_v3") -> QemuImage:
    """Zero clusters (write -z keeps the allocation, -z -u drops it), zero over partial clusters, and discards
    over data (v3 turns those into zero clusters)."""
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    cluster, size = 4 * KiB, 2 * MiB
    opts = create(path, size, compat="1.1", cluster_size=cluster)
    model = Model(size)
    writer = Writer(path, model)
    writer.write(0, 64 * KiB, 0x5a)
    writer.zero(8 * KiB, 8 * KiB)                  # zero cluster, allocation kept
    writer.zero(20 * KiB, 4 * KiB, unmap=True)     # zero cluster, allocation released
    writer.zero(30 * KiB + 100, 1000)              # inside one cluster: written as zeros
    writer.zero(40 * KiB - 512, 4 * KiB + 1024)    # partial head/tail, whole middle
    writer.zero(1 * MiB, 16 * KiB)                 # zero clusters where nothing was allocated
    writer.discard(48 * KiB, 8 * KiB)              # discard over data
    writer.write(512 * KiB, 64 * KiB, 0x77)
    writer.discard(512 * KiB, 128 * KiB)           # over data and unallocated clusters
    writer.write(520 * KiB, 2 * KiB, 0x78)         # write into a zero cluster again
    writer.commit()
    return QemuImage(name, "v3 zero clusters (write -z, -z -u), discards over data", path, model, opts)


def build_zeros_v2(root: Path, name: str = "zeros_v2") -> QemuImage:
    """v2 has no zero flag: write -z stores zeros or deallocates; discard deallocates (no backing file)."""
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    cluster, size = 512, 1 * MiB
    opts = create(path, size, compat="0.10", cluster_size=cluster)
    model = Model(size)
    writer = Writer(path, model)
    writer.write(0, 32 * KiB, 0x3c)
    writer.zero(1024, 2048)
    writer.zero(5000, 300, unmap=True)
    writer.discard(8 * KiB, 4 * KiB)
    writer.zero(100 * KiB, 4 * KiB)
    writer.commit()
    return QemuImage(name, "v2 write -z / discard (no zero flag: deallocated or zeros written)", path, model, opts)


def patterned_raw(size: int, seed: int) -> bytes:
    """Mixed content for compression: text-like compressible sectors (each naming its own offset, so a
    misplaced cluster is caught), random incompressible runs, and all-zero runs (which convert skips)."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.choice(("text", "text", "random", "zero", "bytes"))
        chunk_len = rng.choice((512, 4096, 3000, 65536, 10000))
        if kind == "text":
            chunk = bytearray()
            while len(chunk) < chunk_len:
                chunk += f"sector@{len(out) + len(chunk):#x} pyemu qcow2 interop ".encode()
            chunk = chunk[:chunk_len]
        elif kind == "random":
            chunk = bytearray(rng.randbytes(chunk_len))
        elif kind == "zero":
            chunk = bytearray(chunk_len)
        else:
            chunk = bytearray(bytes([rng.randrange(1, 256)]) * chunk_len)
        out += chunk
    return bytes(out[:size])


def build_compressed_convert(root: Path, name: str, *, compat: str, cluster: int) -> QemuImage:
    """``qemu-img convert -c`` from a raw file: compressed clusters, plus clusters stored uncompressed because
    they did not shrink, plus holes for zero runs."""
    directory = _case_dir(root, name)
    size = 3 * MiB + 12 * KiB
    data = patterned_raw(size, seed=cluster)
    raw = directory / "source.raw"
    raw.write_bytes(data)
    path = directory / f"{name}.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compat={compat},cluster_size={cluster}", raw, path)
    raw.unlink()
    model = Model(size)
    model.write(0, size, data)
    return QemuImage(name, f"qemu-img convert -c (compat={compat}, cluster_size={cluster})", path, model,
                     {"compat": compat, "cluster_size": str(cluster)})


def build_compressed_io(root: Path, name: str, *, cluster: int, compat: str = "1.1") -> QemuImage:
    """qemu-io ``write -c`` (whole clusters), then partial overwrites of compressed clusters (decompress+COW)
    and a zero write over one."""
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    size = 16 * cluster if cluster >= MiB else 4 * MiB
    opts = create(path, size, compat=compat, cluster_size=cluster)
    model = Model(size)
    writer = Writer(path, model)
    writer.write(0, cluster, 0x11, compressed=True)
    writer.write(2 * cluster, 3 * cluster, 0x22, compressed=True)
    writer.write(size - cluster, cluster, 0x33, compressed=True)
    writer.write(2 * cluster + 77, 100, 0x44)      # overwrite inside a compressed cluster
    if compat != "0.10":
        writer.zero(3 * cluster, cluster)          # compressed cluster -> zero cluster
    writer.write(5 * cluster - 10, 20, 0x55)       # straddles a compressed cluster's end
    writer.commit()
    return QemuImage(name, f"qemu-io write -c, cluster_size={cluster}, compat={compat}", path, model, opts)


def build_extended_l2(root: Path, name: str = "extl2", *, cluster: int = 64 * KiB) -> QemuImage:
    """extended_l2=on: subcluster allocation from partial writes, zero subclusters, discards."""
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    size = 4 * MiB
    sub = cluster // 32
    opts = create(path, size, compat="1.1", cluster_size=cluster, extended_l2=True)
    model = Model(size)
    writer = Writer(path, model)
    writer.write(3 * sub + 5, 100, 0x11)            # one subcluster of cluster 0
    writer.write(10 * sub, 4 * sub, 0x22)           # aligned subclusters
    writer.zero(12 * sub, sub)                      # zero subcluster among data
    writer.zero(20 * sub, 2 * sub, unmap=True)      # zero subclusters, unallocated before
    writer.write(cluster - sub // 2, sub, 0x33)     # straddles clusters 0/1
    writer.write(2 * cluster, cluster, 0x44)        # whole cluster
    writer.zero(2 * cluster + 5 * sub, 3 * sub)
    writer.write(4 * cluster, cluster, 0x45)
    writer.discard(4 * cluster, cluster)            # whole-cluster discard (partial ones are no-ops in QEMU)
    writer.zero(3 * cluster, cluster)               # whole zero cluster
    writer.write(size - 700, 700, 0x55)
    writer.commit()
    return QemuImage(name, f"extended_l2=on cluster_size={cluster}: subclusters, zero subclusters", path, model, opts)


def build_base(path: Path, size: int, *, cluster: int = 64 * KiB, compat: str = "1.1", seed_pattern: int = 0,
               fill: bool = False) -> tuple[Model, dict[str, str]]:
    """A qcow2 base image with scattered writes (and optionally every byte written, so anything read from it
    through an overlay is visibly non-zero)."""
    opts = create(path, size, compat=compat, cluster_size=cluster)
    model = Model(size)
    writer = Writer(path, model)
    if fill:
        writer.write(0, size, 0xb0 + seed_pattern % 16)
    scattered_writes(writer, cluster, size, first_pattern=seed_pattern)
    writer.commit()
    return model, opts


def build_chain1(root: Path, name: str = "chain1", *, compat: str = "1.1") -> QemuImage:
    directory = _case_dir(root, name)
    base = directory / "base.qcow2"
    top = directory / "top.qcow2"
    size = 2 * MiB
    base_model, _ = build_base(base, size, cluster=4 * KiB, compat=compat, fill=True)
    opts = create(top, None, backing=base, compat=compat, cluster_size=4 * KiB)
    model = Model(size, backing=base_model)
    writer = Writer(top, model)
    writer.write(100, 50, 0x01)                     # COW of a partial cluster from the backing file
    writer.write(64 * KiB, 64 * KiB, 0x02)
    if compat != "0.10":
        writer.zero(300 * KiB, 12 * KiB)            # zero clusters mask the backing file
        writer.discard(64 * KiB, 8 * KiB)           # v3 with backing: discard leaves zero clusters
    writer.write(size - 1, 1, 0x03)
    writer.commit()
    return QemuImage(name, f"overlay over one qcow2 backing file (compat={compat})", top, model, opts, chain=[base])


def build_chain3(root: Path, name: str = "chain3") -> QemuImage:
    directory = _case_dir(root, name)
    size = 1 * MiB
    paths = [directory / f"layer{i}.qcow2" for i in range(4)]
    base_model, _ = build_base(paths[0], size, cluster=4 * KiB, fill=True)
    model = base_model
    opts: dict[str, str] = {}
    for depth in range(1, 4):
        opts = create(paths[depth], None, backing=paths[depth - 1], compat="1.1",
                      cluster_size=[512, 64 * KiB, 4 * KiB][depth - 1])
        model = Model(size, backing=model)
        writer = Writer(paths[depth], model)
        writer.write(depth * 100 * KiB + 7, 10 * KiB, 0x10 * depth + 1)
        writer.write(size // 2 + depth * 512, 512, 0x10 * depth + 2)
        writer.zero(depth * 200 * KiB, 4 * KiB)
        # Layer 1 (512-byte clusters) turns part of its zero range back into data; the others keep theirs.
        writer.write(depth * 200 * KiB + (1024 if depth == 1 else 5000), 16, 0x10 * depth + 3)
        writer.commit()
    return QemuImage(name, "backing chain of depth 3 (mixed cluster sizes), zero clusters in the middle",
                     paths[3], model, opts, chain=list(reversed(paths[:3])))


def build_raw_backing(root: Path, name: str = "raw_backing") -> QemuImage:
    directory = _case_dir(root, name)
    size = 1 * MiB + 512
    data = patterned_raw(size, seed=7)
    base = directory / "base.raw"
    base.write_bytes(data)
    base_model = Model(size)
    base_model.write(0, size, data)
    top = directory / "top.qcow2"
    opts = create(top, None, backing=base, backing_fmt="raw", compat="1.1", cluster_size=4 * KiB)
    model = Model(size, backing=base_model)
    writer = Writer(top, model)
    writer.write(1000, 5000, 0x61)
    writer.zero(256 * KiB, 8 * KiB)
    writer.write(size - 300, 300, 0x62)
    writer.commit()
    return QemuImage(name, "overlay over a raw backing file whose size is not cluster aligned", top, model, opts,
                     chain=[base])


def build_overlay_bigger(root: Path, name: str = "overlay_bigger") -> QemuImage:
    directory = _case_dir(root, name)
    base = directory / "base.qcow2"
    base_model, _ = build_base(base, 1 * MiB + 4 * KiB, cluster=4 * KiB, fill=True)
    top = directory / "top.qcow2"
    size = 4 * MiB
    opts = create(top, size, backing=base, compat="1.1", cluster_size=64 * KiB)
    model = Model(size, backing=base_model)
    writer = Writer(top, model)
    writer.write(1 * MiB - 100, 200, 0x71)          # straddles the backing file's end
    writer.write(3 * MiB, 4 * KiB, 0x72)
    writer.commit()
    return QemuImage(name, "overlay 4 MiB over a 1 MiB+4 KiB backing file: reads past the backing end are zero",
                     top, model, opts, chain=[base])


def build_overlay_smaller(root: Path, name: str = "overlay_smaller") -> QemuImage:
    directory = _case_dir(root, name)
    base = directory / "base.qcow2"
    base_model, _ = build_base(base, 2 * MiB, cluster=4 * KiB, fill=True)
    top = directory / "top.qcow2"
    size = 1 * MiB - 512
    opts = create(top, size, backing=base, compat="1.1", cluster_size=4 * KiB)
    model = Model(size, backing=base_model)
    writer = Writer(top, model)
    writer.write(size - 1000, 1000, 0x73)
    writer.commit()
    return QemuImage(name, "overlay smaller than its backing file", top, model, opts, chain=[base])


def build_relative_backing(root: Path, name: str = "relative_backing") -> QemuImage:
    """The overlay names its backing file as ``../base/base.qcow2``: resolved against the overlay's
    directory, not the process's working directory."""
    directory = _case_dir(root, name)
    (directory / "base").mkdir(exist_ok=True)
    (directory / "top").mkdir(exist_ok=True)
    base = directory / "base" / "base.qcow2"
    base_model, _ = build_base(base, 1 * MiB, cluster=4 * KiB, fill=True)
    top = directory / "top" / "top.qcow2"
    opts = create(top, None, backing="../base/base.qcow2", compat="1.1", cluster_size=4 * KiB)
    model = Model(1 * MiB, backing=base_model)
    writer = Writer(top, model)
    writer.write(12345, 678, 0x7e)
    writer.commit()
    return QemuImage(name, "relative backing path ../base/base.qcow2", top, model, opts, chain=[base])


def build_snapshots(root: Path, name: str, *, compat: str) -> QemuImage:
    """Internal snapshots: s1 and s2 taken between rounds of writes; the active layer keeps changing."""
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    size, cluster = 1 * MiB, 4 * KiB
    opts = create(path, size, compat=compat, cluster_size=cluster)
    model = Model(size)
    snapshots: dict[str, Model] = {}
    writer = Writer(path, model)
    writer.write(0, 64 * KiB, 0x11)
    writer.write(500 * KiB + 3, 5000, 0x12)
    writer.commit()
    qemu_img("snapshot", "-c", "s1", path)
    snapshots["s1"] = model.frozen()
    writer.write(4 * KiB, 8 * KiB, 0x21)            # COW of clusters shared with s1
    writer.zero(32 * KiB, 4 * KiB)
    writer.write(900 * KiB, 10 * KiB, 0x22)
    writer.commit()
    qemu_img("snapshot", "-c", "s2", path)
    snapshots["s2"] = model.frozen()
    writer.write(0, 4 * KiB, 0x31)
    writer.discard(48 * KiB, 8 * KiB)
    writer.write(size - 10, 10, 0x32)
    writer.commit()
    if compat == "1.1":
        # A snapshot whose name looks like an id: lookups by name and by id must not be confused.
        qemu_img("snapshot", "-c", "7", path)
        snapshots["7"] = model.frozen()
        writer.write(600 * KiB, 4 * KiB, 0x41)
        writer.commit()
    return QemuImage(name, f"internal snapshots (compat={compat}) with writes after each", path, model, opts,
                     snapshots=snapshots)


def build_lazy_dirty(root: Path, name: str = "lazy_dirty") -> QemuImage:
    """lazy_refcounts=on, qemu-io killed by SIGKILL right after writing: the dirty bit stays set and the
    refcounts are stale (``qemu-img check`` reports errors); the data must still read back."""
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    size = 2 * MiB
    opts = create(path, size, compat="1.1", cluster_size=64 * KiB, lazy_refcounts=True)
    model = Model(size)
    model.write(0, 64 * KiB, 0x5a)
    model.write(1 * MiB + 17, 3000, 0xa5)
    assert QEMU_IO is not None
    proc = run_tool([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", f"write -P 0xa5 {1 * MiB + 17} 3000",
                     "-c", "sigraise 9", path], check=False)
    assert proc.returncode != 0, "qemu-io was expected to die from SIGKILL"
    dirty = bool(qemu_info(path).get("dirty-flag"))
    return QemuImage(name, "lazy_refcounts=on left dirty by a killed qemu-io", path, model, opts, dirty=dirty)


def build_refcount_bits(root: Path, name: str, *, bits: int) -> QemuImage:
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    size, cluster = 2 * MiB, 4 * KiB
    opts = create(path, size, compat="1.1", cluster_size=cluster, refcount_bits=bits)
    model = Model(size)
    writer = Writer(path, model)
    scattered_writes(writer, cluster, size, first_pattern=bits)
    writer.commit()
    if bits > 1:
        # refcount 2 on shared clusters: a snapshot (refcount_bits=1 cannot hold it, so QEMU refuses there).
        qemu_img("snapshot", "-c", "shared", path)
        snap = model.frozen()
        writer.write(0, 8 * KiB, 0x7a)
        writer.commit()
        return QemuImage(name, f"refcount_bits={bits}", path, model, opts, snapshots={"shared": snap})
    return QemuImage(name, f"refcount_bits={bits}", path, model, opts)


HUGE_SIZE = 4 * TiB


def build_huge(root: Path, name: str = "huge_sparse") -> QemuImage:
    """4 TiB virtual with a handful of writes: whatever reads it must not walk the whole disk."""
    directory = _case_dir(root, name)
    path = directory / f"{name}.qcow2"
    size = HUGE_SIZE
    opts = create(path, size, compat="1.1", cluster_size=64 * KiB)
    model = Model(size)
    writer = Writer(path, model)
    writer.write(0, 4096, 0x01)
    writer.write(1 * TiB + 12345, 70000, 0x02)
    writer.zero(1 * TiB + 12345 + 70000, 4096)
    writer.write(2 * TiB - 512, 1024, 0x03)        # straddles an L1 entry boundary
    writer.write(size - 4096, 4096, 0x04)
    writer.commit()
    windows = []
    for offset, length in [(0, 4096), (1 * TiB + 12345, 70000), (2 * TiB - 512, 1024), (size - 4096, 4096)]:
        lo = max(0, offset - 64 * KiB)
        hi = min(size, offset + length + 64 * KiB)
        windows.append((lo, hi - lo))
    windows.append((3 * TiB, 1 * MiB))                # never written
    return QemuImage(name, "4 TiB sparse image with a few writes", path, model, opts, windows=windows)


# --------------------------------------------------------------------------------------------------------------
# Registry


Builder = Callable[[Path], QemuImage]


def _plain_cases() -> dict[str, Builder]:
    cases: dict[str, Builder] = {}
    for compat, tag in (("1.1", "v3"), ("0.10", "v2")):
        for cluster, ctag in ((512, "c512"), (4 * KiB, "c4k"), (64 * KiB, "c64k"), (2 * MiB, "c2m")):
            size = 16 * MiB if cluster == 2 * MiB else 3 * MiB + 512 * 3
            name = f"{tag}_{ctag}"
            cases[name] = (lambda root, name=name, compat=compat, cluster=cluster, size=size:
                           build_plain(root, name, compat=compat, cluster=cluster, size=size))
    return cases


CASES: dict[str, Builder] = {
    **_plain_cases(),
    "zeros_v3": build_zeros_v3,
    "zeros_v2": build_zeros_v2,
    "compressed_convert_v3": lambda root: build_compressed_convert(root, "compressed_convert_v3", compat="1.1",
                                                                   cluster=4 * KiB),
    "compressed_convert_v2": lambda root: build_compressed_convert(root, "compressed_convert_v2", compat="0.10",
                                                                   cluster=64 * KiB),
    "compressed_io_c64k": lambda root: build_compressed_io(root, "compressed_io_c64k", cluster=64 * KiB),
    "compressed_io_c2m": lambda root: build_compressed_io(root, "compressed_io_c2m", cluster=2 * MiB),
    "compressed_io_v2": lambda root: build_compressed_io(root, "compressed_io_v2", cluster=4 * KiB, compat="0.10"),
    "extl2_c64k": lambda root: build_extended_l2(root, "extl2_c64k", cluster=64 * KiB),
    "extl2_c16k": lambda root: build_extended_l2(root, "extl2_c16k", cluster=16 * KiB),
    "chain1_v3": lambda root: build_chain1(root, "chain1_v3", compat="1.1"),
    "chain1_v2": lambda root: build_chain1(root, "chain1_v2", compat="0.10"),
    "chain3": build_chain3,
    "raw_backing": build_raw_backing,
    "overlay_bigger": build_overlay_bigger,
    "overlay_smaller": build_overlay_smaller,
    "relative_backing": build_relative_backing,
    "snapshots_v3": lambda root: build_snapshots(root, "snapshots_v3", compat="1.1"),
    "snapshots_v2": lambda root: build_snapshots(root, "snapshots_v2", compat="0.10"),
    "lazy_dirty": build_lazy_dirty,
    "refcount1": lambda root: build_refcount_bits(root, "refcount1", bits=1),
    "refcount64": lambda root: build_refcount_bits(root, "refcount64", bits=64),
    "huge_sparse": build_huge,
}

# Internal snapshots per case, known before anything is built so tests can be parametrized by them.
SNAPSHOT_NAMES: dict[str, list[str]] = {
    "snapshots_v3": ["s1", "s2", "7"],
    "snapshots_v2": ["s1", "s2"],
    "refcount64": ["shared"],
}
SNAPSHOT_CASES = list(SNAPSHOT_NAMES)


class Corpus:
    """Builds corpus images on first use, once per session, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, QemuImage] = {}

    def get(self, name: str) -> QemuImage:
        if name not in self._built:
            self._built[name] = CASES[name](self.root)
        return self._built[name]


# --------------------------------------------------------------------------------------------------------------
# Plain-file helpers shared by the pyemu-side tests


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
