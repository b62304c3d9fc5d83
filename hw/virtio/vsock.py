"""virtio-vsock (virtio 1.x section 5.10): AF_VSOCK stream sockets between the guest and host programs.

Spelling: ``-device vhost-vsock-device,guest-cid=3,uds-path=/tmp/vm.vsock[,id=ID][,iothread=IO]``. The
device name and ``guest-cid`` are QEMU's; ``uds-path`` is pyemu's own property: QEMU hands the data path
to the host kernel's vhost-vsock (host programs then use AF_VSOCK with the guest's CID), pyemu keeps it in
userspace and offers the host side as Unix sockets in Firecracker's convention
(:mod:`pyemu.hw.virtio.vsock_host`): connect to ``uds-path`` and send ``CONNECT <port>\\n`` to reach a
guest listener (the answer is ``OK <host port>\\n``), listen on ``<uds-path>_<port>`` to be reached by
a guest ``connect(2, port)``. No host module, no host-wide CID to allocate, no root.

The device: three queues (rx: the driver's empty buffers for packets to the guest; tx: the guest's
packets; event: buffers for transport events), a configuration space with the 64-bit guest CID, and
packets made of a 44-byte little-endian header (:class:`PacketHeader`) and a payload. Connections are
identified by (host port, guest port); the host is CID 2.

Flow control is credit based in both directions, and it is what keeps memory bounded and the I/O thread
idle when nothing can move:

* guest -> host: every packet to the guest announces ``buf_alloc`` (:data:`CONN_TX_BUF_SIZE`) and
  ``fwd_cnt`` (bytes written to the host socket). Data the host socket does not take at once waits in the
  connection's buffer, which the guest's credit bounds to ``buf_alloc`` (a guest that sends beyond its
  credit gets its connection reset). As the host drains it, a CREDIT_UPDATE tells the guest.
* host -> guest: the guest announces its ``buf_alloc`` / ``fwd_cnt``; the device never sends more than
  ``buf_alloc - (sent - fwd_cnt)`` and never reads more from a host socket than the rx buffer and that
  credit hold. While the guest has no credit or no rx buffers for it the host socket is not even watched
  for reading (the host's writes block in its own socket buffer: nothing is read and then dropped, and
  nothing wakes the I/O thread in vain). Out of credit, the device asks once with CREDIT_REQUEST.

Guest mistakes are logged (``-d guest_errors``) and answered with an RST (or dropped when there is nobody
to answer, e.g. a wrong source CID); a malformed packet never marks the whole device broken, since other
connections may be healthy. Only ring-level corruption (the transport's checks) does.

Connection life cycle (host-initiated on the left, guest-initiated on the right)::

    CONNECT line -> LOCAL_INIT --REQUEST--> guest     guest --REQUEST--> connect(uds_P) -> PEER_INIT
    guest RESPONSE -> ESTABLISHED, "OK <port>"        RESPONSE to guest -> ESTABLISHED
    guest RST / timeout -> host socket closed         nobody at uds_P -> RST to guest

Shutdown is half-close aware: EOF from the host becomes SHUTDOWN(SEND) (the guest can still answer);
SHUTDOWN(SEND) from the guest becomes ``shutdown(SHUT_WR)`` on the host socket once buffered data is out;
when both directions are finished the host socket is closed and the guest gets the RST it waits for.

Reset: a driver reset (or machine reset) closes every connection's host socket; the listener stays.
:meth:`VirtioVsock.transport_reset` is for the case where connections vanish while the driver runs (a
restore from a snapshot, a CID change): it closes them and posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
after which Linux resets its sockets and re-reads the CID.

Threads: queues are served on the device's I/O thread (holding the queue's lock); host sockets are served
by the muxer on the same thread (``attach_iothread``). The device lock serialises those with ``reset`` and
``activate`` (vCPU threads). Work for the rx or event queue found elsewhere is handed over with
``kick_queue``, so the device never holds two queue locks.
"""

from __future__ import annotations

import enum
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pyemu.errors import ConfigError
from pyemu.hw.virtio.device import ID_VSOCK, VirtioDevice, pack_config
from pyemu.hw.virtio.queue import DescriptorChain, Virtqueue
from pyemu.hw.virtio.vsock_host import (
    SUN_PATH_MAX,
    HostConnectError,
    HostMuxer,
)
from pyemu.system import log
from pyemu.system.iothread import IoThread

# -- protocol constants (virtio 1.x 5.10, <linux/virtio_vsock.h>) --------------------------------------------
RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZE = 256
F_STREAM = 1 << 0
"""VIRTIO_VSOCK_F_STREAM (virtio 1.2). Stream is the only type here; drivers that predate the bit (Linux
6.1) ignore it and assume stream, as the spec says a device must when no type bit is negotiated."""

HOST_CID = 2
CID_ANY = 0xFFFFFFFF
TYPE_STREAM = 1
OP_INVALID, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(8)
OP_NAMES = {OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE", OP_RST: "RST", OP_SHUTDOWN: "SHUTDOWN",
            OP_RW: "RW", OP_CREDIT_UPDATE: "CREDIT_UPDATE", OP_CREDIT_REQUEST: "CREDIT_REQUEST"}
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
EVENT_TRANSPORT_RESET = 0

HEADER = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HEADER.size  # 44
MAX_PKT_PAYLOAD = 64 * 1024
"""VIRTIO_VSOCK_MAX_PKT_BUF_SIZE: the largest payload Linux sends, and the most we put in one packet."""

# -- policy ---------------------------------------------------------------------------------------------------
CONN_TX_BUF_SIZE = 256 * 1024
"""Our buf_alloc per connection: the most guest data we hold for a host socket that does not keep up
(Linux's default socket buffer, and Firecracker's)."""
CREDIT_UPDATE_THRESHOLD = CONN_TX_BUF_SIZE // 4
"""Tell the guest about drained buffer space once this much was forwarded since it last heard from us.
Must not exceed CONN_TX_BUF_SIZE, or a guest that used all its credit would wait forever."""
MAX_CONNECTIONS = 1024
"""Open connections (each holds a host socket) plus RSTs waiting for an rx buffer."""
CONTROL_QUEUE_LIMIT = 256
"""RSTs for packets that match no connection, waiting for rx buffers; beyond this they are dropped (a
guest flooding stray packets while posting no rx buffers must not grow our memory)."""
CONN_REQUEST_TIMEOUT = 10.0
"""Seconds the guest has to answer a host-initiated REQUEST (Firecracker uses 2 s; a guest under the
software CPU is slower)."""
CONN_SHUTDOWN_TIMEOUT = 10.0
"""Seconds a closing connection may wait for its host socket to take buffered data."""

U32 = 0xFFFFFFFF


class ConnState(enum.Enum):
    LOCAL_INIT = "local-init"  # host connected, REQUEST to the guest pending or sent
    PEER_INIT = "peer-init"  # guest REQUEST accepted by a host listener, RESPONSE pending
    ESTABLISHED = "established"


class Pending(enum.IntFlag):
    """What a connection still has to tell the guest, in delivery priority order."""

    NONE = 0
    RESPONSE = 1
    REQUEST = 2
    RW = 4  # host data (or EOF) may be waiting on the host socket
    CREDIT_REQUEST = 8
    CREDIT_UPDATE = 16


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """``struct virtio_vsock_hdr``: 44 bytes, little-endian, packed."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                           self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, data: bytes) -> PacketHeader:
        return cls(*HEADER.unpack(data))

    def describe(self) -> str:
        op = OP_NAMES.get(self.op, f"op {self.op}")
        return (f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} len {self.len} "
                f"type {self.type} flags {self.flags:#x}")


@dataclass(frozen=True)
class VsockConfig:
    """``guest-cid`` and ``uds-path``, validated (QEMU's messages for the CID)."""

    guest_cid: int
    uds_path: str

    def __post_init__(self) -> None:
        if self.guest_cid <= HOST_CID:
            raise ConfigError("vhost-vsock-device: guest-cid property must be greater than 2", option="-device")
        if self.guest_cid >= CID_ANY:
            raise ConfigError("vhost-vsock-device: guest-cid property must be a 32-bit number below "
                              f"{CID_ANY:#x} (VMADDR_CID_ANY)", option="-device")
        if not self.uds_path:
            raise ConfigError("vhost-vsock-device: Property 'uds-path' is required (pyemu serves vsock "
                              "through Unix sockets, not the host's vhost-vsock)", option="-device")
        if len(self.uds_path.encode()) > SUN_PATH_MAX:
            raise ConfigError(f"vhost-vsock-device: uds-path '{self.uds_path}' is longer than "
                              f"{SUN_PATH_MAX} bytes, the limit of a Unix socket path", option="-device")


class VsockConnection:
    """One stream: the protocol state, both credit counters and the host socket.

    Methods run under the device lock; they report what changed through the device (``_schedule``,
    ``_kill``) so the device keeps the lists of connections with work.
    """

    def __init__(self, device: VirtioVsock, sock: socket.socket, local_port: int, peer_port: int,
                 state: ConnState) -> None:
        self.device = device
        self.sock = sock
        self.local_port = local_port
        self.peer_port = peer_port
        self.state = state
        self.pending = Pending.NONE
        self.guest_knows = state is ConnState.PEER_INIT  # did the guest see this connection yet?
        # guest -> host
        self.tx_buf = bytearray()
        self.tx_uncounted = 0  # leading tx_buf bytes that are ours ("OK n\n"), not guest data
        self.fwd_cnt = 0
        self.last_fwd_cnt_to_peer = 0
        # host -> guest
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.rx_cnt = 0
        self.credit_requested = False
        # shutdown
        self.peer_shutdown = 0  # SHUTDOWN_* flags the guest sent
        self.host_eof = False  # the host socket delivered EOF (we sent SHUTDOWN(SEND))
        self.host_shut_wr = False
        self.expiry: float | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    # -- credit -------------------------------------------------------------------------------------------
    def peer_credit(self) -> int:
        """Bytes the guest can take now: its buf_alloc minus what it has not yet consumed."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def take_peer_credit(self, header: PacketHeader) -> None:
        self.peer_buf_alloc = header.buf_alloc
        self.peer_fwd_cnt = header.fwd_cnt
        self.credit_requested = False

    def wants_read(self) -> bool:
        """Should the host socket be watched for data? Only when what it yields can go to the guest."""
        return (self.state is ConnState.ESTABLISHED and not self.host_eof
                and not self.peer_shutdown & SHUTDOWN_RCV and not self.pending & Pending.RW
                and self.peer_credit() > 0)

    def update_interest(self) -> None:
        self.device.muxer.set_interest(self.sock, read=self.wants_read(), write=bool(self.tx_buf))

    # -- host socket events (muxer) -----------------------------------------------------------------------
    def host_readable(self) -> None:
        # Do not read here: the data goes straight from the socket into an rx buffer when there is one.
        self.pending |= Pending.RW
        self.update_interest()
        self.device._schedule(self)

    def host_writable(self) -> None:
        self.flush()
        self.device._after_progress(self)

    # -- guest -> host ------------------------------------------------------------------------------------
    def forward(self, views: list[memoryview], length: int) -> bool:
        """Write ``length`` guest bytes to the host socket, buffering what it does not take.
        False: the guest exceeded its credit, or the host socket is gone (caller resets)."""
        if len(self.tx_buf) - self.tx_uncounted + length > CONN_TX_BUF_SIZE:
            log.log("guest_errors", f"vsock: guest port {self.peer_port} sent {length} bytes with "
                                    f"{CONN_TX_BUF_SIZE - len(self.tx_buf) + self.tx_uncounted} bytes of "
                                    "credit; resetting the connection")
            return False
        sent = 0
        if not self.tx_buf:
            try:
                sent = self.sock.sendmsg(views, [], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return False
            self.fwd_cnt = (self.fwd_cnt + sent) & U32
        if sent < length:
            skip = sent
            for view in views:
                if skip >= len(view):
                    skip -= len(view)
                    continue
                self.tx_buf += view[skip:]
                skip = 0
        return True

    def flush(self) -> bool:
        """Write buffered data to the host socket; False if the socket is gone."""
        while self.tx_buf:
            try:
                sent = self.sock.send(self.tx_buf, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.device._kill(self, "the host socket refused data")
                return False
            del self.tx_buf[:sent]
            counted = max(0, sent - self.tx_uncounted)
            self.tx_uncounted = max(0, self.tx_uncounted - sent)
            self.fwd_cnt = (self.fwd_cnt + counted) & U32
        return True


@dataclass
class VsockStats:
    """Counters for tests and ``info`` style output."""

    connections: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    resets_sent: int = 0
    dropped: int = 0


class VirtioVsock(VirtioDevice):
    device_id = ID_VSOCK
    name = "vhost-vsock-device"

    def __init__(self, config: VsockConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__((QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE))
        self.config = config
        self.guest_cid = config.guest_cid
        self._clock = clock
        self._lock = threading.RLock()
        self._conns: dict[tuple[int, int], VsockConnection] = {}
        self._ready: dict[tuple[int, int], None] = {}  # connections with something for the guest (FIFO)
        self._control: deque[PacketHeader] = deque()  # header-only packets for no connection (RSTs)
        self._event_pending = False
        self._next_local_port = 1 << 30  # Firecracker's first host-side port
        self._iothread: IoThread | None = None
        self._timer: threading.Timer | None = None
        self._timer_deadline: float | None = None
        self._closed = False
        self.stats = VsockStats()
        self.muxer = HostMuxer(config.uds_path, self, self._lock)

    # -- description --------------------------------------------------------------------------------------
    def device_features(self) -> int:
        return F_STREAM

    def config_bytes(self) -> bytes:
        return pack_config("Q", self.guest_cid)

    # -- life cycle ---------------------------------------------------------------------------------------
    def attach_iothread(self, iothread: IoThread) -> None:
        """Serve host sockets on ``iothread`` (the one serving the queues). The plug code calls this right
        after creating the transport; until then host programs can connect but wait."""
        self._iothread = iothread
        self.muxer.attach(iothread)

    def activate(self, queues: list[Virtqueue]) -> None:
        with self._lock:
            super().activate(queues)
            self._kick_rx_if_work()
            if self._event_pending:
                self._kick(EVENT_QUEUE)

    def reset(self) -> None:
        """The driver's rings are gone, so are its sockets: close every host side (no RSTs to send)."""
        with self._lock:
            for conn in list(self._conns.values()):
                self._drop(conn)
            self._control.clear()
            self._ready.clear()
            self._event_pending = False
            self._cancel_timer()

    def transport_reset(self) -> None:
        """Connections vanished under a running driver (snapshot restore, CID change): close them all and
        post VIRTIO_VSOCK_EVENT_TRANSPORT_RESET so the guest resets its sockets and re-reads its CID."""
        with self._lock:
            for conn in list(self._conns.values()):
                self._drop(conn)
            self._control.clear()
            self._ready.clear()
            self._event_pending = True
            self._kick(EVENT_QUEUE)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cancel_timer()
            for conn in list(self._conns.values()):
                self._drop(conn)
        self.muxer.close()

    # -- queue service (I/O thread, holding the queue's lock) ---------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
        with self._lock:
            if queue.index == TX_QUEUE:
                self._process_tx(queue)
            elif queue.index == RX_QUEUE:
                self._process_rx(queue)
            elif queue.index == EVENT_QUEUE:
                self._process_event(queue)

    def _process_tx(self, queue: Virtqueue) -> None:
        assert self.context is not None
        dma = self.context.dma
        served = 0
        while True:
            chain = queue.pop(dma)
            if chain is None:
                break
            try:
                self._handle_tx(chain)
            finally:
                queue.push(dma, chain, 0)
                served += 1
        if served:
            self.context.notify_queue(queue)
        self._kick_rx_if_work()

    def _process_rx(self, queue: Virtqueue) -> None:
        assert self.context is not None
        dma = self.context.dma
        served = 0
        # Look for work before taking a buffer: a popped buffer cannot be given back unused.
        while queue.has_work(dma):
            item = self._next_rx()
            if item is None:
                break
            chain = queue.pop(dma)
            if chain is None:
                break
            if chain.writable_length < HDR_SIZE:
                log.log("guest_errors", f"vsock: rx buffer of {chain.writable_length} bytes cannot hold a "
                                        f"{HDR_SIZE}-byte header; skipped")
                queue.push(dma, chain, 0)
                served += 1
                continue
            written = self._emit(item, chain)
            queue.push(dma, chain, written)
            served += 1
        if served:
            self.context.notify_queue(queue)

    def _process_event(self, queue: Virtqueue) -> None:
        assert self.context is not None
        if not self._event_pending:
            return
        dma = self.context.dma
        chain = queue.pop(dma)
        if chain is None:
            return  # delivered when the driver offers an event buffer (it kicks)
        if chain.writable_length < 4:
            log.log("guest_errors", f"vsock: event buffer of {chain.writable_length} bytes is too small")
            queue.push(dma, chain, 0)
        else:
            chain.write(dma, struct.pack("<I", EVENT_TRANSPORT_RESET))
            queue.push(dma, chain, 4)
            self._event_pending = False
        self.context.notify_queue(queue)

    # -- guest packets --------------------------------------------------------------------------------------
    def _handle_tx(self, chain: DescriptorChain) -> None:
        assert self.context is not None
        dma = self.context.dma
        self.stats.tx_packets += 1
        if chain.readable_length < HDR_SIZE:
            self._drop_packet(f"tx buffer of {chain.readable_length} bytes is shorter than a header")
            return
        hdr = PacketHeader.unpack(chain.read(dma, 0, HDR_SIZE))
        if hdr.src_cid != self.guest_cid:
            self._drop_packet(f"source CID {hdr.src_cid} is not the guest's {self.guest_cid}: {hdr.describe()}")
            return
        problem = None
        if hdr.op not in OP_NAMES:
            problem = "unknown operation"
        elif hdr.type != TYPE_STREAM:
            problem = "socket type is not stream"
        elif hdr.dst_cid != HOST_CID:
            problem = "destination is not the host (CID 2)"
        elif hdr.len > chain.readable_length - HDR_SIZE:
            problem = f"payload runs past the {chain.readable_length - HDR_SIZE} bytes of the buffer"
        elif hdr.len > MAX_PKT_PAYLOAD:
            problem = f"payload is larger than {MAX_PKT_PAYLOAD} bytes"
        elif hdr.len and hdr.op != OP_RW:
            problem = "a control packet carries a payload"
        key = (hdr.dst_port, hdr.src_port)
        conn = self._conns.get(key)
        if problem is not None:
            log.log("guest_errors", f"vsock: bad packet from the guest ({problem}): {hdr.describe()}")
            if hdr.op == OP_RST:
                self.stats.dropped += 1
                if conn is not None:
                    self._drop(conn)
            elif conn is not None:
                self._kill(conn, problem)
            else:
                self._queue_rst(hdr)
            return
        if conn is None:
            if hdr.op == OP_REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != OP_RST:
                self._queue_rst(hdr)  # a connection we do not know (never existed, or already closed)
            return
        conn.take_peer_credit(hdr)
        op = hdr.op
        if op == OP_RST:
            self._drop(conn)
            return
        if op == OP_RESPONSE:
            if conn.state is not ConnState.LOCAL_INIT or not conn.guest_knows:
                self._kill(conn, "unexpected RESPONSE")
                return
            self._established_by_guest(conn)
        elif op == OP_REQUEST:
            self._kill(conn, "REQUEST for a connection that exists")
            return
        elif op == OP_SHUTDOWN:
            conn.peer_shutdown |= hdr.flags & SHUTDOWN_BOTH
        elif op == OP_RW:
            if conn.state is not ConnState.ESTABLISHED or conn.peer_shutdown & SHUTDOWN_SEND:
                self._kill(conn, "data on a connection that is not open for it")
                return
            if hdr.len:
                views = chain.views(dma, writable=False, start=HDR_SIZE, length=hdr.len)
                if not conn.forward(views, hdr.len):
                    self._kill(conn, "guest data could not be forwarded")
                    return
                self.stats.tx_bytes += hdr.len
        elif op == OP_CREDIT_REQUEST:
            conn.pending |= Pending.CREDIT_UPDATE
        # OP_CREDIT_UPDATE: the credit above is all it carries.
        self._after_progress(conn)

    def _drop_packet(self, why: str) -> None:
        self.stats.dropped += 1
        log.log("guest_errors", f"vsock: dropped a packet from the guest: {why}")

    def _guest_connect(self, hdr: PacketHeader) -> None:
        if len(self._conns) + len(self._control) >= MAX_CONNECTIONS:
            log.log("guest_errors", f"vsock: {MAX_CONNECTIONS} connections open; refusing guest port "
                                    f"{hdr.src_port} -> host port {hdr.dst_port}")
            self._queue_rst(hdr)
            return
        try:
            sock = self.muxer.connect_port(hdr.dst_port)
        except HostConnectError as exc:
            log.log("guest_errors", f"{exc}; guest connection from port {hdr.src_port} refused")
            self._queue_rst(hdr)
            return
        conn = VsockConnection(self, sock, hdr.dst_port, hdr.src_port, ConnState.PEER_INIT)
        conn.take_peer_credit(hdr)
        self._add(conn)
        conn.pending |= Pending.RESPONSE
        self._schedule(conn)

    def _established_by_guest(self, conn: VsockConnection) -> None:
        """The guest accepted a host-initiated connection: tell the host program which port it got."""
        conn.state = ConnState.ESTABLISHED
        conn.expiry = None
        line = b"OK %d\n" % conn.local_port
        try:
            sent = conn.sock.send(line, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._kill(conn, "the host program went away before the guest accepted")
            return
        if sent < len(line):
            conn.tx_buf[:0] = line[sent:]
            conn.tx_uncounted += len(line) - sent

    def _after_progress(self, conn: VsockConnection) -> None:
        """After anything that moved data or changed state: finish closing, credit updates, interest."""
        if self._conns.get(conn.key) is not conn:
            return
        if conn.peer_shutdown & SHUTDOWN_SEND and not conn.tx_buf and not conn.host_shut_wr:
            conn.host_shut_wr = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self._finished(conn):
            self._kill(conn, None)
            return
        if conn.peer_shutdown == SHUTDOWN_BOTH and conn.expiry is None:
            conn.expiry = self._clock() + CONN_SHUTDOWN_TIMEOUT
            self._arm_timer()
        if (conn.fwd_cnt - conn.last_fwd_cnt_to_peer) & U32 >= CREDIT_UPDATE_THRESHOLD:
            conn.pending |= Pending.CREDIT_UPDATE
        if conn.state is ConnState.ESTABLISHED:
            conn.update_interest()
        if conn.pending:
            self._schedule(conn)

    @staticmethod
    def _finished(conn: VsockConnection) -> bool:
        """Both directions are done: the guest said it sends no more and everything it sent is out, and
        either the guest receives no more or the host sent EOF (reported to the guest)."""
        if not conn.peer_shutdown & SHUTDOWN_SEND or conn.tx_buf:
            return False
        return bool(conn.peer_shutdown & SHUTDOWN_RCV) or (conn.host_eof and not conn.pending & Pending.RW)

    # -- host connections (muxer) ---------------------------------------------------------------------------
    def host_connect(self, sock: socket.socket, port: int) -> bool:
        """A host program asked for guest ``port`` (``CONNECT <port>``): send the guest a REQUEST."""
        if self._closed or len(self._conns) + len(self._control) >= MAX_CONNECTIONS:
            log.log("guest_errors", f"vsock: too many connections; host connection to port {port} refused")
            return False
        local_port = self._allocate_local_port(port)
        conn = VsockConnection(self, sock, local_port, port, ConnState.LOCAL_INIT)
        self._add(conn)
        conn.pending |= Pending.REQUEST
        self._schedule(conn)
        return True

    def _allocate_local_port(self, peer_port: int) -> int:
        while True:
            port = self._next_local_port
            self._next_local_port = port + 1 if port < U32 - 1 else 1 << 30
            if (port, peer_port) not in self._conns:
                return port

    # -- connection table ---------------------------------------------------------------------------------
    def _add(self, conn: VsockConnection) -> None:
        self._conns[conn.key] = conn
        self.muxer.watch(conn.sock, conn)
        self.stats.connections += 1

    def _drop(self, conn: VsockConnection) -> None:
        """Forget ``conn`` and close its host socket, telling the guest nothing."""
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._ready.pop(conn.key, None)
        self.muxer.forget(conn.sock)

    def _kill(self, conn: VsockConnection, why: str | None) -> None:
        """Close ``conn`` and send the guest an RST if it knows the connection (``why`` is logged)."""
        if why:
            log.log("guest_errors", f"vsock: resetting host port {conn.local_port} <-> guest port "
                                    f"{conn.peer_port}: {why}")
        self._drop(conn)
        if conn.guest_knows:
            self._control.append(self._header(conn.local_port, conn.peer_port, OP_RST))
            self._kick_rx_if_work()

    def _queue_rst(self, hdr: PacketHeader) -> None:
        """An RST answering ``hdr`` (a guest packet that matches no connection)."""
        if len(self._control) >= CONTROL_QUEUE_LIMIT:
            self.stats.dropped += 1
            log.log("guest_errors", f"vsock: {CONTROL_QUEUE_LIMIT} RSTs already wait for rx buffers; not "
                                    f"answering {hdr.describe()}")
            return
        self._control.append(self._header(hdr.dst_port, hdr.src_port, OP_RST))
        self._kick_rx_if_work()

    def _schedule(self, conn: VsockConnection) -> None:
        if conn.pending and self._conns.get(conn.key) is conn:
            self._ready.setdefault(conn.key, None)
            self._kick(RX_QUEUE)

    # -- packets to the guest -------------------------------------------------------------------------------
    def _header(self, local_port: int, peer_port: int, op: int, *, length: int = 0, flags: int = 0,
                fwd_cnt: int = 0, buf_alloc: int = CONN_TX_BUF_SIZE) -> PacketHeader:
        return PacketHeader(HOST_CID, self.guest_cid, local_port, peer_port, length, TYPE_STREAM, op, flags,
                            buf_alloc, fwd_cnt)

    def _next_rx(self) -> PacketHeader | tuple[VsockConnection, Pending] | None:
        """The next thing for the guest, without consuming it: a ready-made header, or a connection and
        the item it will send. Connections take turns (one packet each per round)."""
        if self._control:
            return self._control[0]
        while self._ready:
            key = next(iter(self._ready))
            conn = self._conns.get(key)
            item = self._pick(conn) if conn is not None else Pending.NONE
            if item:
                assert conn is not None
                return conn, item
            del self._ready[key]
        return None

    def _pick(self, conn: VsockConnection) -> Pending:
        """The highest-priority item ``conn`` can send now (may clear stale flags)."""
        if conn.pending & Pending.RESPONSE:
            return Pending.RESPONSE
        if conn.pending & Pending.REQUEST:
            return Pending.REQUEST
        if conn.pending & Pending.RW:
            if conn.state is not ConnState.ESTABLISHED or conn.peer_shutdown & SHUTDOWN_RCV or conn.host_eof:
                conn.pending &= ~Pending.RW
            elif conn.peer_credit() == 0:
                conn.pending &= ~Pending.RW
                if not conn.credit_requested:
                    conn.credit_requested = True
                    conn.pending |= Pending.CREDIT_REQUEST
            else:
                try:
                    conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    conn.pending &= ~Pending.RW  # nothing after all; watch the socket again
                    conn.update_interest()
                except OSError:
                    return Pending.RW  # the read in _emit reports the error
                else:
                    return Pending.RW  # data or EOF: either way a packet
        if conn.pending & Pending.CREDIT_REQUEST:
            return Pending.CREDIT_REQUEST
        if conn.pending & Pending.CREDIT_UPDATE:
            return Pending.CREDIT_UPDATE
        return Pending.NONE

    def _emit(self, item: PacketHeader | tuple[VsockConnection, Pending], chain: DescriptorChain) -> int:
        """Write the packet for ``item`` into ``chain``; returns the bytes written."""
        assert self.context is not None
        dma = self.context.dma
        self.stats.rx_packets += 1
        if isinstance(item, PacketHeader):
            self._control.popleft()
            if item.op == OP_RST:
                self.stats.resets_sent += 1
            chain.write(dma, item.pack())
            return HDR_SIZE
        conn, what = item
        length, flags = 0, 0
        if what is Pending.RESPONSE:
            op = OP_RESPONSE
            conn.state = ConnState.ESTABLISHED
        elif what is Pending.REQUEST:
            op = OP_REQUEST
            conn.guest_knows = True
            conn.expiry = self._clock() + CONN_REQUEST_TIMEOUT
            self._arm_timer()
        elif what is Pending.RW:
            room = min(chain.writable_length - HDR_SIZE, conn.peer_credit(), MAX_PKT_PAYLOAD)
            if room <= 0:
                op = OP_CREDIT_UPDATE  # a header-only rx buffer: say something harmless, keep RW
            else:
                views = chain.views(dma, writable=True, start=HDR_SIZE, length=room)
                try:
                    length = conn.sock.recvmsg_into(views, 0, socket.MSG_DONTWAIT)[0]
                except (BlockingIOError, InterruptedError):
                    length, op = -1, OP_CREDIT_UPDATE
                except OSError as exc:
                    log.log("guest_errors", f"vsock: host socket of port {conn.local_port} failed: {exc.strerror}")
                    self._drop(conn)
                    self.stats.resets_sent += 1
                    chain.write(dma, self._header(conn.local_port, conn.peer_port, OP_RST).pack())
                    return HDR_SIZE
                if length > 0:
                    op = OP_RW
                    conn.rx_cnt = (conn.rx_cnt + length) & U32
                    self.stats.rx_bytes += length
                elif length == 0:
                    # EOF: the host sends no more. The guest may still answer (half-close).
                    op, flags = OP_SHUTDOWN, SHUTDOWN_SEND
                    conn.host_eof = True
                    conn.pending &= ~Pending.RW
                else:
                    length = 0
                    conn.pending &= ~Pending.RW
        elif what is Pending.CREDIT_REQUEST:
            op = OP_CREDIT_REQUEST
        else:
            op = OP_CREDIT_UPDATE
        # RW stays pending while the socket may hold more (the next _pick peeks); every packet carries our
        # fwd_cnt, so any of them is also the credit update.
        if what is not Pending.RW:
            conn.pending &= ~what
        conn.pending &= ~Pending.CREDIT_UPDATE
        conn.last_fwd_cnt_to_peer = conn.fwd_cnt
        chain.write(dma, self._header(conn.local_port, conn.peer_port, op, length=length, flags=flags,
                                      fwd_cnt=conn.fwd_cnt).pack())
        # Round robin: this connection goes to the back of the line.
        self._ready.pop(conn.key, None)
        self._after_progress(conn)
        if conn.pending:
            self._schedule(conn)
        return HDR_SIZE + length

    # -- timers -------------------------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        deadline = min((c.expiry for c in self._conns.values() if c.expiry is not None), default=None)
        if deadline is None or self._iothread is None or self._closed:
            return
        if self._timer is not None and self._timer_deadline is not None and self._timer_deadline <= deadline:
            return
        self._cancel_timer()
        iothread = self._iothread
        self._timer_deadline = deadline
        self._timer = threading.Timer(max(0.0, deadline - self._clock()) + 0.01,
                                      lambda: iothread.call_soon(self._expire, self._timer_failed))
        self._timer.daemon = True
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_deadline = None

    def _timer_failed(self, exc: BaseException) -> None:
        log.log("guest_errors", f"vsock: timeout handling failed: {type(exc).__name__}: {exc}")

    def _expire(self) -> None:
        """On the I/O thread: reset connections whose handshake or close took too long."""
        with self._lock:
            self._timer = None
            self._timer_deadline = None
            now = self._clock()
            for conn in list(self._conns.values()):
                if conn.expiry is not None and conn.expiry <= now:
                    what = "the guest did not answer the connection request" \
                        if conn.state is ConnState.LOCAL_INIT else "the host socket did not take the last data"
                    self._kill(conn, f"{what} within the timeout")
            self._arm_timer()

    # -- helpers ------------------------------------------------------------------------------------------
    def _kick(self, index: int) -> None:
        if self.context is not None:
            self.context.kick_queue(index)

    def _kick_rx_if_work(self) -> None:
        if self._control or self._ready:
            self._kick(RX_QUEUE)

    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)
