"""QMP ``blockdev-mirror``, ``drive-mirror`` and ``block-commit`` (the jobs live in :mod:`pyemu.block.mirror`
and :mod:`pyemu.block.commit`); errors become QEMU 7.2's GenericError messages."""

from __future__ import annotations

import os
from typing import Any, Callable

from pyemu.monitor.control import ControlApi
from pyemu.monitor.job_commands import register_filter_node
from pyemu.monitor.schema import QmpError


def _backends_of(api: ControlApi, node: object) -> list[Any]:
    return [use.backend for use in api.machine.drives() if use.backend.root is node]


class _TargetUse:
    """The job's hold on its target, as QEMU's job BlockBackend on it: blockdev-del of the target says
    "Node x is in use" while the job runs (QEMU 7.2's words for a mirror's target)."""

    def __init__(self, node: Any) -> None:
        self.id = ""
        self._node = node

    @property
    def root(self) -> Any:
        return self._node


def _block_target(api: ControlApi, job: Any) -> None:
    from pyemu.monitor.blockdev import node_registry

    try:
        registry = node_registry(api)
    except QmpError:
        return
    use = _TargetUse(job.target)
    registry.add_anonymous_backend(use)
    job.on_release.append(lambda: registry.remove_anonymous_backend(use))


def _release_source_after_pivot(api: ControlApi, job: Any) -> None:
    """Once the job has let go of everything: a source the drive pivoted away from that the graph created
    (a snapshot overlay, an earlier drive-mirror's image) and nothing uses any more leaves the graph, as
    QEMU drops an active commit's top."""
    from pyemu.block.implicit import release_if_unused
    from pyemu.monitor.blockdev import node_registry

    try:
        registry = node_registry(api)
    except QmpError:
        return
    job.on_release.append(lambda: release_if_unused(registry, job.source))


def _start(api: ControlApi, build: Callable[[], Any]) -> dict[str, Any]:
    from pyemu.errors import PyemuError

    try:
        job = build()
        api.jobs.add(job)
        _block_target(api, job)
        try:
            register_filter_node(api, job, driver="mirror_top", with_target=False)
        except BaseException:
            job.cancel(force=True)  # a created job: aborted at once, filter and holds released
            raise
        _release_source_after_pivot(api, job)
    except QmpError:
        raise
    except PyemuError as exc:
        raise QmpError(str(exc)) from None
    job.start()
    return {}


def _resolve(api: ControlApi) -> Callable[[str], Any]:
    from pyemu.monitor.blockdev import resolve_node

    return lambda name: resolve_node(api, name)


def _blockdev_mirror(api: ControlApi, args: dict[str, Any]) -> Any:
    from pyemu.block.mirror import create_mirror

    return _start(api, lambda: create_mirror(dict(args), resolve=_resolve(api),
                                             backends_of=lambda node: _backends_of(api, node), emit=api.jobs.emit,
                                             check_id=api.jobs.check_new_id))


def _drive_mirror(api: ControlApi, args: dict[str, Any]) -> Any:
    """Create (mode=absolute-paths) or open (mode=existing) the target image file, then mirror into it;
    sync=top gives a new image the source's backing file. The target node belongs to the job's caller: it
    stays open with the drive after the pivot (closed with it), or is closed when the job does not pivot."""
    from pyemu.block.backing_link import backing_of, unwrap
    from pyemu.block.image import create_raw, open_image
    from pyemu.block.mirror import MirrorError, create_mirror
    from pyemu.block.qcow2.create import create_qcow2
    from pyemu.block.qcow2.driver import Qcow2Format
    from pyemu.errors import PyemuError

    resolve = _resolve(api)
    filename = str(args.get("target", ""))
    mode = str(args.get("mode", "absolute-paths"))
    if mode not in ("absolute-paths", "existing"):
        raise QmpError(f"Parameter 'mode' does not accept value '{mode}'")
    sync = str(args.get("sync", "full"))
    source = resolve(str(args.get("device", "")))
    fmt = args.get("format")
    if fmt is None:
        fmt = "qcow2" if isinstance(unwrap(source), Qcow2Format) else "raw"
    if fmt not in ("qcow2", "raw"):
        raise QmpError(f"Unknown file format '{fmt}'")
    created = False
    try:
        if mode == "absolute-paths":
            # QEMU: sync=top backs the new image onto the source's backing, sync=none onto the source itself.
            backing = backing_of(source) if sync == "top" else unwrap(source) if sync == "none" else None
            if fmt == "qcow2":
                create_qcow2(filename, source.size(), backing_file=backing.filename if backing is not None else None,
                             backing_format=("qcow2" if isinstance(backing, Qcow2Format) else "raw")
                             if backing is not None else None)
            else:
                create_raw(filename, source.size())
            created = True
        elif not os.path.exists(filename):
            raise QmpError(f"Could not open '{filename}': No such file or directory")
        target = open_image(filename, format=fmt, read_only=False, open_backing=sync == "top")
    except QmpError:
        raise
    except (PyemuError, OSError) as exc:
        raise QmpError(str(exc)) from None

    def build() -> Any:
        try:
            job = create_mirror({k: v for k, v in args.items() if k not in ("format", "mode")}, resolve=resolve,
                                backends_of=lambda node: _backends_of(api, node), emit=api.jobs.emit,
                                check_id=api.jobs.check_new_id, target=target)
        except BaseException:
            target.close()
            raise
        job.target_is_zero = created and sync != "top"
        if sync == "none" and created and isinstance(target, Qcow2Format):
            job.pivot_hooks.append(lambda: _link_to_source(api, target, unwrap(source)))

        def close_unless_pivoted() -> None:
            if not any(b.root is target for b in _backends_of(api, target)):
                target.close()
                return
            _register_target(api, target, str(args.get("node-name") or ""), str(fmt))

        job.on_release.append(close_unless_pivoted)
        return job

    try:
        return _start(api, build)
    except MirrorError as exc:  # pragma: no cover - _start converts
        raise QmpError(str(exc)) from None


def _link_to_source(api: ControlApi, target: Any, source: Any) -> None:
    """drive-mirror sync=none, after the pivot: the new image's backing is the old source node itself (its
    file is not opened a second time), borrowed; QEMU links it at the same point (mirror_exit_common)."""
    from pyemu.block.backing_link import change_backing
    from pyemu.monitor.blockdev import node_registry

    try:
        registry = node_registry(api)
    except QmpError:
        registry = None
    change_backing(target, source, backing_file=source.filename, backing_format=target.header.backing_format,
                   registry=registry, write_header=False)


def _register_target(api: ControlApi, target: Any, name: str, fmt: str) -> None:
    """After the pivot the drive runs on drive-mirror's new image: register it (``node-name`` or an automatic
    name, as QEMU) so queries find it and the graph's shutdown closes it."""
    from pyemu.block.implicit import IMPLICIT_OWNER
    from pyemu.block.registry import NodeEntry
    from pyemu.monitor.blockdev import node_registry

    try:
        registry = node_registry(api)
        registry.add(NodeEntry(name or registry.auto_name(), target, fmt, owner=IMPLICIT_OWNER,
                               auto_named=not name))
    except Exception:  # noqa: BLE001 - a name clash leaves the node unnamed, still the drive's root
        pass


def _block_commit(api: ControlApi, args: dict[str, Any]) -> Any:
    from pyemu.block.commit import create_commit
    from pyemu.monitor.blockdev import node_registry

    def find_device(name: str) -> Any:
        try:
            return node_registry(api).lookup(name)
        except Exception:  # noqa: BLE001 - any lookup failure is QEMU's DeviceNotFound here
            raise QmpError(f"Device '{name}' not found", "DeviceNotFound") from None

    def resolve(name: str) -> Any:
        try:
            return node_registry(api).lookup(name)
        except Exception:  # noqa: BLE001
            raise QmpError(f"Cannot find device='' nor node-name='{name}'") from None

    try:
        registry = node_registry(api)
    except QmpError:
        registry = None
    return _start(api, lambda: create_commit(dict(args), resolve=resolve, find_device=find_device,
                                             backends_of=lambda node: _backends_of(api, node), emit=api.jobs.emit,
                                             check_id=api.jobs.check_new_id, registry=registry))


HANDLERS: dict[str, Callable[[ControlApi, dict[str, Any]], Any]] = {
    "blockdev-mirror": _blockdev_mirror,
    "drive-mirror": _drive_mirror,
    "block-commit": _block_commit,
}
