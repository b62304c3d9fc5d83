"""QEMU 7.2's migration parameters and capabilities, and the rate limit ``max-bandwidth`` sets.

Every parameter QEMU 7.2's ``query-migrate-parameters`` reports is accepted with its default and its range
check (same messages), and kept; the ones pyemu acts on are ``max-bandwidth`` (bytes per second the
source writes, :class:`RateLimiter`) and ``downtime-limit`` (milliseconds the pre-copy's final
stop-and-copy may take). Capabilities: QEMU's names are all known; only the ones pyemu does something with
(``events``: MIGRATION events are sent only while it is on, as in QEMU 7.2; ``mapped-ram``, QEMU 9.0's,
which 7.2 lacks: a ``file:`` save with RAM at fixed offsets, restored by mapping it) may be enabled, the
others are refused naming the capability.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pyemu.migration.errors import MigrationError

U64_MAX = (1 << 64) - 1

DEFAULTS: dict[str, Any] = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "compress-level": 1, "compress-threads": 8, "compress-wait-thread": True, "decompress-threads": 2,
    "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False, "tls-creds": "", "tls-hostname": "", "tls-authz": "",
    "max-bandwidth": 134217728, "downtime-limit": 300, "x-checkpoint-delay": 20000,
    "block-incremental": False, "multifd-channels": 2, "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0, "max-cpu-throttle": 99, "multifd-compression": "none",
    "multifd-zlib-level": 1, "multifd-zstd-level": 1,
}
"""QEMU 7.2's defaults (measured with query-migrate-parameters on qemu-system-x86_64 7.2)."""

_RANGES: dict[str, tuple[int, int, str]] = {
    "downtime-limit": (0, 2000 * 1000, "Parameter 'downtime_limit' expects an integer in the range of 0 to "
                                       "(2000 * 1000) ms"),
    "multifd-channels": (1, 255, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    "compress-level": (0, 9, "Parameter 'compress_level' expects a value between 0 and 9"),
    "compress-threads": (1, 255, "Parameter 'compress_threads' expects a value between 1 and 255"),
    "decompress-threads": (1, 255, "Parameter 'decompress_threads' expects a value between 1 and 255"),
    "throttle-trigger-threshold": (1, 100, "Parameter 'throttle_trigger_threshold' expects a value "
                                           "between 1 and 100"),
    "cpu-throttle-initial": (1, 99, "Parameter 'cpu_throttle_initial' expects a value between 1 and 99"),
    "cpu-throttle-increment": (1, 99, "Parameter 'cpu_throttle_increment' expects a value between 1 and 99"),
    "max-cpu-throttle": (1, 99, "Parameter 'max_cpu_throttle' expects a value between 1 and 99"),
    "multifd-zlib-level": (0, 9, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    "multifd-zstd-level": (0, 20, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    "announce-initial": (1, 100000, "Parameter 'announce_initial' expects a value between 1 and 100000"),
    "announce-max": (1, 100000, "Parameter 'announce_max' expects a value between 1 and 100000"),
    "announce-rounds": (1, 1000, "Parameter 'announce_rounds' expects a value between 1 and 1000"),
    "announce-step": (1, 10000, "Parameter 'announce_step' expects a value between 1 and 10000"),
}

CAPABILITIES = ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
                "postcopy-ram", "x-colo", "release-ram", "block", "return-path", "pause-before-switchover",
                "multifd", "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
                "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt", "mapped-ram")
"""QEMU 7.2's MigrationCapability, in its order, then QEMU 9.0's ``mapped-ram`` (7.2 lacks it): a ``file:``
save puts RAM at fixed offsets so a restore maps it lazily (:mod:`pyemu.migration.mapped_ram`)."""
SUPPORTED_CAPABILITIES = frozenset({"events", "mapped-ram"})


class MigrationParameters:
    """The parameters and capabilities of one VM's migrations (kept across migrations, as in QEMU)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = dict(DEFAULTS)
        self.capabilities: dict[str, bool] = {name: False for name in CAPABILITIES}

    def set(self, changes: dict[str, Any]) -> None:
        """Check every change first (QEMU's messages), then apply them all: one bad value changes nothing.
        The QMP layer has already checked names and JSON types against the schema."""
        for name, value in changes.items():
            if name not in DEFAULTS:
                raise MigrationError(f"Parameter '{name}' is unexpected")
            if name in _RANGES and not isinstance(value, bool) and isinstance(value, int):
                low, high, message = _RANGES[name]
                if not low <= value <= high:
                    raise MigrationError(message)
            if name in ("max-bandwidth", "max-postcopy-bandwidth", "xbzrle-cache-size") and (
                    isinstance(value, int) and not 0 <= value <= U64_MAX) and value != -1:
                raise MigrationError(f"Parameter '{name.replace('-', '_')}' expects a size")
            if name == "multifd-compression" and value not in ("none", "zlib", "zstd"):
                raise MigrationError(f"Parameter 'multifd-compression' does not accept value '{value}'")
        for name, value in changes.items():
            if name in ("max-bandwidth", "max-postcopy-bandwidth", "xbzrle-cache-size"):
                value &= U64_MAX  # QEMU stores the size as uint64: -1 reads back as 2**64-1
            self.values[name] = value

    def query(self) -> dict[str, Any]:
        return dict(self.values)

    def set_capabilities(self, entries: list[dict[str, Any]]) -> None:
        """``migrate-set-capabilities``: QEMU's names; enabling one pyemu does not do is refused."""
        for entry in entries:
            name, state = entry["capability"], entry["state"]
            if name not in CAPABILITIES:
                raise MigrationError(f"Parameter 'capability' does not accept value '{name}'")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise MigrationError(f"Capability '{name}' is not supported by pyemu's migration "
                                     f"(supported: {', '.join(sorted(SUPPORTED_CAPABILITIES))})")
        for entry in entries:
            self.capabilities[entry["capability"]] = bool(entry["state"])

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    @property
    def max_bandwidth(self) -> int:
        return int(self.values["max-bandwidth"])

    @property
    def downtime_limit_ms(self) -> int:
        return int(self.values["downtime-limit"])


class MigrationCancelled(MigrationError):
    """migrate_cancel stopped the save."""

    def __init__(self) -> None:
        super().__init__("Migration cancelled")


class RateLimiter:
    """A writer that sends at most ``max-bandwidth`` bytes per second (read at each write, so a change
    during a migration applies at once, as in QEMU) and stops with :class:`MigrationCancelled` as soon as
    ``cancel`` is set, even while it waits for its budget."""

    SLICE_S = 0.1

    def __init__(self, out: Any, params: MigrationParameters, cancel: threading.Event) -> None:
        self._out = out
        self._params = params
        self._cancel = cancel
        self._slice_start = time.monotonic()
        self._slice_bytes = 0
        self.bytes_written = 0

    def write(self, data: bytes, /) -> int:
        view = memoryview(data)
        while view:
            if self._cancel.is_set():
                raise MigrationCancelled()
            limit = self._params.max_bandwidth
            if not limit:  # 0: no limit (a budget per slice would make every later write wait its slice out)
                self._out.write(bytes(view))
                self.bytes_written += len(view)
                break
            budget = max(1, int(limit * self.SLICE_S))
            now = time.monotonic()
            if now - self._slice_start >= self.SLICE_S:
                self._slice_start = now
                self._slice_bytes = 0
            room = budget - self._slice_bytes
            if room <= 0:
                self._cancel.wait(self._slice_start + self.SLICE_S - now)
                continue
            part = view[:room]
            self._out.write(bytes(part))
            self._slice_bytes += len(part)
            self.bytes_written += len(part)
            view = view[len(part):]
        return len(data)
