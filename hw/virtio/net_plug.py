"""``-device virtio-net-device,netdev=ID[,mac=...]``: properties to a :class:`~pyemu.hw.virtio.net.VirtioNet`
on the TAP that ``-netdev tap,id=ID`` describes.

Kept apart from the device model so the model never sees command-line syntax and the board's builder
table (:data:`pyemu.machines.virtio_devices.BUILDERS`) only needs one entry. Property names are QEMU's;
the offload switches (``csum``, ``guest_tso4``, ...) can only take away what the TAP can do.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING

from pyemu.errors import ConfigError
from pyemu.hw.virtio.device import VirtioDevice
from pyemu.hw.virtio.net import DEFAULT_MAC, QUEUE_SIZE, NetConfig, VirtioNet, parse_mac
from pyemu.machines.device_props import PropReader
from pyemu.net.options import TapOptions, open_netdev

if TYPE_CHECKING:  # the board's module imports this one: no import cycle at run time
    from pyemu.machines.virtio_devices import Backends

BOOLEAN_PROPS = ("mrg_rxbuf", "status", "csum", "guest_csum", "host_tso4", "host_tso6", "host_ecn", "host_ufo",
                 "guest_tso4", "guest_tso6", "guest_ecn", "guest_ufo", "ctrl_vq", "ctrl_mac_addr",
                 "ctrl_guest_offloads")

_mac_lock = threading.Lock()
_mac_index = itertools.count()


def default_mac() -> bytes:
    """QEMU's default for a NIC without ``mac=``: 52:54:00:12:34:56, then :57, :58 ... per NIC, so two
    NICs never share an address."""
    with _mac_lock:
        index = next(_mac_index)
    return DEFAULT_MAC[:5] + bytes([(DEFAULT_MAC[5] + index) & 0xFF])


def _queue_size(props: PropReader, name: str) -> int:
    size = props.integer(name, QUEUE_SIZE, low=256, high=1024)
    if size & (size - 1):
        raise props.error(f"Invalid {name} (= {size}), must be a power of 2 between 256 and 1024")
    return size


def build_virtio_net(props: PropReader, backends: Backends) -> VirtioDevice:
    """The builder registered for ``virtio-net-device``: checks every property, then opens the TAP (the
    last step, so a typo never leaves a TAP interface behind)."""
    netdev_id = props.required("netdev")
    mac_text = props.text("mac")
    switches = {name: props.boolean(name, True) for name in BOOLEAN_PROPS}
    rx_size = _queue_size(props, "rx_queue_size")
    tx_size = _queue_size(props, "tx_queue_size")
    props.finish()
    try:
        mac = parse_mac(mac_text) if mac_text else default_mac()
    except ConfigError as exc:
        raise props.error(str(exc)) from None
    options = TapOptions.from_netdev(backends.netdev(netdev_id, props.driver))
    config = NetConfig(netdev=netdev_id, mac=mac, rx_queue_size=rx_size, tx_queue_size=tx_size, **switches)
    tap = open_netdev(options)
    try:
        return VirtioNet(tap, config)
    except BaseException:
        tap.close()
        raise
