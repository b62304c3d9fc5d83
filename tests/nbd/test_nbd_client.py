"""pyemu's ``nbd`` client driver against its own server, qemu-nbd and qemu-storage-daemon: data, block
status, concurrency, reconnect-delay, and a lying server that must not make it write outside a buffer."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nbd_helpers import make_image, need, run, server_process, url, wait_for_socket
from pyemu.block.errors import BlockConfigError, BlockIOError, ReadOnlyError
from pyemu.block.image import open_image
from pyemu.block.nbd import protocol as P
from pyemu.block.nbd.client import NbdClient
from pyemu.block.nbd.export import NbdExport
from pyemu.block.nbd.server import NbdServer
from pyemu.block.nbd.uri import NbdAddress, NbdTarget, parse_nbd_url
from pyemu.block.options import DriveOptions, open_drive

SIZE = 8 << 20


def read(node: object, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    node.preadv(offset, [memoryview(buf)])  # type: ignore[attr-defined]
    return bytes(buf)


def extents(node: object) -> list[tuple[int, int, bool, bool]]:
    out = []
    pos = 0
    while pos < node.size():  # type: ignore[attr-defined]
        st = node.block_status(pos, node.size() - pos)  # type: ignore[attr-defined]
        out.append((st.offset, st.length, st.allocated, st.zero))
        pos += st.length
    return out


def test_against_pyemu_server(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    contents = make_image(image, SIZE)
    node = open_image(str(image), format="raw", read_only=False)
    server = NbdServer()
    server.add_export(NbdExport("disk", node, writable=True))
    sock = tmp_path / "s.sock"
    server.listen_unix(str(sock))
    try:
        client = NbdClient.open(parse_nbd_url(url(sock, "disk")))
        assert client.size() == SIZE and client.capabilities.block_status and client.capabilities.discard
        assert read(client, 0, SIZE) == contents
        # scattered buffers and concurrent requests from several threads
        a, b = bytearray(1000), bytearray(3096)
        client.preadv(1 << 20, [memoryview(a), memoryview(b)])
        assert bytes(a + b) == contents[1 << 20:(1 << 20) + 4096]
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                for i in range(10):
                    off = (n * 10 + i) * 8192
                    client.pwritev(off, [bytes([n + 1]) * 8192])
                    assert read(client, off, 8192) == bytes([n + 1]) * 8192
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        client.flush()
        big = bytes(range(256)) * (40 << 12)  # 40 MiB: above one request's limit, split by the client
        big = big[:SIZE - 4096]
        client.pwritev(4096, [big])
        assert read(client, 4096, len(big)) == big
        client.write_zeroes(0, 1 << 20, may_unmap=True)
        client.discard(2 << 20, 1 << 20)
        assert read(client, 0, 1 << 20) == bytes(1 << 20)
        with pytest.raises(BlockIOError) as info:
            client.preadv(SIZE - 1, [memoryview(bytearray(2))])
        assert info.value.errno == errno.EINVAL
        client.close()
        ro = NbdClient.open(parse_nbd_url(url(sock, "disk")), read_only=True)
        with pytest.raises(ReadOnlyError):
            ro.pwritev(0, [b"x"])
        ro.close()
        with pytest.raises(BlockConfigError, match="export not available"):
            NbdClient.open(parse_nbd_url(url(sock, "nope")))
    finally:
        server.close()
        node.close()
    with pytest.raises(BlockConfigError, match="Failed to connect"):
        NbdClient.open(parse_nbd_url(url(sock, "disk")))


def test_against_qemu_nbd(tmp_path: Path) -> None:
    need("qemu-nbd", "qemu-img", "qemu-io")
    image = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 2M 128k", "-c", "write -z 4M 64k", str(image))
    sock = tmp_path / "q.sock"
    with server_process(["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-t", "-x", "exp", str(image)], sock):
        node = open_image(url(sock, "exp"), read_only=False)
        try:
            assert node.name == "raw" and node.size() == 16 << 20
            assert read(node, 2 << 20, 128 << 10) == b"\x5a" * (128 << 10)
            ext = extents(node)
            assert (2 << 20, 128 << 10, True, False) in ext
            assert all(zero for off, length, alloc, zero in ext if not alloc)
            node.pwritev(0, [b"pyemu" * 100])
            node.write_zeroes(2 << 20, 4096, may_unmap=False)
            node.flush()
        finally:
            node.close()
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 2101248 124k", "-c", "read -P 0 2M 4k",
                  url(sock, "exp")).stdout
        assert "Pattern verification failed" not in out
    assert run("qemu-io", "-f", "qcow2", "-r", "-c", "read -v 0 5", str(image)).stdout.count("pyemu") == 1


def test_against_qemu_storage_daemon(tmp_path: Path) -> None:
    need("qemu-storage-daemon", "qemu-img")
    image = tmp_path / "s.img"
    contents = make_image(image, SIZE)
    sock = tmp_path / "qsd.sock"
    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={image}",
            "--blockdev", "driver=raw,node-name=r,file=f",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=r,name=disk,writable=on"]
    with server_process(argv, sock):
        options = DriveOptions.from_props([("driver", "nbd"), ("server.type", "unix"), ("server.path", str(sock)),
                                           ("export", "disk")])
        backend = open_drive(options)
        try:
            assert backend.size() == SIZE and not backend.read_only
            assert read(backend, 0, SIZE) == contents
            backend.pwritev(8192, [b"via -drive"])
            backend.flush()
            ext = extents(backend)
            assert ext[0] == (0, 4096, True, False) and ext[1][2:] == (False, True)
        finally:
            backend.close()
        node = open_image(url(sock, "disk"), read_only=True)  # file=nbd+unix://... , format probed
        try:
            assert node.name == "raw" and read(node, 8192, 10) == b"via -drive"
        finally:
            node.close()


def test_reconnect_delay(tmp_path: Path) -> None:
    need("qemu-nbd")
    image = tmp_path / "r.img"
    contents = make_image(image, SIZE)
    sock = tmp_path / "r.sock"
    argv = ["qemu-nbd", "-f", "raw", "-k", str(sock), "-t", "-e", "0", str(image)]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    wait_for_socket(sock, None)
    waiter = NbdClient.open(parse_nbd_url(url(sock)), read_only=True, reconnect_delay=60)
    failer = NbdClient.open(parse_nbd_url(url(sock)), read_only=True)
    restarted: list[subprocess.Popen[bytes]] = []
    try:
        assert read(waiter, 0, 4096) == contents[:4096]
        proc.kill()  # a crash (qemu-nbd waits for its clients on SIGTERM)
        proc.wait(30)
        # without reconnect-delay the request fails at once with EIO ...
        with pytest.raises(BlockIOError) as info:
            read(failer, 0, 4096)
        assert info.value.errno == errno.EIO

        def restart() -> None:
            time.sleep(1.0)
            restarted.append(subprocess.Popen(argv, stderr=subprocess.DEVNULL))

        thread = threading.Thread(target=restart)
        thread.start()
        # ... with it, the request waits for the server to come back and succeeds
        assert read(waiter, 1 << 20, 4096) == contents[1 << 20:(1 << 20) + 4096]
        thread.join()
        # and a client without the delay reconnects on its next request once the server is back
        assert read(failer, 0, 4096) == contents[:4096]
    finally:
        waiter.close()
        failer.close()
        for p in [proc, *restarted]:
            if p.poll() is None:
                p.kill()
                p.wait(30)


def _lying_server(sock_path: Path, reply: bytes) -> threading.Thread:
    """A server that negotiates properly, then answers the first request with ``reply`` (handle 1)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            conn.sendall(P.HANDSHAKE_HEAD.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
            P.recv_exact(conn, 4)
            while True:
                _, option, length = P.OPTION_HEAD.unpack(P.recv_exact(conn, 16))
                P.recv_exact(conn, length)
                if option == P.OPT_STRUCTURED_REPLY:
                    conn.sendall(P.option_reply(option, P.REP_ACK))
                elif option == P.OPT_SET_META_CONTEXT:
                    conn.sendall(P.option_reply(option, P.REP_ACK))
                elif option == P.OPT_GO:
                    conn.sendall(P.option_reply(option, P.REP_INFO, P.EXPORT_INFO.pack(P.INFO_EXPORT, 1 << 20, 1)))
                    conn.sendall(P.option_reply(option, P.REP_ACK))
                    break
            P.recv_exact(conn, P.REQUEST.size)
            conn.sendall(reply)
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("reply", [
    # data chunk claiming an offset far outside the 4 KiB read
    P.structured_chunk(1, P.REPLY_TYPE_OFFSET_DATA, 8 + 16, done=True) + P.U64.pack(1 << 19) + b"A" * 16,
    # a reply for a handle nobody asked for
    P.structured_chunk(99, P.REPLY_TYPE_NONE, 0, done=True),
    # a chunk announcing 4 GiB
    P.structured_chunk(1, P.REPLY_TYPE_OFFSET_DATA, 0xFFFFFFFF, done=True),
    # garbage magic
    b"\x00" * 20,
])
def test_lying_server_breaks_connection_not_memory(tmp_path: Path, reply: bytes) -> None:
    sock = tmp_path / "liar.sock"
    thread = _lying_server(sock, reply)
    client = NbdClient.open(NbdTarget(NbdAddress("unix", path=str(sock))), read_only=True)
    try:
        guard = bytearray(4096 * 3)
        with pytest.raises(BlockIOError) as info:
            client.preadv(4096, [memoryview(guard)[4096:8192]])
        assert info.value.errno == errno.EIO
        assert guard[:4096] == bytes(4096) and guard[8192:] == bytes(4096)
    finally:
        client.close()
        thread.join(30)


def test_pyemu_img_reads_qemu_nbd(tmp_path: Path) -> None:
    need("qemu-nbd", "qemu-img")
    image = tmp_path / "i.img"
    make_image(image, SIZE)
    sock = tmp_path / "i.sock"
    with server_process(["qemu-nbd", "-f", "raw", "-r", "-k", str(sock), "-t", "-e", "0", str(image)], sock):
        info = json.loads(run("pyemu-img", "info", "--output=json", url(sock)).stdout)
        assert info["virtual-size"] == SIZE and info["format"] == "raw"
        out = tmp_path / "copy.qcow2"
        run("pyemu-img", "convert", "-O", "qcow2", url(sock), str(out))
        run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(image), str(out))
        assert "identical" in run("pyemu-img", "compare", "-U", url(sock), str(out)).stdout
        mapping = json.loads(run("pyemu-img", "map", "--output=json", url(sock)).stdout)
        assert [m["data"] for m in mapping][:3] == [True, False, True]


def test_tcp_both_ways(tmp_path: Path) -> None:
    """nbd://HOST:PORT: pyemu's server on TCP read by nbdinfo and pyemu's client; qemu-nbd on TCP read by
    pyemu's client; an unreachable server is a clear one-line error."""
    image = tmp_path / "t.img"
    contents = make_image(image, SIZE)
    node = open_image(str(image), format="raw", read_only=True)
    server = NbdServer()
    server.add_export(NbdExport("t", node))
    listener = server.listen_tcp("127.0.0.1", 0)
    port = listener.getsockname()[1]
    try:
        client = open_image(f"nbd://127.0.0.1:{port}/t", read_only=True)
        assert read(client, 0, SIZE) == contents
        client.close()
        if shutil.which("nbdinfo"):
            assert f"export-size: {SIZE}" in run("nbdinfo", f"nbd://127.0.0.1:{port}/t").stdout
    finally:
        server.close()
        node.close()
    need("qemu-nbd")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(free), str(image)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = open_image(f"nbd://127.0.0.1:{free}", read_only=True)
                break
            except BlockConfigError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert read(client, SIZE - 4096, 4096) == contents[-4096:]
        client.close()
    finally:
        proc.kill()
        proc.wait(30)
    result = run("pyemu-img", "info", f"nbd://127.0.0.1:{free}/x", check=False)
    assert result.returncode == 1 and "Failed to connect" in result.stderr and "Traceback" not in result.stderr


def test_drive_probes_on_its_one_connection(tmp_path: Path) -> None:
    """-drive file=nbd+unix://... without format= against a qemu-nbd without -t (one client, then it exits):
    the format is probed on the connection that serves the drive, as QEMU does."""
    need("qemu-nbd", "qemu-img")
    image = tmp_path / "p.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M")
    sock = tmp_path / "p.sock"
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), str(image)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        warnings: list[str] = []
        while True:  # the socket file exists from bind(), a moment before listen()
            try:
                backend = open_drive(DriveOptions.from_props([("file", url(sock)), ("readonly", "on")]),
                                     warn=warnings.append)
                break
            except BlockConfigError as exc:
                assert "Failed to connect" in str(exc) and time.monotonic() < deadline
                time.sleep(0.05)
        try:
            assert backend.size() == 4 << 20  # the qcow2 inside the raw export was recognised
            assert not warnings
        finally:
            backend.close()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
