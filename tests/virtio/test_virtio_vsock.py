"""virtio-vsock with its Unix-socket host side, driven by the Python test driver playing Linux's
virtio_transport: handshakes both ways, data both ways under credit accounting, refused connections,
malformed packets, shutdown and reset -- all through the register window and the rings.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from pyemu.errors import ConfigError
from pyemu.hw.virtio import mmio as regs
from pyemu.hw.virtio import vsock as vs
from pyemu.hw.virtio.device import ID_VSOCK
from pyemu.hw.virtio.vsock import (
    CONN_TX_BUF_SIZE,
    HDR_SIZE,
    HOST_CID,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    PacketHeader,
    VirtioVsock,
    VsockConfig,
)
from pyemu.hw.virtio.vsock_plug import build_vhost_vsock
from pyemu.machines.device_props import PropReader
from pyemu.system.config import DeviceOptions
from pyemu.testing.virtio_driver import VirtioTestDriver

from .conftest import Rig, wait_for

GUEST_CID = 3
RX_BUF = 4096
FIRST_HOST_PORT = 1 << 30
TIMEOUT = 10.0


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for Unix sockets (pytest's tmp_path can exceed the 107-byte sun_path)."""
    path = tempfile.mkdtemp(prefix="pyemu-vsock-", dir="/tmp")
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


@dataclass
class Packet:
    hdr: PacketHeader
    payload: bytes


class GuestVsock:
    """The guest side of the protocol, as Linux 6.1's virtio_transport does it: rx buffers of a 44-byte
    header descriptor plus a 4 KiB data descriptor, tx packets as header + payload, credit in every
    packet."""

    def __init__(self, driver: VirtioTestDriver, *, rx_buffers: int = 16, buf_alloc: int = 256 * 1024,
                 event_idx: bool = False) -> None:
        self.driver = driver
        self.buf_alloc = buf_alloc
        self.fwd_cnt: dict[tuple[int, int], int] = {}  # (guest port, host port) -> bytes consumed
        self.announced: dict[tuple[int, int], int] = {}  # fwd_cnt last sent to the device
        self.rx_total: dict[tuple[int, int], int] = {}  # RW bytes received
        driver.initialise(queues={0: 64, 1: 64, 2: 8}, event_idx=event_idx)
        self.rx_heads: dict[int, tuple[int, int]] = {}
        self.pool = [(driver.buffer(HDR_SIZE), driver.buffer(RX_BUF)) for _ in range(32)]
        self.free = list(self.pool)
        self.tx_area = driver.buffer(HDR_SIZE + 64 * 1024)
        self.event_bufs: dict[int, int] = {}
        self.received: list[Packet] = []
        if rx_buffers:
            self.post_rx(rx_buffers)

    def post_rx(self, count: int) -> None:
        for _ in range(count):
            hdr, data = self.free.pop()
            head = self.driver.submit(0, [(hdr, HDR_SIZE, True), (data, RX_BUF, True)], kick=False)
            self.rx_heads[head] = (hdr, data)
        self.driver.kick(0)

    def post_events(self, count: int = 2) -> None:
        for _ in range(count):
            buf = self.driver.buffer(4)
            head = self.driver.submit(2, [(buf, 4, True)], kick=False)
            self.event_bufs[head] = buf
        self.driver.kick(2)

    def header(self, src_port: int, dst_port: int, op: int, *, length: int = 0, flags: int = 0,
               src_cid: int = GUEST_CID, dst_cid: int = HOST_CID, type_: int = TYPE_STREAM,
               buf_alloc: int | None = None) -> PacketHeader:
        self.announced[(src_port, dst_port)] = self.fwd_cnt.get((src_port, dst_port), 0)
        return PacketHeader(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags,
                            self.buf_alloc if buf_alloc is None else buf_alloc,
                            self.fwd_cnt.get((src_port, dst_port), 0))

    def send(self, hdr: PacketHeader, payload: bytes = b"", *, raw: bytes | None = None) -> None:
        """Put one packet on the tx queue and wait until the device consumed it."""
        data = raw if raw is not None else hdr.pack() + payload
        self.driver.memory.write(self.tx_area, data)
        if raw is None and payload:
            segments = [(self.tx_area, HDR_SIZE, False), (self.tx_area + HDR_SIZE, len(payload), False)]
        else:
            segments = [(self.tx_area, len(data), False)]
        self.driver.submit(1, segments)
        self.driver.wait_used(1, timeout=TIMEOUT)

    def poll(self, *, refill: bool = True) -> list[Packet]:
        got = []
        for head, written in self.driver.used(0):
            hdr_addr, data_addr = self.rx_heads.pop(head)
            assert written >= HDR_SIZE
            hdr = PacketHeader.unpack(self.driver.memory.read(hdr_addr, HDR_SIZE))
            assert written == HDR_SIZE + hdr.len, (written, hdr)
            payload = self.driver.memory.read(data_addr, hdr.len)
            if hdr.op == OP_RW:
                # The device's side of the credit rule: never more in flight than our buf_alloc.
                key = (hdr.dst_port, hdr.src_port)
                self.rx_total[key] = self.rx_total.get(key, 0) + hdr.len
                assert self.rx_total[key] - self.announced.get(key, 0) <= self.buf_alloc, hdr.describe()
            got.append(Packet(hdr, payload))
            self.free.append((hdr_addr, data_addr))
            if refill:
                self.post_rx(1)
        self.received += got
        return got

    def expect(self, count: int = 1, timeout: float = TIMEOUT, *, refill: bool = True) -> list[Packet]:
        got: list[Packet] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.poll(refill=refill)
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} of {count} packets in {timeout} s: "
                                     f"{[p.hdr.describe() for p in got]}")
            time.sleep(0.001)
        return got

    def expect_op(self, op: int, timeout: float = TIMEOUT) -> Packet:
        [packet] = self.expect(1, timeout)
        assert packet.hdr.op == op, packet.hdr.describe()
        return packet

    def quiet(self, seconds: float = 0.2) -> list[Packet]:
        """Packets arriving within ``seconds`` (expected: none)."""
        time.sleep(seconds)
        return self.poll()

    def consume(self, guest_port: int, host_port: int, count: int) -> None:
        key = (guest_port, host_port)
        self.fwd_cnt[key] = (self.fwd_cnt.get(key, 0) + count) & 0xFFFFFFFF

    def receive_stream(self, guest_port: int, host_port: int, total: int, timeout: float = TIMEOUT) -> bytes:
        """RW payloads for one connection until ``total`` bytes, consuming them (and granting credit
        back the way Linux does: with a CREDIT_UPDATE when half the buffer was consumed)."""
        data = b""
        granted_at = self.fwd_cnt.get((guest_port, host_port), 0)
        deadline = time.monotonic() + timeout
        while len(data) < total:
            for packet in self.poll():
                if packet.hdr.op == OP_RW:
                    assert (packet.hdr.dst_port, packet.hdr.src_port) == (guest_port, host_port)
                    data += packet.payload
                    self.consume(guest_port, host_port, len(packet.payload))
                elif packet.hdr.op == OP_CREDIT_REQUEST:
                    self.send(self.header(guest_port, host_port, OP_CREDIT_UPDATE))
                    granted_at = self.fwd_cnt.get((guest_port, host_port), 0)
            consumed = self.fwd_cnt.get((guest_port, host_port), 0)
            if consumed - granted_at >= self.buf_alloc // 2:
                self.send(self.header(guest_port, host_port, OP_CREDIT_UPDATE))
                granted_at = consumed
            if time.monotonic() > deadline:
                raise AssertionError(f"received {len(data)} of {total} bytes")
            time.sleep(0.0005)
        return data


@pytest.fixture
def make_vsock(rig: Rig, sockdir: str):  # type: ignore[no-untyped-def]
    def make(**guest_kw) -> tuple[VirtioVsock, GuestVsock, str]:  # type: ignore[no-untyped-def]
        uds = os.path.join(sockdir, "v.sock")
        device = VirtioVsock(VsockConfig(GUEST_CID, uds))
        transport, driver, _ = rig.plug(device)
        device.attach_iothread(rig.iothread)
        return device, GuestVsock(driver, **guest_kw), uds
    return make


def host_connect(uds: str, port: int, extra: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(uds)
    sock.sendall(b"CONNECT %d\n" % port + extra)
    return sock


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def establish_from_host(guest: GuestVsock, uds: str, port: int = 1234, extra: bytes = b"") -> tuple[socket.socket, int]:
    host = host_connect(uds, port, extra)
    request = guest.expect_op(OP_REQUEST).hdr
    local = request.src_port
    guest.send(guest.header(port, local, OP_RESPONSE))
    assert read_line(host) == b"OK %d\n" % local
    return host, local


# -- identification -----------------------------------------------------------------------------------------
def test_identity_config_and_features(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock(rx_buffers=0)
    driver = guest.driver
    assert driver.reg(regs.REG_DEVICE_ID) == ID_VSOCK == 19
    assert driver.reg(regs.REG_CONFIG) == GUEST_CID and driver.reg(regs.REG_CONFIG + 4) == 0
    assert device.read_config(0, 8) == GUEST_CID
    assert driver.device_features() & vs.F_STREAM
    for index in range(3):
        driver.set_reg(regs.REG_QUEUE_SEL, index)
        assert driver.reg(regs.REG_QUEUE_NUM_MAX) == vs.QUEUE_SIZE
    assert os.path.exists(uds) and HDR_SIZE == 44


def test_header_layout() -> None:
    hdr = PacketHeader(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    raw = hdr.pack()
    assert raw == struct.pack("<QQIIIHHIII", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10) and len(raw) == 44
    assert PacketHeader.unpack(raw) == hdr


# -- host-initiated -----------------------------------------------------------------------------------------
def test_host_connect_handshake_and_data_both_ways(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    # Data sent right after the CONNECT line is stream data: kept, and delivered only after the accept.
    host = host_connect(uds, 1234, extra=b"early bytes")
    request = guest.expect_op(OP_REQUEST).hdr
    assert (request.src_cid, request.dst_cid, request.dst_port) == (HOST_CID, GUEST_CID, 1234)
    assert request.src_port == FIRST_HOST_PORT and request.type == TYPE_STREAM
    assert request.buf_alloc == CONN_TX_BUF_SIZE and request.fwd_cnt == 0
    assert guest.quiet() == []  # nothing before the guest accepted
    local = request.src_port
    guest.send(guest.header(1234, local, OP_RESPONSE))
    assert read_line(host) == b"OK %d\n" % FIRST_HOST_PORT
    early = guest.expect_op(OP_RW)
    assert early.payload == b"early bytes" and early.hdr.dst_port == 1234 and early.hdr.src_port == local
    guest.consume(1234, local, len(early.payload))

    # Host -> guest.
    host.sendall(b"hello guest")
    assert guest.receive_stream(1234, local, 11) == b"hello guest"
    # Guest -> host: fwd_cnt in later packets counts what reached the host socket.
    guest.send(guest.header(1234, local, OP_RW, length=12), b"hello host!\n")
    assert recv_exactly(host, 12) == b"hello host!\n"
    guest.send(guest.header(1234, local, OP_CREDIT_REQUEST))
    update = guest.expect_op(OP_CREDIT_UPDATE).hdr
    assert update.fwd_cnt == 12 and update.buf_alloc == CONN_TX_BUF_SIZE
    assert device.stats.rx_bytes == 11 + 11 and device.stats.tx_bytes == 12
    # A second host connection gets the next host-side port.
    second, local2 = establish_from_host(guest, uds, 1234)
    assert local2 == FIRST_HOST_PORT + 1
    host.close()
    second.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_large_transfer_both_ways_with_credit(make_vsock, event_idx: bool) -> None:  # type: ignore[no-untyped-def]
    """More than one buffer's worth each way: credit updates keep both directions going, nothing lost."""
    device, guest, uds = make_vsock(rx_buffers=32, buf_alloc=64 * 1024, event_idx=event_idx)
    host, local = establish_from_host(guest, uds)
    blob = os.urandom(300 * 1024)
    sender = threading.Thread(target=host.sendall, args=(blob,), daemon=True)
    sender.start()
    assert guest.receive_stream(1234, local, len(blob), timeout=30) == blob
    sender.join(TIMEOUT)
    # Guest -> host: 600 KiB against our 256 KiB buf_alloc, read slowly by the host.
    out = os.urandom(600 * 1024)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(recv_exactly(host, len(out))), daemon=True)
    reader.start()
    sent, host_fwd = 0, 0
    deadline = time.monotonic() + 30
    while sent < len(out):
        credit = CONN_TX_BUF_SIZE - (sent - host_fwd)
        if credit > 0:
            chunk = out[sent: sent + min(credit, 64 * 1024)]
            guest.send(guest.header(1234, local, OP_RW, length=len(chunk)), chunk)
            sent += len(chunk)
            continue
        for packet in guest.poll():
            if packet.hdr.op in (OP_CREDIT_UPDATE, OP_RW):
                host_fwd = packet.hdr.fwd_cnt
        assert time.monotonic() < deadline, f"stuck at {sent} bytes, host fwd_cnt {host_fwd}"
        time.sleep(0.001)
    reader.join(30)
    assert bytes(received) == out
    host.close()


def test_host_to_guest_respects_guest_credit(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock(rx_buffers=16, buf_alloc=1000)
    host, local = establish_from_host(guest, uds)
    host.sendall(bytes(range(256)) * 12)  # 3072 bytes
    got = guest.expect(2)  # 1000 bytes of data (in one packet), then a credit request
    assert [p.hdr.op for p in got] == [OP_RW, OP_CREDIT_REQUEST]
    assert len(got[0].payload) == 1000
    assert guest.quiet() == []  # out of credit: nothing more, however much the host sent
    guest.consume(1234, local, 1000)
    guest.send(guest.header(1234, local, OP_CREDIT_UPDATE))
    rest = guest.receive_stream(1234, local, 3072 - 1000)
    assert got[0].payload + rest == bytes(range(256)) * 12
    host.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_no_rx_buffers_no_reading_and_no_spinning(make_vsock, rig: Rig, event_idx: bool) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock(rx_buffers=1, buf_alloc=4096, event_idx=event_idx)
    host, local = establish_from_host(guest, uds)  # the one rx buffer carried the REQUEST
    # The guest posts nothing now; the host writes until its socket buffer is full.
    host.setblocking(False)
    pushed = 0
    chunk = b"x" * 65536
    while True:
        try:
            pushed += host.send(chunk)
        except BlockingIOError:
            break
    before = rig.iothread.iterations
    time.sleep(0.3)
    assert rig.iothread.iterations - before < 20  # idle: no wake-ups for data nobody can take
    # Nothing read from the host beyond what could be delivered: the one buffer re-posted after the
    # REQUEST, which is also exactly the guest's credit.
    assert device.stats.rx_bytes == RX_BUF == guest.buf_alloc
    # Buffers appear: exactly the guest's credit is delivered, the rest waits in the host socket.
    guest.post_rx(8)
    data = guest.receive_stream(1234, local, pushed, timeout=60)
    assert data == b"x" * pushed
    host.close()


# -- guest-initiated ----------------------------------------------------------------------------------------
def test_guest_connects_to_a_host_listener(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_5000")
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    guest.send(guest.header(40000, 5000, OP_REQUEST))
    response = guest.expect_op(OP_RESPONSE).hdr
    assert (response.src_port, response.dst_port, response.dst_cid) == (5000, 40000, GUEST_CID)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    guest.send(guest.header(40000, 5000, OP_RW, length=5), b"ping\n")
    assert recv_exactly(conn, 5) == b"ping\n"
    conn.sendall(b"pong\n")
    assert guest.receive_stream(40000, 5000, 5) == b"pong\n"
    # The guest closes: the host sees EOF, the guest gets its RST.
    guest.send(guest.header(40000, 5000, OP_SHUTDOWN, flags=SHUTDOWN_BOTH))
    assert guest.expect_op(OP_RST).hdr.dst_port == 40000
    assert conn.recv(10) == b""
    assert wait_for(lambda: device.connection_count() == 0)
    conn.close()
    listener.close()


def test_guest_connection_refused_gets_rst(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    guest.send(guest.header(40001, 5001, OP_REQUEST))  # nobody at <uds>_5001
    rst = guest.expect_op(OP_RST).hdr
    assert (rst.src_cid, rst.src_port, rst.dst_cid, rst.dst_port) == (HOST_CID, 5001, GUEST_CID, 40001)
    assert device.connection_count() == 0


def test_guest_data_beyond_credit_resets_the_connection(make_vsock, sockdir: str) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_6000")
    listener.listen(1)
    guest.send(guest.header(40002, 6000, OP_REQUEST))
    guest.expect_op(OP_RESPONSE)
    conn, _ = listener.accept()  # never reads: what its socket does not take waits in the device
    payload = b"z" * (64 * 1024)
    sent = 0
    # Ignore the credit: once the host socket is full and the device holds its whole buf_alloc, the
    # next packet cannot be kept -- the connection is reset rather than the data silently dropped.
    for _ in range(64):
        guest.send(guest.header(40002, 6000, OP_RW, length=len(payload)), payload)
        if any(p.hdr.op == OP_RST for p in guest.poll()):
            break
        sent += len(payload)
    assert sent >= CONN_TX_BUF_SIZE  # everything within the granted credit was taken
    assert OP_RST in [p.hdr.op for p in guest.received]
    assert device.connection_count() == 0
    conn.close()
    listener.close()


def test_host_closes_and_half_close(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    host, local = establish_from_host(guest, uds)
    host.shutdown(socket.SHUT_WR)  # the host is done sending but waits for an answer
    shutdown = guest.expect_op(OP_SHUTDOWN).hdr
    assert shutdown.flags == SHUTDOWN_SEND
    guest.send(guest.header(1234, local, OP_RW, length=6), b"answer")
    assert recv_exactly(host, 6) == b"answer"
    guest.send(guest.header(1234, local, OP_SHUTDOWN, flags=SHUTDOWN_BOTH))
    guest.expect_op(OP_RST)
    assert host.recv(1) == b""
    assert device.connection_count() == 0
    host.close()


def test_guest_refuses_host_connection(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    host = host_connect(uds, 9999)
    request = guest.expect_op(OP_REQUEST).hdr
    guest.send(guest.header(9999, request.src_port, OP_RST))  # nobody listens on 9999
    assert host.recv(10) == b""  # closed without an OK line
    assert device.connection_count() == 0
    host.close()


def test_guest_that_never_answers_times_out(make_vsock, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(vs, "CONN_REQUEST_TIMEOUT", 0.2)
    device, guest, uds = make_vsock()
    host = host_connect(uds, 7777)
    guest.expect_op(OP_REQUEST)
    assert host.recv(10) == b""  # within the socket timeout
    assert guest.expect_op(OP_RST).hdr.dst_port == 7777
    host.close()


def test_bad_connect_lines_are_closed(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    for line in (b"HELLO 12\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"C" * 40):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(uds)
        sock.sendall(line)
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass  # closed with bytes of the overlong line unread: a reset, just as good
        sock.close()
    assert guest.quiet() == [] and device.connection_count() == 0


# -- malformed guest packets --------------------------------------------------------------------------------
def test_malformed_packets_get_rst_or_are_dropped(make_vsock, rig: Rig) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    transport = rig.transports[-1]
    # Wrong source CID: nobody to answer, dropped.
    guest.send(guest.header(1, 2, OP_REQUEST, src_cid=7))
    # Shorter than a header: dropped.
    guest.send(PacketHeader(0, 0, 0, 0, 0, 0, 0, 0, 0, 0), raw=b"\x03" * 20)
    assert guest.quiet() == []
    dropped = device.stats.dropped
    assert dropped == 2
    # Each of these is answered with an RST to its source port.
    bad = [
        guest.header(41000, 80, OP_RW, length=100),  # payload longer than the buffer (no payload sent)
        guest.header(41001, 80, 42),  # unknown operation
        guest.header(41002, 80, OP_REQUEST, type_=2),  # seqpacket was not negotiated
        guest.header(41003, 80, OP_RW, length=4),  # data for a connection that does not exist
        guest.header(41004, 80, OP_REQUEST, dst_cid=5),  # not for the host
    ]
    for hdr in bad:
        guest.send(hdr, b"data" if hdr.src_port == 41003 else b"")
    rsts = guest.expect(len(bad))
    assert [(p.hdr.op, p.hdr.dst_port) for p in rsts] == [(OP_RST, h.src_port) for h in bad]
    # An RST for an unknown connection is not answered (no RST storms).
    guest.send(guest.header(41005, 80, OP_RST))
    assert guest.quiet() == []
    assert not transport.broken and not guest.driver.status & regs.STATUS_DEVICE_NEEDS_RESET
    # The device still works.
    host, local = establish_from_host(guest, uds)
    host.close()


# -- reset --------------------------------------------------------------------------------------------------
def test_transport_reset_event_and_driver_reset(make_vsock) -> None:  # type: ignore[no-untyped-def]
    device, guest, uds = make_vsock()
    guest.post_events(2)
    host, local = establish_from_host(guest, uds)
    device.transport_reset()
    [(head, written)] = guest.driver.wait_used(2, timeout=TIMEOUT)
    assert written == 4 and guest.driver.memory.read_u32(guest.event_bufs[head]) == vs.EVENT_TRANSPORT_RESET
    assert host.recv(10) == b""  # its connection is gone
    host.close()
    # A driver reset closes the host side of every connection too; the listener stays.
    second, _ = establish_from_host(guest, uds)
    guest.driver.set_reg(regs.REG_STATUS, 0)
    assert second.recv(10) == b""
    assert device.connection_count() == 0
    second.close()
    fresh = GuestVsock(guest.driver)
    third, _ = establish_from_host(fresh, uds)
    third.close()


# -- configuration ------------------------------------------------------------------------------------------
def build(props: dict[str, str]) -> VirtioVsock:
    return build_vhost_vsock(PropReader(DeviceOptions("vhost-vsock-device", tuple(props.items()))), None)  # type: ignore[arg-type]


def test_builder_properties(sockdir: str) -> None:
    uds = os.path.join(sockdir, "b.sock")
    device = build({"guest-cid": "0x10", "uds-path": uds})
    try:
        assert device.guest_cid == 16 and os.path.exists(uds)
        with pytest.raises(ConfigError, match="in use"):
            build({"guest-cid": "3", "uds-path": uds})
    finally:
        device.close()
    assert not os.path.exists(uds)
    for props, message in (({"uds-path": uds}, "greater than 2"),
                           ({"guest-cid": "2", "uds-path": uds}, "greater than 2"),
                           ({"guest-cid": str(0xFFFFFFFF), "uds-path": uds}, "32-bit"),
                           ({"guest-cid": "3"}, "uds-path"),
                           ({"guest-cid": "three", "uds-path": uds}, "integer"),
                           ({"guest-cid": "3", "uds-path": "/x" * 60}, "longer"),
                           ({"guest-cid": "3", "uds-path": uds, "vhostfd": "4"}, "vhostfd"),
                           ({"guest-cid": "3", "uds-path": uds, "colour": "red"}, "not found")):
        with pytest.raises(ConfigError, match=message):
            build(props)
    # A file that is not a socket is never replaced; a stale socket (nobody listening) is.
    with open(uds, "w"):
        pass
    with pytest.raises(ConfigError, match="not a socket"):
        build({"guest-cid": "3", "uds-path": uds})
    os.unlink(uds)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(uds)
    stale.close()
    build({"guest-cid": "3", "uds-path": uds}).close()


def test_plugged_through_the_builders_table(monkeypatch, sockdir: str) -> None:
    """The board's plug code with the builder registered (as machines/virtio_devices.py will have it)."""
    from pyemu.machines import virtio_devices

    monkeypatch.setitem(virtio_devices.BUILDERS, "vhost-vsock-device", build_vhost_vsock)
    uds = os.path.join(sockdir, "p.sock")
    props = PropReader(DeviceOptions("vhost-vsock-device", (("guest-cid", "3"), ("uds-path", uds))))
    device = virtio_devices.BUILDERS["vhost-vsock-device"](props, None)  # type: ignore[arg-type]
    assert isinstance(device, VirtioVsock)
    device.close()
