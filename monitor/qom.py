"""QMP's ``qom-list``, ``qom-get`` and ``qom-set`` over the part of QEMU's object tree tools use.

pyemu has no QOM; what management tools and QEMU's own tests walk is ``/machine/peripheral/<id>`` (devices
created with an id) and ``/machine/peripheral-anon/device[N]`` (without one), and the property that matters
for live block work is a block device's ``drive``: ``qom-set /machine/peripheral/<id> drive <node>`` puts
another node under the device's BlockBackend while the guest runs (QEMU's fleecing test inserts a
copy-before-write filter this way). The swap drains the backend (requests wait, none fails), lets go of
the old root, takes the permissions the new subtree needs, and attaches; any refusal puts everything back.
"""

from __future__ import annotations

from typing import Any, Callable

from pyemu.block.implicit import release_if_unused
from pyemu.errors import PyemuError
from pyemu.monitor.blockdev import node_registry
from pyemu.monitor.control import ControlApi
from pyemu.monitor.schema import QmpError

_CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon")
#: virtio-blk properties readable over QOM: name -> (QOM type, BlkConfig attribute). Only ``drive`` may
#: change on a realized device, as in QEMU.
_BLK_PROPS = {"serial": ("str", "serial"), "num-queues": ("uint16", "num_queues"),
              "queue-size": ("uint16", "queue_size"), "discard": ("bool", "discard"),
              "write-zeroes": ("bool", "write_zeroes")}


def _peripherals(api: ControlApi) -> dict[str, Any]:
    plugger = getattr(api.machine, "virtio", None)
    return dict(getattr(plugger, "peripherals", {}) or {})


def _block_device(board_device: Any) -> Any | None:
    """The virtio-blk model behind a board device (its transport's ``device``), if it is one."""
    inner = getattr(board_device.model, "device", None)
    return inner if inner is not None and hasattr(inner, "backend") else None


def _drive_value(api: ControlApi, model: Any) -> str:
    """QEMU's print of a ``drive`` property: the BlockBackend's name, else its root's node-name."""
    backend = model.backend
    if backend.id:
        return str(backend.id)
    return node_registry(api).name_of(backend.root) or ""


def _find(api: ControlApi, path: str) -> Any:
    device = _peripherals(api).get(path.rstrip("/") or "/")
    if device is None:
        raise QmpError(f"Device '{path}' not found", "DeviceNotFound")
    return device


def _qom_list(api: ControlApi, args: dict[str, Any]) -> Any:
    path = args["path"].rstrip("/") or "/"
    peripherals = _peripherals(api)
    if path == "/":
        return [{"name": "type", "type": "string"}, {"name": "machine", "type": "child<microvm-machine>"}]
    if path == "/machine":
        return [{"name": "type", "type": "string"},
                {"name": "peripheral-anon", "type": "child<container>"},
                {"name": "peripheral", "type": "child<container>"},
                {"name": "unattached", "type": "child<container>"}]
    if path in _CONTAINERS or path == "/machine/unattached":
        out = [{"name": "type", "type": "string"}]
        for child_path, device in peripherals.items():
            parent, _, name = child_path.rpartition("/")
            if parent == path:
                out.append({"name": name, "type": f"child<{device.driver}>"})
        return out
    device = _find(api, path)
    props = [{"name": "type", "type": "string"}, {"name": "realized", "type": "bool"}]
    if _block_device(device) is not None:
        props.append({"name": "drive", "type": "str"})
        props += [{"name": name, "type": kind} for name, (kind, _attr) in _BLK_PROPS.items()]
    return props


def _qom_get(api: ControlApi, args: dict[str, Any]) -> Any:
    device = _find(api, args["path"])
    prop = args["property"]
    if prop == "type":
        return device.driver
    if prop == "realized":
        return True
    model = _block_device(device)
    if prop == "drive" and model is not None:
        return _drive_value(api, model)
    if prop in _BLK_PROPS and model is not None:
        return getattr(model.config, _BLK_PROPS[prop][1])
    raise QmpError(f"Property '{device.driver}.{prop}' not found")


def _qom_set(api: ControlApi, args: dict[str, Any]) -> Any:
    device = _find(api, args["path"])
    prop, value = args["property"], args["value"]
    model = _block_device(device)
    if prop != "drive" or model is None:
        if prop in ("type", "realized") or (model is not None and prop in _BLK_PROPS):
            raise QmpError(f"Attempt to set property '{prop}' on device '{device.id}' (type '{device.driver}') "
                           "after it was realized")
        raise QmpError(f"Property '{device.driver}.{prop}' not found")
    if not isinstance(value, str):
        raise QmpError("Invalid parameter type for 'value', expected: string")
    registry = node_registry(api)
    entry = registry.get(value)
    if entry is None:
        raise QmpError(f"Cannot find device='' nor node-name='{value}'")
    if entry.read_only and not model.backend.read_only:
        raise QmpError("Block node is read-only")
    old = replace_root(model.backend, entry.node)
    release_if_unused(registry, old)  # a snapshot overlay nothing else uses leaves the graph (QEMU)
    return {}


def replace_root(backend: Any, new: Any) -> Any:
    """Swap ``backend``'s root for ``new`` (drained; permissions of both subtrees moved; all or nothing);
    returns the old root."""
    try:
        return backend.change_root(new)
    except PyemuError as error:
        raise QmpError(str(error)) from None


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "qom-list": _qom_list,
    "qom-get": _qom_get,
    "qom-set": _qom_set,
}
