"""Finding the guest's kernel modules (virtio, vsock, the ACPI power button) in an unpacked kernel
package, with their dependencies, in load order.

Debian builds the virtio drivers as modules, and busybox's ``insmod`` neither resolves dependencies nor
decompresses, so we do both here: dependencies come from each module's own ``.modinfo`` section
(``depends=a,b``, written by modpost, so no depmod output is needed), and ``.ko.xz``/``.ko.gz`` files
(newer Debian kernels compress modules) are stored decompressed.
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from pyemu.guest.errors import PackageContentError

# The drivers a pyemu guest uses, in the order /init loads them (dependencies are added in front).
# vsock: the AF_VSOCK core, the virtio transport's common half and its virtio driver (vhost-vsock-device);
# Debian 6.1 builds all three as modules (net/vmw_vsock/).
# The ACPI power button: ``button`` binds the DSDT's PNP0C0C device and turns the GED's Notify into a
# KEY_POWER input event; ``evdev`` gives it a /dev/input/event node for acpid (both =m in Debian 6.1).
# evdev goes first so the button's input device gets its node as it registers.
# pvpanic_mmio (with the pvpanic core it depends on) binds ACPI QEMU0001 (``-device pvpanic``) and reports
# a kernel panic to the host (QMP GUEST_PANICKED).
# Changing this tuple makes ``pyemu-guest fetch`` rebuild an existing cache (the manifest records it; see
# guest/fetch.py).
WANTED_MODULES = (
    "virtio_ring", "virtio", "virtio_mmio",
    "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
    "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
    "evdev", "button",
    "pvpanic_mmio",
)
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


@dataclass(frozen=True)
class KernelModule:
    name: str  # module name, underscores ("virtio_rng" for virtio-rng.ko)
    source: Path  # the file in the package (maybe compressed)
    data: bytes  # the uncompressed ELF object
    depends: tuple[str, ...]


def module_name(path: Path) -> str:
    """The module name a file provides: its base name without suffix, '-' read as '_' (as kmod does)."""
    name = path.name
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def decompress_module(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        if path.name.endswith(".ko.xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".ko.gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise PackageContentError(f"kernel module {path} cannot be decompressed: {exc}") from exc
    if path.name.endswith(".ko.zst"):
        tool = shutil.which("zstd")
        if tool is None:
            raise PackageContentError(f"kernel module {path} is zstd-compressed and 'zstd' is not installed")
        completed = subprocess.run([tool, "-dcq", str(path)], capture_output=True, timeout=60)
        if completed.returncode != 0:
            raise PackageContentError(f"zstd could not decompress {path}")
        return completed.stdout
    return raw


def modinfo(data: bytes, *, source: Path) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (first value of each key)."""
    try:
        section = ELFFile(io.BytesIO(data)).get_section_by_name(".modinfo")
    except ELFError as exc:
        raise PackageContentError(f"kernel module {source} is not an ELF object: {exc}") from exc
    if section is None:
        raise PackageContentError(f"kernel module {source} has no .modinfo section")
    info: dict[str, str] = {}
    for item in section.data().split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def index_modules(modules_root: Path) -> dict[str, Path]:
    """Every module file under ``lib/modules/<release>/`` by module name."""
    index: dict[str, Path] = {}
    for path in sorted(modules_root.rglob("*.ko*")):
        if path.is_file() and any(path.name.endswith(s) for s in MODULE_SUFFIXES):
            index.setdefault(module_name(path), path)
    return index


def builtin_modules(modules_root: Path) -> set[str]:
    """Names of drivers built into the kernel (``modules.builtin``), which need no insmod."""
    try:
        lines = (modules_root / "modules.builtin").read_text(encoding="utf-8").split()
    except OSError:
        return set()
    return {module_name(Path(line)) for line in lines}


def collect_modules(
    modules_root: Path, wanted: tuple[str, ...] = WANTED_MODULES
) -> tuple[list[KernelModule], list[str]]:
    """The wanted modules plus their dependencies, dependencies first; and the wanted names not found.

    A driver built into the kernel is neither loaded nor reported missing.
    """
    index = index_modules(modules_root)
    builtin = builtin_modules(modules_root)
    loaded: dict[str, KernelModule] = {}
    order: list[str] = []
    missing: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name in chain:
            raise PackageContentError(f"kernel modules depend on each other in a cycle: {' -> '.join(chain + (name,))}")
        path = index.get(name)
        if path is None:
            if not chain:
                missing.append(name)
                return
            raise PackageContentError(f"kernel module {chain[-1]} depends on {name}, which the package lacks")
        data = decompress_module(path)
        depends = tuple(d for d in modinfo(data, source=path).get("depends", "").split(",") if d)
        for dependency in depends:
            visit(dependency.replace("-", "_"), chain + (name,))
        loaded[name] = KernelModule(name, path, data, depends)
        order.append(name)

    for name in wanted:
        visit(name, ())
    return [loaded[name] for name in order], missing


def find_modules_root(package_root: Path) -> tuple[Path, str]:
    """``lib/modules/<release>`` inside an unpacked kernel package, and the release string."""
    for base in (package_root / "lib" / "modules", package_root / "usr" / "lib" / "modules"):
        if base.is_dir():
            releases = sorted(p for p in base.iterdir() if p.is_dir())
            if releases:
                return releases[-1], releases[-1].name
    raise PackageContentError(f"no lib/modules/<release> directory in the kernel package unpacked at {package_root}")
