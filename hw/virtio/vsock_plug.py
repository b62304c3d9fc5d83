"""``-device vhost-vsock-device,guest-cid=N,uds-path=PATH``: properties to a :class:`VirtioVsock`.

``guest-cid`` is QEMU's property (same checks, same messages). ``uds-path`` is pyemu's: QEMU passes the
data path to the host kernel (``vhostfd``, the host's ``/dev/vhost-vsock``), pyemu serves it itself over
Unix sockets in Firecracker's convention (see :mod:`pyemu.hw.virtio.vsock_host`), so it needs a path
instead. ``vhostfd`` is refused with that explanation rather than "not found".

The device also wants its I/O thread for the host sockets: the plug code calls
``model.attach_iothread(iothread)`` right after creating the transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyemu.errors import ConfigError
from pyemu.hw.virtio.vsock import VirtioVsock, VsockConfig
from pyemu.hw.virtio.vsock_host import VsockHostError
from pyemu.machines.device_props import PropReader

if TYPE_CHECKING:  # machines.virtio_devices imports this module for its BUILDERS table
    from pyemu.machines.virtio_devices import Backends

DRIVER = "vhost-vsock-device"


def build_vhost_vsock(props: PropReader, backends: Backends) -> VirtioVsock:
    """Build the device from ``-device vhost-vsock-device,...`` (no backend objects are used)."""
    del backends  # the Unix sockets are the backend, named by uds-path
    if props.text("vhostfd") is not None:
        raise props.error("'vhostfd' is not supported: pyemu has no in-kernel vhost data path; "
                          "use uds-path=PATH (host programs connect to PATH, guest connections to "
                          "port P reach a listener at PATH_P)")
    cid_text = props.text("guest-cid")
    uds_path = props.text("uds-path") or ""
    props.finish()
    if cid_text is None:
        raise props.error("guest-cid property must be greater than 2")
    try:
        guest_cid = int(cid_text, 0)
    except ValueError:
        raise props.error(f"Parameter 'guest-cid' expects an integer, not '{cid_text}'") from None
    config = VsockConfig(guest_cid=guest_cid, uds_path=uds_path)
    try:
        return VirtioVsock(config)
    except VsockHostError as exc:
        raise ConfigError(f"-device {DRIVER}: {exc}", option="-device") from exc
