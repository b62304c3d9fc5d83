"""The NBD server against hand-driven and hostile clients: every refusal is an NBD error or a disconnect of
that one client, while other clients and the export carry on."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from nbd_helpers import RawPeer, make_image
from pyemu.block.image import open_image
from pyemu.block.nbd import protocol as P
from pyemu.block.nbd import server as server_module
from pyemu.block.nbd.export import NbdExport
from pyemu.block.nbd.server import NbdServer

SIZE = 8 << 20


class FakeBitmap:
    """Dirty from 1 MiB to 1 MiB + 128 KiB, 64 KiB granularity."""

    name = "b0"
    granularity = 65536

    def extent_at(self, offset: int, length: int) -> tuple[bool, int]:
        lo, hi = 1 << 20, (1 << 20) + (128 << 10)
        end = min(offset + length, SIZE)
        if offset >= end:
            return False, 0
        if offset < lo:
            return False, min(lo, end) - offset
        if offset < hi:
            return True, min(hi, end) - offset
        return False, end - offset


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[NbdServer, Path, bytes]]:
    image = tmp_path / "disk.img"
    contents = make_image(image, SIZE)
    node = open_image(str(image), format="raw", read_only=False)
    ro_image = tmp_path / "ro.img"
    make_image(ro_image, SIZE)
    ro_node = open_image(str(ro_image), format="raw", read_only=True)
    server = NbdServer()
    server.add_export(NbdExport("", node, description="the disk", writable=True, bitmaps=(FakeBitmap(),)))
    server.add_export(NbdExport("ro", ro_node))
    sock = tmp_path / "nbd.sock"
    server.listen_unix(str(sock))
    try:
        yield server, sock, contents
    finally:
        server.close()
        node.close()
        ro_node.close()


def still_serves(sock: Path, contents: bytes) -> None:
    """A fresh client can read the export: whatever the previous client did left the server working."""
    peer = RawPeer.connect(sock)
    try:
        peer.go()
        peer.request(P.CMD_READ, 1 << 20, 4096, handle=77)
        flags, kind, handle, payload = peer.structured_reply()
        assert (kind, handle) == (P.REPLY_TYPE_OFFSET_DATA, 77)
        assert payload[8:] == contents[1 << 20:(1 << 20) + 4096]
    finally:
        peer.close()


def test_list_info_and_abort(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, _ = served
    peer = RawPeer.connect(sock)
    flags = peer.greeting()
    assert flags & P.FLAG_FIXED_NEWSTYLE
    peer.option(P.OPT_LIST)
    replies = peer.replies(P.OPT_LIST)
    names = sorted(P.read_string(data, 0, what="name")[0] for kind, data in replies if kind == P.REP_SERVER)
    assert names == ["", "ro"]
    peer.option(P.OPT_INFO, P.InfoRequest("ro", (P.INFO_NAME, P.INFO_BLOCK_SIZE)).pack())
    infos = {P.U16.unpack_from(d)[0]: d for k, d in peer.replies(P.OPT_INFO) if k == P.REP_INFO}
    _, size, tflags = P.EXPORT_INFO.unpack(infos[P.INFO_EXPORT])
    assert size == SIZE and tflags & P.TF_READ_ONLY
    assert infos[P.INFO_NAME][2:] == b"ro"
    assert P.BLOCK_SIZE_INFO.unpack(infos[P.INFO_BLOCK_SIZE])[3] == P.MAX_PAYLOAD
    peer.option(P.OPT_INFO, P.InfoRequest("missing", ()).pack())
    assert peer.replies(P.OPT_INFO)[-1][0] == P.REP_ERR_UNKNOWN
    peer.option(P.OPT_ABORT)
    assert peer.replies(P.OPT_ABORT)[-1][0] == P.REP_ACK
    assert peer.is_closed()


def test_options_out_of_order_and_unknown(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, contents = served
    peer = RawPeer.connect(sock)
    peer.greeting()
    # meta contexts before structured replies: refused, the connection stays usable
    peer.option(P.OPT_SET_META_CONTEXT, P.MetaQuery("", ("base:allocation",)).pack())
    assert peer.replies(P.OPT_SET_META_CONTEXT)[-1][0] == P.REP_ERR_INVALID
    peer.option(999, b"xyz")
    assert peer.replies(999)[-1][0] == P.REP_ERR_UNSUP
    peer.option(P.OPT_STARTTLS)
    assert peer.replies(P.OPT_STARTTLS)[-1][0] & P.REP_FLAG_ERROR
    peer.option(P.OPT_GO, b"\xff\xff\xff\xff")  # a string length running past the option
    assert peer.replies(P.OPT_GO)[-1][0] == P.REP_ERR_INVALID
    peer.option(P.OPT_STRUCTURED_REPLY)
    assert peer.replies(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
    peer.option(P.OPT_STRUCTURED_REPLY)
    assert peer.replies(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ERR_INVALID
    peer.option(P.OPT_LIST_META_CONTEXT, P.MetaQuery("", ()).pack())
    listed = [d[4:].decode() for k, d in peer.replies(P.OPT_LIST_META_CONTEXT) if k == P.REP_META_CONTEXT]
    assert listed == ["base:allocation", "qemu:dirty-bitmap:b0"]
    peer.option(P.OPT_GO, P.InfoRequest("", ()).pack())
    assert peer.replies(P.OPT_GO)[-1][0] == P.REP_ACK
    # no context negotiated: block status is refused with EINVAL
    peer.request(P.CMD_BLOCK_STATUS, 0, 4096)
    assert peer.error_of() == P.NBD_EINVAL
    peer.close()
    still_serves(sock, contents)


def test_block_status_contexts(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, _ = served
    peer = RawPeer.connect(sock)
    ids = peer.go(contexts=("base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:nope"))
    assert set(ids) == {"base:allocation", "qemu:dirty-bitmap:b0"}
    peer.request(P.CMD_BLOCK_STATUS, 0, 2 << 20, handle=5)
    chunks = {}
    while True:
        flags, kind, handle, payload = peer.structured_reply()
        assert kind == P.REPLY_TYPE_BLOCK_STATUS and handle == 5
        cid = P.U32.unpack_from(payload)[0]
        chunks[cid] = [P.EXTENT.unpack_from(payload, pos) for pos in range(4, len(payload), 8)]
        if flags & P.REPLY_FLAG_DONE:
            break
    alloc = chunks[ids["base:allocation"]]
    assert sum(length for length, _ in alloc) == 2 << 20
    assert alloc[0] == (4096, 0)  # data at 0
    assert alloc[1][1] == P.STATE_HOLE | P.STATE_ZERO
    assert chunks[ids["qemu:dirty-bitmap:b0"]] == [(1 << 20, 0), (128 << 10, P.STATE_DIRTY),
                                                     ((1 << 20) - (128 << 10), 0)]
    peer.request(P.CMD_BLOCK_STATUS, 0, 2 << 20, handle=6, flags=P.CMD_FLAG_REQ_ONE)
    seen = 0
    while True:
        flags, kind, handle, payload = peer.structured_reply()
        assert (len(payload) - 4) // 8 == 1
        seen += 1
        if flags & P.REPLY_FLAG_DONE:
            break
    assert seen == 2
    peer.close()


def test_requests_refused_with_qemu_errnos(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, contents = served
    peer = RawPeer.connect(sock)
    peer.go("ro")
    peer.request(P.CMD_WRITE, 0, 4, payload=b"abcd")
    assert peer.error_of() == P.NBD_EPERM
    peer.request(P.CMD_TRIM, 0, 4096)
    assert peer.error_of() == P.NBD_EPERM
    peer.request(P.CMD_READ, SIZE - 10, 4096)
    assert peer.error_of() == P.NBD_EINVAL
    peer.request(P.CMD_READ, 0, P.MAX_PAYLOAD + 1)  # too big to read: EINVAL, the connection goes on
    assert peer.error_of() == P.NBD_EINVAL
    peer.request(P.CMD_READ, 2**64 - 1, 2**32 - 1)
    assert peer.error_of() == P.NBD_EINVAL
    peer.request(77, 0, 0)
    assert peer.error_of() == P.NBD_EINVAL
    peer.request(P.CMD_READ, 0, 8, flags=0x8000)
    assert peer.error_of() == P.NBD_EINVAL
    peer.request(P.CMD_READ, 0, 8)
    assert peer.error_of() == 0
    peer.close()
    peer = RawPeer.connect(sock)
    peer.go("")
    peer.request(P.CMD_WRITE, SIZE - 2, 4, payload=b"abcd")  # past the end: ENOSPC, payload still consumed
    assert peer.error_of() == P.NBD_ENOSPC
    peer.request(P.CMD_WRITE, 100, 4, payload=b"abcd", flags=P.CMD_FLAG_FUA)
    assert peer.error_of() == 0
    peer.request(P.CMD_READ, 100, 4)
    flags, kind, _, payload = peer.structured_reply()
    assert payload[8:] == b"abcd"
    peer.request(P.CMD_WRITE_ZEROES, 100, 4)
    assert peer.error_of() == 0
    peer.request(P.CMD_FLUSH, 0, 0)
    assert peer.error_of() == 0
    peer.request(P.CMD_DISC, 0, 0)
    assert peer.is_closed()


def test_simple_replies_without_structured(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, contents = served
    peer = RawPeer.connect(sock)
    peer.go(structured=False)
    peer.request(P.CMD_READ, 0, 4096, handle=9)
    assert peer.simple_reply(4096) == (0, 9, contents[:4096])
    peer.request(P.CMD_READ, SIZE, 1, handle=10)
    assert peer.simple_reply()[:2] == (P.NBD_EINVAL, 10)
    peer.close()


def test_export_name_option(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, contents = served
    peer = RawPeer.connect(sock)
    peer.greeting(P.FLAG_C_FIXED_NEWSTYLE)  # no NO_ZEROES: 124 bytes of padding follow
    peer.option(P.OPT_EXPORT_NAME, b"ro")
    data = P.recv_exact(peer.sock, 134)
    assert P.U64.unpack_from(data)[0] == SIZE and data[10:] == bytes(124)
    peer.close()
    peer = RawPeer.connect(sock)
    peer.greeting()
    peer.option(P.OPT_EXPORT_NAME, b"missing")  # the spec's answer: disconnect
    assert peer.is_closed()


@pytest.mark.parametrize("garbage", [
    b"\x00" * 4,                                        # client flags fine, then nothing sensible
    P.U32.pack(0xFFFFFFFF),                             # unknown client flags
    P.U32.pack(3) + b"NOTOPTION" * 3,                   # bad option magic
    P.U32.pack(3) + P.OPTION_HEAD.pack(P.IHAVEOPT, P.OPT_GO, 0xFFFFFFFF),  # 4 GiB option
])
def test_garbage_handshakes_disconnect(served: tuple[NbdServer, Path, bytes], garbage: bytes) -> None:
    server, sock, contents = served
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    P.recv_exact(s, P.HANDSHAKE_HEAD.size)
    s.sendall(garbage)
    peer = RawPeer(s)
    if garbage == b"\x00" * 4:
        # non-fixed-newstyle client that then sends a bad option magic
        s.sendall(b"\x01" * 16)
    assert peer.is_closed()
    still_serves(sock, contents)


def test_transmission_garbage_and_huge_write(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, contents = served
    peer = RawPeer.connect(sock)
    peer.go()
    peer.sock.sendall(b"\xde\xad\xbe\xef" * 7)  # bad request magic
    assert peer.is_closed()
    peer = RawPeer.connect(sock)
    peer.go()
    peer.request(P.CMD_WRITE, 0, 0xFFFFFFFF)  # a 4 GiB payload that is never sent: error, then disconnect
    assert peer.error_of() == P.NBD_EINVAL
    assert peer.is_closed()
    still_serves(sock, contents)


def test_disconnect_mid_request_and_other_clients_carry_on(served: tuple[NbdServer, Path, bytes]) -> None:
    server, sock, contents = served
    other = RawPeer.connect(sock)
    other.go()
    for _ in range(5):
        peer = RawPeer.connect(sock)
        peer.go()
        peer.request(P.CMD_WRITE, 0, 1 << 20, payload=b"x" * 1000)  # header + a part of the payload
        peer.close()
    half = RawPeer.connect(sock)
    half.sock.sendall(b"\x00")  # half a handshake, then gone
    half.close()
    other.request(P.CMD_READ, 0, 4096, handle=3)
    flags, kind, handle, payload = other.structured_reply()
    assert handle == 3 and payload[8:] == contents[:4096]  # the half-sent write never landed
    other.close()


def test_handshake_timeout(served: tuple[NbdServer, Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "HANDSHAKE_TIMEOUT", 0.5)
    _, sock, contents = served
    peer = RawPeer.connect(sock)
    P.recv_exact(peer.sock, P.HANDSHAKE_HEAD.size)  # then silence
    assert peer.is_closed(timeout=30)
    still_serves(sock, contents)


def test_many_clients_in_parallel(served: tuple[NbdServer, Path, bytes]) -> None:
    _, sock, contents = served
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            peer = RawPeer.connect(sock)
            peer.go()
            for i in range(20):  # several requests in flight, answered by handle
                peer.request(P.CMD_READ, (i * 4096) % SIZE, 4096, handle=i)
            got = {}
            for _ in range(20):
                _, _, handle, payload = peer.structured_reply()
                got[handle] = payload[8:]
            for i in range(20):
                assert got[i] == contents[(i * 4096) % SIZE:(i * 4096) % SIZE + 4096]
            peer.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_remove_export_disconnects_its_clients(served: tuple[NbdServer, Path, bytes]) -> None:
    server, sock, _ = served
    peer = RawPeer.connect(sock)
    peer.go("ro")
    server.remove_export("ro")
    assert peer.is_closed()
    with pytest.raises(Exception, match="not found"):
        server.remove_export("ro")


def test_random_bytes_never_break_the_server(served: tuple[NbdServer, Path, bytes]) -> None:
    """Seeded random garbage at every stage (greeting, options, transmission): each connection ends in an
    error reply or a disconnect, and the server keeps serving correct data to the next client."""
    import random

    _, sock, contents = served
    rng = random.Random(11)
    for i in range(60):
        peer = RawPeer.connect(sock)
        stage = i % 3
        if stage >= 1:
            peer.greeting()
        if stage == 2:
            peer.option(P.OPT_GO, P.InfoRequest("", ()).pack())
            peer.replies(P.OPT_GO)
        junk = rng.randbytes(rng.choice((1, 7, 28, 100, 4096)))
        if rng.random() < 0.5 and stage == 2:  # a valid magic with random fields
            junk = P.U32.pack(P.REQUEST_MAGIC) + junk[:24].ljust(24, b"\xff")
        try:
            peer.sock.sendall(junk)
        except OSError:
            pass
        peer.sock.shutdown(socket.SHUT_WR)  # the peer sends nothing more: the server must not wait forever
        assert peer.is_closed()
        peer.close()
    still_serves(sock, contents)
