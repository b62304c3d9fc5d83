"""``-object memory-backend-ram|memory-backend-memfd`` + ``-machine memory-backend=ID``: which host memory
holds guest RAM, in QEMU's spelling (libvirt and many QEMU command lines name RAM this way).

Two kinds (:data:`pyemu.system.memory.RAM_BACKENDS`): ``ram``, private anonymous memory in transparent huge
pages (the default, as QEMU's), and ``memfd``, shared memory another process could map. ``share=on`` on a
``memory-backend-ram`` asks for shared memory too: pyemu gives it a memfd (QEMU's is anonymous shared
memory; both are the kernel's shmem). A memfd is sealed against resizing (``seal=on``, QEMU's default).
What pyemu cannot do is refused with a clear line: ``hugetlb=on`` (hugetlbfs pages need a reserved pool),
``prealloc=on``, NUMA policies, a private (``share=off``) memfd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from pyemu.errors import ConfigError
from pyemu.system.config import ObjectOptions, parse_on_off, parse_size

OPTION = "-object"
MEMORY_BACKEND_TYPES = ("memory-backend-ram", "memory-backend-memfd")
_UNSUPPORTED = {"prealloc": "off", "prealloc-threads": None, "policy": "default", "host-nodes": None,
                "reserve": "on", "hugetlbsize": None}
"""QEMU properties pyemu does not implement, with the value that means what pyemu does anyway (accepted)."""


@dataclass(frozen=True)
class MemoryBackend:
    """A parsed memory backend: its id, size in bytes, and the :class:`~pyemu.system.memory.GuestMemory`
    backend that provides it; ``seal``: a memfd is sealed against growing and shrinking."""

    id: str
    size: int
    kind: str
    seal: bool = False


def _describe(entry: ObjectOptions) -> str:
    """The option as the user wrote it, for the start of an error line (QEMU names the object so too)."""
    text = ",".join([entry.type, f"id={entry.id}", *(f"{k}={v}" for k, v in entry.props)])
    return f"{OPTION} {text}"


def parse_memory_backend(entry: ObjectOptions) -> MemoryBackend:
    """Check one ``-object memory-backend-*`` entry (QEMU's messages for QEMU's mistakes)."""
    where = _describe(entry)
    values = dict(entry.props)
    memfd = entry.type == "memory-backend-memfd"
    known = {"size", "share", "merge", "dump"} | set(_UNSUPPORTED) | ({"hugetlb", "seal"} if memfd else set())
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: Invalid parameter '{key}'", option=OPTION)
    for key, fine in _UNSUPPORTED.items():
        if key in values and values[key] != fine:
            raise ConfigError(f"{where}: {key}={values[key]} is not supported by pyemu", option=OPTION)
    if "size" not in values:
        raise ConfigError(f"{where}: Parameter 'size' is missing", option=OPTION)
    size = parse_size(values["size"], default_suffix="B", option=OPTION)
    if size <= 0:
        raise ConfigError(f"{where}: can't create backend with size 0", option=OPTION)
    for key in ("merge", "dump"):  # KSM merging and core dumps: pyemu's defaults are QEMU's (dump=off: -machine)
        if key in values and not parse_on_off(values[key], key):
            raise ConfigError(f"{where}: {key}=off is not supported by pyemu"
                              + (" (use -machine dump-guest-core=off)" if key == "dump" else ""), option=OPTION)
    share = parse_on_off(values.get("share", "on" if memfd else "off"), "share")
    if memfd:
        if parse_on_off(values.get("hugetlb", "off"), "hugetlb"):
            raise ConfigError(f"{where}: hugetlb=on is not supported by pyemu (hugetlbfs pages need a reserved "
                              "pool; the default memory-backend-ram gets transparent huge pages)", option=OPTION)
        if not share:
            raise ConfigError(f"{where}: share=off is not supported by pyemu (a private memfd: use "
                              "memory-backend-ram)", option=OPTION)
        return MemoryBackend(entry.id, size, "memfd", seal=parse_on_off(values.get("seal", "on"), "seal"))
    return MemoryBackend(entry.id, size, "memfd" if share else "ram")


def parse_memory_backends(objects: Sequence[ObjectOptions]) -> dict[str, MemoryBackend]:
    """Every ``-object memory-backend-*`` entry, checked, by id."""
    return {entry.id: parse_memory_backend(entry) for entry in objects if entry.type in MEMORY_BACKEND_TYPES}


def machine_memory(backend_id: str, backends: Mapping[str, MemoryBackend], ram_size: int | None) -> MemoryBackend:
    """The backend ``-machine memory-backend=ID`` names (of :func:`parse_memory_backends`), checked against
    ``-m`` (None: not given, the backend's size is the machine's)."""
    backend = backends.get(backend_id)
    if backend is None:
        raise ConfigError(f"Memory backend '{backend_id}' not found", option="-machine")
    if ram_size is not None and ram_size != backend.size:
        raise ConfigError("Machine memory size does not match the size of the memory backend", option="-machine")
    return backend
