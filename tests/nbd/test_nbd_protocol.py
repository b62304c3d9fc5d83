"""Unit tests of the NBD message layer and addresses: bounds and magics are checked before anything is
allocated; URLs and -drive options parse to the same targets QEMU's would."""

from __future__ import annotations

import errno

import pytest

from pyemu.block.errors import BlockConfigError
from pyemu.block.nbd import protocol as P
from pyemu.block.nbd.uri import NbdAddress, NbdTarget, parse_nbd_url, target_from_options
from pyemu.block.options import DriveOptions


def test_request_roundtrip_and_bad_magic() -> None:
    req = P.Request(P.CMD_FLAG_FUA, P.CMD_WRITE, 2**64 - 1, 2**63, 2**32 - 1)
    assert P.Request.unpack(req.pack()) == req
    with pytest.raises(P.NbdProtocolError, match="magic"):
        P.Request.unpack(b"\x00" * 28)


def test_strings_are_bounded() -> None:
    assert P.read_string(P.pack_string("exp") + b"rest", 0, what="x") == ("exp", 7)
    with pytest.raises(P.NbdProtocolError, match="longer than"):
        P.read_string(P.U32.pack(P.MAX_STRING + 1) + b"a" * 10, 0, what="x")
    with pytest.raises(P.NbdProtocolError, match="past the end"):
        P.read_string(P.U32.pack(100) + b"abc", 0, what="x")
    with pytest.raises(P.NbdProtocolError, match="truncated"):
        P.read_string(b"\x00\x00", 0, what="x")
    with pytest.raises(P.NbdProtocolError, match="UTF-8"):
        P.read_string(P.U32.pack(2) + b"\xff\xfe", 0, what="x")
    with pytest.raises(P.NbdError):
        P.pack_string("x" * (P.MAX_STRING + 1))


def test_option_payloads() -> None:
    meta = P.MetaQuery("e", ("base:allocation", "qemu:dirty-bitmap:b"))
    assert P.MetaQuery.parse(meta.pack()) == meta
    info = P.InfoRequest("e", (P.INFO_NAME, P.INFO_BLOCK_SIZE))
    assert P.InfoRequest.parse(info.pack()) == info
    with pytest.raises(P.NbdProtocolError, match="queries"):
        P.MetaQuery.parse(P.pack_string("e") + P.U32.pack(10**9))
    with pytest.raises(P.NbdProtocolError, match="trailing"):
        P.MetaQuery.parse(meta.pack() + b"x")
    with pytest.raises(P.NbdProtocolError, match="request count"):
        P.InfoRequest.parse(P.pack_string("e") + P.U16.pack(5) + b"\x00\x01")


def test_errno_mapping_follows_qemu() -> None:
    assert P.errno_to_nbd(errno.EROFS) == P.NBD_EPERM
    assert P.errno_to_nbd(errno.EACCES) == P.NBD_EINVAL  # NBD has no EACCES: QEMU sends EINVAL
    assert P.errno_to_nbd(errno.ENOSPC) == P.NBD_ENOSPC
    assert P.errno_to_nbd(errno.EIO) == P.NBD_EIO
    assert P.errno_to_nbd(errno.EOPNOTSUPP) == P.NBD_ENOTSUP
    assert P.nbd_to_errno(P.NBD_ESHUTDOWN) == errno.ESHUTDOWN
    assert P.nbd_to_errno(12345) == errno.EINVAL


@pytest.mark.parametrize("text, target", [
    ("nbd://example.org/disk", NbdTarget(NbdAddress("inet", host="example.org", port=10809), "disk")),
    ("nbd://127.0.0.1:1234", NbdTarget(NbdAddress("inet", host="127.0.0.1", port=1234), "")),
    ("nbd://[::1]:99/a%20b", NbdTarget(NbdAddress("inet", host="::1", port=99), "a b")),
    ("nbd+unix:///exp?socket=/run/s.sock", NbdTarget(NbdAddress("unix", path="/run/s.sock"), "exp")),
    ("nbd+unix://?socket=/s", NbdTarget(NbdAddress("unix", path="/s"), "")),
    ("nbd:unix:/tmp/s:exportname=x", NbdTarget(NbdAddress("unix", path="/tmp/s"), "x")),
    ("nbd:localhost:10810", NbdTarget(NbdAddress("inet", host="localhost", port=10810), "")),
])
def test_urls(text: str, target: NbdTarget) -> None:
    assert parse_nbd_url(text) == target
    assert parse_nbd_url(target.url()) == target


@pytest.mark.parametrize("text", ["nbds://h/e", "nbd+unix:///e", "nbd+unix:///e?socket=/a&socket=/b",
                                  "nbd://h:0/e", "nbd://h:99999/e", "nbd://h/e?x=1", "nbd://", "nbd:h:port"])
def test_bad_urls(text: str) -> None:
    with pytest.raises(BlockConfigError):
        parse_nbd_url(text)


def test_flat_options() -> None:
    assert target_from_options({"server.type": "unix", "server.path": "/s", "export": "e"}) == \
        NbdTarget(NbdAddress("unix", path="/s"), "e")
    assert target_from_options({"server.type": "inet", "server.host": "h", "server.port": "5"}) == \
        NbdTarget(NbdAddress("inet", host="h", port=5), "")
    for bad in ({"server.type": "vsock", "server.host": "h"}, {"server.type": "unix"},
                {"server.type": "inet", "server.host": "h", "server.port": "x"}, {"server.bogus": "1"}):
        with pytest.raises(BlockConfigError):
            target_from_options(bad)


def test_drive_options() -> None:
    opts = DriveOptions.from_props([("driver", "nbd"), ("server.type", "unix"), ("server.path", "/s"),
                                    ("export", "e"), ("reconnect-delay", "5")])
    assert opts.file == "nbd+unix:///e?socket=/s" and opts.reconnect_delay == 5 and opts.format == "raw"
    assert DriveOptions.from_props([("file", "nbd://h/e")]).file == "nbd://h/e"
    for props in ([("driver", "nbd"), ("server.type", "unix")],
                  [("file", "x.img"), ("driver", "nbd"), ("server.path", "/s")],
                  [("driver", "vmdk")], [("file", "x.img"), ("format", "nbd")],
                  [("file", "nbd://h/e"), ("reconnect-delay", "-1")]):
        with pytest.raises(BlockConfigError):
            DriveOptions.from_props(props)
