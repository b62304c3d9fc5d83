"""virtio-net (virtio 1.x section 5.1): a guest NIC whose frames go to and come from a TAP device.

Queues: 0 receive, 1 transmit, 2 control (when VIRTIO_NET_F_CTRL_VQ is offered; one queue pair only).
Everything runs on the device's I/O thread: the queues when the driver notifies them, and the TAP's file
descriptor, which is watched there (:meth:`VirtioNet.attach_iothread`).

Transmit is zero-copy: the chain's readable views of guest RAM go to the TAP in one ``os.writev``. With a
vnet-header TAP the guest's 12-byte ``virtio_net_hdr_v1`` goes along untouched, so checksum offload and
TSO/UFO are done by the host stack (or the real NIC behind it); without one the header is skipped and no
offload is offered, so the header is always zero.

Receive copies each frame once. The TAP offers no way to learn a frame's size before reading it, and with
mergeable receive buffers (MRG_RXBUF) the size decides how many of the driver's buffers the frame takes;
reading straight into guest buffers would mean popping enough buffers for the largest possible frame
(~45 for a 64 KiB GSO frame) for every 60-byte ACK, and a frame that finds too few buffers would have to
stay in the guest's memory. So a frame is read into one host buffer, then exactly as many descriptor
chains as it needs are popped, filled and published with one used-index update (the driver reads
``num_buffers`` from the first buffer and expects all of them to be there -- Linux counts a partial
set as an rx length error). The memcpy is negligible next to the Python work per frame.

Flow control without spinning: the TAP fd is watched only while the device can take frames. When the
driver has posted no buffers (or too few for the frame already read), the device stops watching the fd
and the frame stays in the host buffer; frames that arrive meanwhile wait in the TAP's kernel queue
(``txqueuelen`` frames, then the kernel drops, as a full NIC ring would). The driver's next notification
of the receive queue resumes delivery. The watch is one-shot: its handler unregisters itself and
notifies the receive queue, so after a reset or a failure nothing fires again until the queue is served.

Guest mistakes (a chain without a full header, a receive buffer smaller than the header) raise
:class:`~pyemu.hw.virtio.errors.VirtqueueError` and the transport marks the device DEVICE_NEEDS_RESET. A
frame larger than every buffer the driver could post is dropped and logged under ``-d guest_errors``.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from pyemu.errors import ConfigError
from pyemu.hw.core.dma import DmaMemory
from pyemu.hw.core.state import DeviceState, StateError, check_state
from pyemu.hw.virtio.device import ID_NET, VirtioDevice, pack_config
from pyemu.hw.virtio import net_rx_plane
from pyemu.hw.virtio.errors import DeviceBroken, VirtqueueError
from pyemu.hw.virtio.queue import MAX_QUEUE_SIZE, DescriptorChain, Virtqueue
from pyemu.net import NetError, host_warning
from pyemu.net.tap import Offload
from pyemu.system import log
from pyemu.system.buffers import io_buffer
from pyemu.system.iothread import IoThread

# Feature bits (virtio 1.x 5.1.3).
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_CTRL_GUEST_OFFLOADS = 1 << 2
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_CTRL_MAC_ADDR = 1 << 23

GUEST_OFFLOADS = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO
"""The receive offloads a driver negotiates, and may later change with VIRTIO_NET_CTRL_GUEST_OFFLOADS."""
_TAP_OFFLOAD = {F_GUEST_CSUM: Offload.CSUM, F_GUEST_TSO4: Offload.TSO4, F_GUEST_TSO6: Offload.TSO6,
                F_GUEST_ECN: Offload.TSO_ECN, F_GUEST_UFO: Offload.UFO}

S_LINK_UP = 1

RX, TX, CTRL = 0, 1, 2
QUEUE_SIZE = 256
HDR_LEN = 12
"""``virtio_net_hdr_v1``: with VIRTIO_F_VERSION_1 the header always carries ``num_buffers``."""
HDR_F_NEEDS_CSUM = 1
MAX_FRAME = 65535 + 14 + 4
"""The largest frame a TAP hands us: a 64 KiB GSO packet with its Ethernet and VLAN headers."""
MIN_FRAME = 14
RX_BUDGET = 128
TX_BUDGET = 256
"""Chains served per notification before the queue yields to the others on the I/O thread."""
TX_RETRY_S = 0.001
IOV_MAX = 1024

# Control queue (virtio 1.x 5.1.6.5).
CTRL_OK = 0
CTRL_ERR = 1
CTRL_MAC = 1
CTRL_MAC_ADDR_SET = 1
CTRL_GUEST_OFFLOADS_CLASS = 5
CTRL_GUEST_OFFLOADS_SET = 0

DEFAULT_MAC = bytes.fromhex("525400123456")


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or with dashes) -> 6 bytes; multicast and all-zero addresses are refused
    because a guest cannot use them as its own (Linux would replace them with a random address)."""
    parts = text.replace("-", ":").split(":")
    try:
        if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"Property 'mac': '{text}' is not a MAC address (xx:xx:xx:xx:xx:xx)",
                          option="-device") from None
    if mac[0] & 1 or mac == bytes(6):
        raise ConfigError(f"Property 'mac': {text} is a multicast or zero address, not a NIC's own",
                          option="-device")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class NetBackend(Protocol):
    """What the device needs from a network backend (:class:`pyemu.net.tap.TapDevice`; tests use a
    socketpair): a frame per read/write on a non-blocking fd, with or without a 12-byte vnet header."""

    @property
    def vnet_hdr_len(self) -> int: ...

    @property
    def offloads(self) -> Offload: ...

    def fileno(self) -> int: ...

    def set_offload(self, offload: Offload) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class NetConfig:
    """``-device virtio-net-device`` properties (QEMU's names; offload switches default on and only
    take effect where the backend can do them)."""

    netdev: str = ""
    mac: bytes = DEFAULT_MAC
    mrg_rxbuf: bool = True
    status: bool = True
    csum: bool = True
    guest_csum: bool = True
    host_tso4: bool = True
    host_tso6: bool = True
    host_ecn: bool = True
    host_ufo: bool = True
    guest_tso4: bool = True
    guest_tso6: bool = True
    guest_ecn: bool = True
    guest_ufo: bool = True
    ctrl_vq: bool = True
    ctrl_mac_addr: bool = True
    ctrl_guest_offloads: bool = True
    rx_queue_size: int = QUEUE_SIZE
    tx_queue_size: int = QUEUE_SIZE

    def __post_init__(self) -> None:
        if len(self.mac) != 6:
            raise ConfigError("virtio-net-device: a MAC address is 6 bytes", option="-device")
        for name in ("rx_queue_size", "tx_queue_size"):
            size = getattr(self, name)
            if not 2 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
                raise ConfigError(f"virtio-net-device: {name}={size} must be a power of 2 up to {MAX_QUEUE_SIZE}",
                                  option="-device")


@dataclass(frozen=True)
class VirtioNetState(DeviceState):
    """What the device adds to the transport's state: the (possibly driver-set) MAC, the link and the
    receive offloads in force. A frame caught between the TAP and the guest is not kept (a NIC drops it);
    while the VM is stopped no frame moves at all (:meth:`VirtioNet.set_vm_running`), so the state and
    the rings in RAM saved by a migration do not change after they were taken."""

    VERSION = 1
    mac: str = format_mac(DEFAULT_MAC)
    link_up: bool = True
    guest_offloads: int = 0


class _Outcome(Enum):
    DELIVERED = 1
    DROPPED = 2
    WAIT = 3


class VirtioNet(VirtioDevice):
    device_id = ID_NET
    name = "virtio-net"

    def __init__(self, backend: NetBackend, config: NetConfig) -> None:
        sizes = (config.rx_queue_size, config.tx_queue_size) + ((64,) if config.ctrl_vq else ())
        super().__init__(sizes)
        self.backend = backend
        self.config = config
        self.mac = config.mac
        self.link_up = True
        self.queues: list[Virtqueue] = []
        self._fd = backend.fileno()
        self._vnet = backend.vnet_hdr_len == HDR_LEN
        if backend.vnet_hdr_len not in (0, HDR_LEN):
            raise NetError(f"virtio-net: backend vnet header of {backend.vnet_hdr_len} bytes (needs 0 or {HDR_LEN})")
        self._iothread: IoThread | None = None
        self._watching = False
        self._backend_failed = False
        self._mrg = False
        self._guest_offloads = 0
        # One frame in flight from the TAP to the guest (see the module docstring), on a cache line: the
        # kernel's copy of a 64 KiB frame into a buffer 16 bytes off one (a plain bytearray) is 25% slower.
        self._rx_view = io_buffer(HDR_LEN + MAX_FRAME + 1)
        self._rx_read_view = self._rx_view if self._vnet else self._rx_view[HDR_LEN:]
        self._rx_len = 0
        self._rx_plane: net_rx_plane.ReceivePlane | None = None
        self._no_rx_plane = False
        self._tx_timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()
        self._vm_running = True
        """False while the VM is stopped: no frame moves between the TAP and guest RAM (QEMU's
        virtio_net_can_receive / vm_running), so a paused or migrating VM's RAM stays still."""
        self.rx_frames = self.rx_bytes = self.rx_dropped = 0
        self.tx_frames = self.tx_bytes = self.tx_dropped = self.tx_errors = 0

    # -- wiring -------------------------------------------------------------------------------------------
    def attach_iothread(self, iothread: IoThread) -> None:
        """The I/O thread that serves this device's queues; the TAP fd is watched there too, so frames
        and queue notifications are handled by one thread, in order, without locks between them."""
        self._iothread = iothread

    # -- description ----------------------------------------------------------------------------------------
    def device_features(self) -> int:
        c = self.config
        features = F_MAC
        if c.status:
            features |= F_STATUS
        if c.mrg_rxbuf:
            features |= F_MRG_RXBUF
        if c.ctrl_vq:
            features |= F_CTRL_VQ
            if c.ctrl_mac_addr:
                features |= F_CTRL_MAC_ADDR
        if not self._vnet:
            return features  # no header to carry offload information: complete frames only
        if c.csum:
            features |= F_CSUM
            for on, bit in ((c.host_tso4, F_HOST_TSO4), (c.host_tso6, F_HOST_TSO6)):
                if on:
                    features |= bit
            if c.host_ecn and features & (F_HOST_TSO4 | F_HOST_TSO6):
                features |= F_HOST_ECN
            if c.host_ufo and self.backend.offloads & Offload.UFO:
                features |= F_HOST_UFO
        offloads = self.backend.offloads
        if c.guest_csum and offloads & Offload.CSUM:
            features |= F_GUEST_CSUM
            for on, bit, need in ((c.guest_tso4, F_GUEST_TSO4, Offload.TSO4), (c.guest_tso6, F_GUEST_TSO6, Offload.TSO6),
                                  (c.guest_ufo, F_GUEST_UFO, Offload.UFO)):
                if on and offloads & need:
                    features |= bit
            if c.guest_ecn and offloads & Offload.TSO_ECN and features & (F_GUEST_TSO4 | F_GUEST_TSO6):
                features |= F_GUEST_ECN
            if c.ctrl_vq and c.ctrl_guest_offloads:
                features |= F_CTRL_GUEST_OFFLOADS
        return features

    def config_bytes(self) -> bytes:
        # mac[6], status, max_virtqueue_pairs, mtu (unused without VIRTIO_NET_F_MTU).
        return self.mac + pack_config("HHH", S_LINK_UP if self.link_up else 0, 1, 0)

    # -- life cycle -----------------------------------------------------------------------------------------
    def activate(self, queues: list[Virtqueue]) -> None:
        """DRIVER_OK (vCPU thread): take the negotiated receive offloads to the TAP. The transport then
        notifies the ready queues, and serving the receive queue starts watching the TAP."""
        super().activate(queues)
        assert self.context is not None
        features = self.context.driver_features
        self._mrg = bool(features & F_MRG_RXBUF)
        self._set_guest_offloads(features & GUEST_OFFLOADS)

    def reset(self) -> None:
        """Driver or machine reset: drop the frame in flight, receive offloads off, MAC as configured.
        The fd watch is one-shot and disarms itself (see the module docstring), so nothing to undo here."""
        self._cancel_tx_retry()
        if self.queues:
            with self.queues[RX].lock:
                self._rx_len = 0
        self.mac = self.config.mac
        self._mrg = False
        self._set_guest_offloads(0)

    def close(self) -> None:
        self._cancel_tx_retry()
        if self._watching and self._iothread is not None:
            try:
                self._iothread.remove_reader(self.backend)
            except Exception:  # IoThreadError or a closed selector: closing the fd is what matters
                pass
            self._watching = False
        self.backend.close()

    def set_link(self, up: bool) -> None:
        """Plug or unplug the virtual cable (QMP ``set_link``): the guest sees the STATUS change; while
        down, frames in both directions are dropped as on a real NIC."""
        if up == self.link_up:
            return
        self.link_up = up
        if self.context is not None:
            if self.context.driver_features & F_STATUS:
                self.context.notify_config()
            self.context.kick_queue(RX)
            self.context.kick_queue(TX)

    def set_vm_running(self, running: bool) -> None:
        """The VM started or stopped running (any thread; the board's run-state listener). Stopped: frames
        stay in the TAP and the guest's transmit buffers stay posted, as with QEMU, so guest RAM does not
        change behind a migration's last RAM round; running again: both queues are served at once."""
        if running == self._vm_running:
            return
        self._vm_running = running
        if running and self.context is not None:
            self.context.kick_queue(RX)
            self.context.kick_queue(TX)

    # -- queues (I/O thread, holding queue.lock) ------------------------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
        if not self._vm_running and queue.index in (RX, TX):
            return  # served again when the VM runs (set_vm_running)
        if queue.index == RX:
            self._process_rx(queue)
        elif queue.index == TX:
            self._process_tx(queue)
        elif queue.index == CTRL:
            self._process_ctrl(queue)

    # -- transmit -------------------------------------------------------------------------------------------
    def _process_tx(self, queue: Virtqueue) -> None:
        assert self.context is not None
        dma = self.context.dma
        sent: list[tuple[DescriptorChain, int]] = []
        try:
            while len(sent) < TX_BUDGET:
                chain = queue.pop(dma)
                if chain is None:
                    return
                if chain.readable_length < HDR_LEN:
                    raise VirtqueueError(queue.index, f"transmit chain {chain.head} has {chain.readable_length} "
                                                      f"readable bytes, less than the {HDR_LEN}-byte header")
                if not self._transmit(chain, dma):
                    queue.unpop(1)
                    self._schedule_tx_retry()
                    return
                sent.append((chain, 0))
            self.context.kick_queue(queue.index)  # more may be waiting: after the other queues' turn
        finally:
            if sent:  # the batch goes back with one used-index update
                queue.push_many(dma, sent)
                self.context.notify_queue(queue)

    def _transmit(self, chain: DescriptorChain, dma: DmaMemory) -> bool:
        """Send one frame; False when the backend is full (try again later). A frame the host refuses is
        dropped and counted, as a NIC would."""
        if not self.link_up:
            self.tx_dropped += 1
            return True
        skip = 0 if self._vnet else HDR_LEN
        views: list[memoryview] | list[bytes] = chain.views(dma, writable=False, start=skip)
        if len(views) > IOV_MAX:
            views = [b"".join(views)]
        while True:
            try:
                sent = os.writev(self._fd, views)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            except OSError as exc:
                self.tx_errors += 1
                if exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                    log.log("guest_errors", f"virtio-net: the host refused a {chain.readable_length}-byte "
                                            f"transmit frame: {exc.strerror}")
                elif exc.errno != errno.EIO:  # EIO: the TAP interface is down on the host; a cable unplugged
                    self._backend_failure(f"write: {exc.strerror}")
                return True
            self.tx_frames += 1
            self.tx_bytes += sent - (HDR_LEN - skip)
            return True

    def _schedule_tx_retry(self) -> None:
        """The backend's buffer is full (a socket backend; a TAP practically never is): retry in a
        millisecond rather than spin. The chain went back to the ring, so nothing is lost."""
        context = self.context
        assert context is not None
        with self._timer_lock:
            if self._tx_timer is not None:
                return

            def fire() -> None:
                with self._timer_lock:
                    self._tx_timer = None
                context.kick_queue(TX)
            self._tx_timer = threading.Timer(TX_RETRY_S, fire)
            self._tx_timer.daemon = True
            self._tx_timer.start()

    def _cancel_tx_retry(self) -> None:
        with self._timer_lock:
            if self._tx_timer is not None:
                self._tx_timer.cancel()
                self._tx_timer = None

    # -- receive --------------------------------------------------------------------------------------------
    def _process_rx(self, queue: Virtqueue) -> None:
        """Move frames from the TAP into the driver's buffers until one of them runs out."""
        assert self.context is not None
        if self._iothread is None:
            raise DeviceBroken("virtio-net: no I/O thread attached to watch the backend "
                               "(the board must call attach_iothread)")
        dma = self.context.dma
        delivered = 0
        budget = RX_BUDGET
        try:
            if self.link_up and not self._backend_failed:
                received = self._plane_receives(queue, dma, budget)
                if received is not None:
                    delivered += received.frames
                    budget -= received.frames
                    if received.stop == net_rx_plane.STOP_NO_FRAME:
                        self._watch()
                        return
                    if received.stop == net_rx_plane.STOP_NO_BUFFERS:
                        return  # the fd stays unwatched until the driver notifies us
                    if received.stop == net_rx_plane.STOP_BAD_FRAME:
                        self._drop_bad_frame(self._rx_len)
                        self._rx_len = 0
                    elif received.stop == net_rx_plane.STOP_END:
                        self._backend_failure("the backend closed (end of file)")
                        return
                    elif received.stop == net_rx_plane.STOP_READ_ERROR:
                        self._backend_failure(f"read: {os.strerror(received.err)}")
                        return
            for _ in range(budget):
                if not self._rx_len:
                    if self._backend_failed:
                        return
                    if self.link_up and not queue.has_work(dma):
                        return  # no buffers: the fd stays unwatched until the driver notifies us
                    got = self._read_frame()
                    if got is None:
                        self._watch()
                        return
                    if not got:
                        continue
                    if not self.link_up:
                        self._rx_len = 0
                        self.rx_dropped += 1
                        continue
                outcome = self._deliver(queue, dma)
                if outcome is _Outcome.WAIT:
                    return
                if outcome is _Outcome.DELIVERED:
                    delivered += 1
            self.context.kick_queue(RX)  # budget spent: come back after the other queues' turn
        finally:
            if delivered:
                self.context.notify_queue(queue)

    def _plane_receives(self, queue: Virtqueue, dma: DmaMemory, budget: int) -> net_rx_plane.Received | None:
        """Frames moved by the C receive plane (:mod:`pyemu.hw.virtio.net_rx_plane`), or None without it; the
        Python path serves whatever it leaves."""
        plane = self._rx_plane
        if plane is None:
            if self._no_rx_plane:
                return None
            module = net_rx_plane.PLANE.module_for_a_device()
            if module is None:
                self._no_rx_plane = True
                return None
            plane = self._rx_plane = net_rx_plane.ReceivePlane(
                module, dma, self._fd, self._rx_view, vnet=self._vnet, hdr_len=HDR_LEN, min_frame=MIN_FRAME,
                max_frame=MAX_FRAME)
        received, self._rx_len = plane.serve(queue, dma, self._rx_len, budget, mergeable=self._mrg,
                                             guest_csum=bool(self._guest_offloads & F_GUEST_CSUM))
        self.rx_frames += received.frames
        self.rx_bytes += received.bytes - received.frames * HDR_LEN
        return received

    def _drop_bad_frame(self, total: int) -> None:
        self.rx_dropped += 1
        log.log("guest_errors", f"virtio-net: dropped a {total - HDR_LEN}-byte frame from the backend "
                                f"(not {MIN_FRAME}..{MAX_FRAME} bytes)")

    def _read_frame(self) -> bool | None:
        """One frame from the backend into the host buffer: True when one is pending, False when one was
        read and dropped, None when there is none now (or the backend failed)."""
        while True:
            try:
                count = os.readv(self._fd, [self._rx_read_view])
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError as exc:
                self._backend_failure(f"read: {exc.strerror}")
                return None
            break
        if count == 0:
            self._backend_failure("the backend closed (end of file)")
            return None
        total = count + (0 if self._vnet else HDR_LEN)
        if total > HDR_LEN + MAX_FRAME or total < HDR_LEN + MIN_FRAME:
            self._drop_bad_frame(total)
            return False
        if not self._vnet:
            self._rx_view[:HDR_LEN] = bytes(HDR_LEN)
        self._rx_len = total
        return True

    def _deliver(self, queue: Virtqueue, dma: DmaMemory) -> _Outcome:
        total = self._rx_len
        chains: list[DescriptorChain] = []
        capacity = 0
        while capacity < total:
            chain = queue.pop(dma)
            if chain is None:
                break
            room = chain.writable_length
            if room < HDR_LEN:
                raise VirtqueueError(queue.index, f"receive buffer {chain.head} has {room} device-writable "
                                                  f"bytes, less than the {HDR_LEN}-byte header")
            chains.append(chain)
            capacity += room
            if not self._mrg:
                break
        if capacity < total:
            queue.unpop(len(chains))
            if chains and (not self._mrg or len(chains) >= queue.size):
                # Nothing the driver can post would hold it: drop it, keep the buffers for the next frame.
                self._rx_len = 0
                self.rx_dropped += 1
                log.log("guest_errors", f"virtio-net: dropped a {total - HDR_LEN}-byte frame: larger than the "
                                        f"receive buffers ({capacity} bytes in {len(chains)} "
                                        f"{'merged ' if self._mrg else ''}buffer(s))")
                return _Outcome.DROPPED
            return _Outcome.WAIT
        frame = self._rx_view[:total]
        struct.pack_into("<H", frame, 10, len(chains))  # num_buffers
        if not self._guest_offloads & F_GUEST_CSUM:
            frame[0] = 0  # without GUEST_CSUM the driver must see flags == 0 (virtio 1.x 5.1.6.4.1)
        entries: list[tuple[DescriptorChain, int]] = []
        offset = 0
        for chain in chains:
            take = min(chain.writable_length, total - offset)
            for view in dma.views(chain.ranges(writable=True, length=take)):
                size = view.nbytes
                view[:] = frame[offset : offset + size]
                offset += size
            entries.append((chain, take))
        if len(entries) == 1:
            queue.push(dma, chains[0], entries[0][1])
        else:
            queue.push_many(dma, entries)
        self._rx_len = 0
        self.rx_frames += 1
        self.rx_bytes += total - HDR_LEN
        return _Outcome.DELIVERED

    def _watch(self) -> None:
        """Wake the receive queue when the backend has a frame (on the I/O thread)."""
        if self._watching or self._backend_failed or self._iothread is None:
            return
        self._iothread.add_reader(self.backend, self._backend_readable, self._watch_failed)
        self._watching = True

    def _backend_readable(self) -> None:
        """One-shot: stop watching (the queue decides whether to watch again) and serve the queue."""
        if self._watching and self._iothread is not None:
            self._iothread.remove_reader(self.backend)
            self._watching = False
        if self.context is not None:
            self.context.kick_queue(RX)

    def _watch_failed(self, exc: BaseException) -> None:
        self._backend_failure(f"{type(exc).__name__}: {exc}")

    def _backend_failure(self, reason: str) -> None:
        """A host-side failure of the backend: warn once and stop touching it; the guest sees a NIC that
        no longer receives (frames it sends are counted as errors)."""
        if not self._backend_failed:
            self._backend_failed = True
            host_warning(f"virtio-net ({self.config.netdev or 'backend'}): {reason}; the NIC stops receiving")

    # -- receive offloads -------------------------------------------------------------------------------------
    def _set_guest_offloads(self, bits: int) -> bool:
        """Tell the TAP which offloaded frames the guest accepts; False when the TAP refused."""
        offload = Offload.NONE
        for bit, flag in _TAP_OFFLOAD.items():
            if bits & bit:
                offload |= flag
        try:
            self.backend.set_offload(offload)
        except NetError as exc:
            host_warning(f"virtio-net ({self.config.netdev or 'backend'}): {exc}")
            return False
        self._guest_offloads = bits
        return True

    # -- control queue ----------------------------------------------------------------------------------------
    def _process_ctrl(self, queue: Virtqueue) -> None:
        assert self.context is not None
        dma = self.context.dma
        served = 0
        try:
            while True:
                chain = queue.pop(dma)
                if chain is None:
                    return
                if chain.readable_length < 2 or chain.writable_length < 1:
                    raise VirtqueueError(queue.index, f"control command {chain.head} lacks its 2-byte header "
                                                      "or its 1-byte acknowledgement")
                klass, command = chain.read(dma, 0, 2)
                ack = self._control(klass, command, chain, dma)
                chain.write(dma, bytes([ack]))
                queue.push(dma, chain, 1)
                served += 1
        finally:
            if served:
                self.context.notify_queue(queue)

    def _control(self, klass: int, command: int, chain: DescriptorChain, dma: DmaMemory) -> int:
        features = self.context.driver_features if self.context is not None else 0
        payload_length = chain.readable_length - 2
        if klass == CTRL_MAC and command == CTRL_MAC_ADDR_SET and features & F_CTRL_MAC_ADDR:
            if payload_length != 6:
                return CTRL_ERR
            mac = chain.read(dma, 2, 6)
            if mac[0] & 1:
                return CTRL_ERR
            self.mac = mac
            return CTRL_OK
        if (klass == CTRL_GUEST_OFFLOADS_CLASS and command == CTRL_GUEST_OFFLOADS_SET
                and features & F_CTRL_GUEST_OFFLOADS):
            if payload_length != 8:
                return CTRL_ERR
            (bits,) = struct.unpack("<Q", chain.read(dma, 2, 8))
            if bits & ~(features & GUEST_OFFLOADS):
                return CTRL_ERR  # only offloads negotiated at start-up may be switched (virtio 1.x 5.1.6.5.6.1)
            return CTRL_OK if self._set_guest_offloads(bits) else CTRL_ERR
        log.log("unimp", f"virtio-net: control command class {klass} command {command} is not supported")
        return CTRL_ERR

    # -- state ------------------------------------------------------------------------------------------------
    def state(self) -> VirtioNetState:
        return VirtioNetState(mac=format_mac(self.mac), link_up=self.link_up, guest_offloads=self._guest_offloads)

    def from_state(self, state: DeviceState) -> None:
        saved = check_state(self.name, state, VirtioNetState)
        try:
            mac = parse_mac(saved.mac)
        except ConfigError as exc:
            raise StateError(self.name, f"mac: {exc}") from None
        if saved.guest_offloads & ~(self.device_features() & GUEST_OFFLOADS):
            raise StateError(self.name, f"guest_offloads {saved.guest_offloads:#x} include offloads this "
                                        "device does not offer")
        if not isinstance(saved.link_up, bool):
            raise StateError(self.name, "link_up must be a boolean")
        self.mac = mac
        self.link_up = saved.link_up
        self._set_guest_offloads(saved.guest_offloads)
