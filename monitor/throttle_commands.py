"""QMP ``block_set_io_throttle`` and the throttling fields of query-block's BlockDeviceInfo.

QEMU's argument names (the legacy ``bps_rd``-style ones) map onto the ``throttling.*`` limits of
:mod:`pyemu.block.throttle`; the drive is found by ``device`` (the -drive id) or ``id`` (the device's qdev
id), as QEMU's ``qmp_get_blk``; invalid limits are refused with QEMU 7.2's throttle_is_valid messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyemu.block.backend import BlockBackend
from pyemu.block.throttle import ThrottleConfig, ThrottleError
from pyemu.monitor.schema import QmpError

if TYPE_CHECKING:
    from pyemu.monitor.control import ControlApi

#: QMP argument -> throttle limit name (QEMU's ThrottleLimits <-> BlockIOThrottle).
QMP_LIMITS = {
    "bps": "bps-total", "bps_rd": "bps-read", "bps_wr": "bps-write",
    "iops": "iops-total", "iops_rd": "iops-read", "iops_wr": "iops-write",
    **{f"{short}_max": f"{long}-max" for short, long in (("bps", "bps-total"), ("bps_rd", "bps-read"),
                                                          ("bps_wr", "bps-write"), ("iops", "iops-total"),
                                                          ("iops_rd", "iops-read"), ("iops_wr", "iops-write"))},
    **{f"{short}_max_length": f"{long}-max-length" for short, long in (
        ("bps", "bps-total"), ("bps_rd", "bps-read"), ("bps_wr", "bps-write"), ("iops", "iops-total"),
        ("iops_rd", "iops-read"), ("iops_wr", "iops-write"))},
    "iops_size": "iops-size",
}
REQUIRED = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")


def _find_backend(api: ControlApi, device: str | None, qdev: str | None) -> tuple[BlockBackend, str]:
    if (device is None) == (qdev is None):
        raise QmpError("Need exactly one of 'device' and 'id'")
    for use in api.machine.drives():
        if device is not None and use.drive_id == device and use.drive_id:
            return use.backend, device
        if qdev is not None and use.device_id == qdev:
            return use.backend, use.drive_id or qdev
    if device is not None:
        raise QmpError(f"Device '{device}' not found", "DeviceNotFound")
    raise QmpError(f"Device '{qdev}' not found", "DeviceNotFound")


def _block_set_io_throttle(api: ControlApi, args: dict[str, Any]) -> Any:
    for name in REQUIRED:
        if name not in args:
            raise QmpError(f"Parameter '{name}' is missing")
    limits: dict[str, int] = {}
    for key, value in args.items():
        if key in ("device", "id", "group"):
            if not isinstance(value, str):
                raise QmpError(f"Invalid parameter type for '{key}', expected: string")
            continue
        if key not in QMP_LIMITS:
            raise QmpError(f"Parameter '{key}' is unexpected")
        if not isinstance(value, int) or isinstance(value, bool):
            raise QmpError(f"Invalid parameter type for '{key}', expected: integer")
        limits[QMP_LIMITS[key]] = value
    backend, name = _find_backend(api, args.get("device"), args.get("id"))
    if backend.closed:
        raise QmpError(f"Device '{name}' has no medium")
    try:
        config = ThrottleConfig.from_limits(limits)
    except ThrottleError as exc:
        raise QmpError(str(exc)) from None
    backend.set_throttle(config, args.get("group") or None)
    return {}


def throttle_info(backend: BlockBackend) -> dict[str, Any]:
    """The BlockDeviceInfo members QEMU 7.2 fills from the drive's throttle: the six limits always; while
    the drive is throttled its ``group``, each burst set (``*_max`` with its ``*_max_length``) and a set
    ``iops_size``."""
    member = backend.throttle
    config = member.group.config if member is not None else ThrottleConfig()
    info: dict[str, Any] = {key: config.get(QMP_LIMITS[key]) for key in REQUIRED}
    if member is not None:
        for key in REQUIRED:
            peak = config.get(QMP_LIMITS[f"{key}_max"])
            if peak:
                info[f"{key}_max"] = peak
                info[f"{key}_max_length"] = config.get(QMP_LIMITS[f"{key}_max_length"])
        if config.get("iops-size"):
            info["iops_size"] = config.get("iops-size")
        info["group"] = member.group.name
    return info


HANDLERS = {"block_set_io_throttle": _block_set_io_throttle}
