"""TAP devices (``/dev/net/tun`` in TAP mode): the host end of a guest NIC, as QEMU's ``-netdev tap``.

A TAP file descriptor carries one Ethernet frame per ``read``/``write``. We open it the way QEMU does
(``net/tap-linux.c``):

* ``IFF_TAP | IFF_NO_PI`` -- Ethernet frames with no 4-byte packet-information prefix;
* ``IFF_VNET_HDR`` when the kernel offers it (``TUNGETFEATURES``): every frame is preceded by a
  virtio-net header, and ``TUNSETVNETHDRSZ`` makes that header the 12-byte ``virtio_net_hdr_v1`` (the
  one with ``num_buffers``) a virtio 1.x guest uses. The guest's header then passes through untouched on
  transmit, so checksum offload and TSO reach the host stack without any work in Python -- the
  difference between a few and a few hundred MB/s;
* ``TUNSETOFFLOAD`` says which offloaded frames (partial checksums, TSO4/6, ECN, UFO) the *host* may
  hand us for the guest. It starts at none and the device sets it to what the guest driver negotiated;
* non-blocking, so the device's I/O thread never waits in a read or a write.

No helper scripts are run and no bridge is configured: the TAP is expected to be set up by whoever owns
the host network (``ip tuntap add``, a network namespace, libvirt), or passed in already open
(``fd=N``).
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import os
import struct
from enum import IntFlag

from pyemu.net import TapError

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the 24-byte union

VNET_HDR_LEN = 12
"""``struct virtio_net_hdr_v1`` (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
num_buffers): what a virtio 1.x driver puts before every frame, whether or not MRG_RXBUF is used."""


class Offload(IntFlag):
    """``TUN_F_*``: offloaded frames the host may deliver on the TAP (TUNSETOFFLOAD)."""

    NONE = 0
    CSUM = 0x01
    TSO4 = 0x02
    TSO6 = 0x04
    TSO_ECN = 0x08
    UFO = 0x10


class TapDevice:
    """An open, non-blocking TAP file descriptor and what it can do.

    ``vnet_hdr_len`` is 12 when frames carry a virtio-net header both ways, else 0. ``offloads`` is what
    :meth:`set_offload` accepts (empty without a vnet header: the host must then hand us complete frames).
    """

    def __init__(self, fd: int, ifname: str, *, vnet_hdr: bool, offloads: Offload) -> None:
        self.fd = fd
        self.ifname = ifname
        self.vnet_hdr = vnet_hdr
        self.offloads = offloads if vnet_hdr else Offload.NONE
        self.current_offload = Offload.NONE

    @property
    def vnet_hdr_len(self) -> int:
        return VNET_HDR_LEN if self.vnet_hdr else 0

    def fileno(self) -> int:
        if self.fd < 0:
            raise TapError(f"tap {self.ifname}: already closed", ifname=self.ifname)
        return self.fd

    def set_offload(self, offload: Offload) -> None:
        """Let the host hand us frames with these offloads (what the guest accepts), nothing else."""
        offload = Offload(offload)
        unsupported = offload & ~self.offloads
        if unsupported:
            raise TapError(f"tap {self.ifname}: offloads {unsupported!r} are not supported here",
                           ifname=self.ifname)
        if not self.vnet_hdr:
            return
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, int(offload))
        except OSError as exc:
            raise TapError(f"tap {self.ifname}: TUNSETOFFLOAD {offload!r} failed: {exc.strerror}",
                           ifname=self.ifname, errno=exc.errno) from exc
        self.current_offload = offload

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"TapDevice({self.ifname!r}, fd={self.fd}, vnet_hdr={self.vnet_hdr}, offloads={self.offloads!r})"


def _ifreq_name(ifname: str) -> bytes:
    raw = ifname.encode()
    if len(raw) >= IFNAMSIZ or "/" in ifname or any(c.isspace() for c in ifname) or ifname in (".", ".."):
        raise TapError(f"tap: invalid interface name '{ifname}' (at most {IFNAMSIZ - 1} bytes, no '/' "
                       "or spaces)", ifname=ifname)
    return raw


def open_tap(ifname: str = "", *, vnet_hdr: bool | None = None) -> TapDevice:
    """Open (creating if needed) TAP interface ``ifname`` (empty: the kernel names it ``tapN``).

    ``vnet_hdr``: None uses the virtio-net header when the kernel offers it, True requires it, False
    never uses it. Needs CAP_NET_ADMIN, or a persistent TAP owned by the caller (``ip tuntap add ...
    user U``).
    """
    name = _ifreq_name(ifname) if ifname else b""
    label = ifname or "tap"
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(f"could not open {TUN_PATH}: {exc.strerror}", ifname=label, errno=exc.errno) from exc
    try:
        features = _features(fd)
        use_vnet = bool(features & IFF_VNET_HDR) if vnet_hdr is None else vnet_hdr
        if use_vnet and not features & IFF_VNET_HDR:
            raise TapError(f"tap {label}: vnet_hdr=on, but this kernel's TAP has no IFF_VNET_HDR", ifname=label)
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if use_vnet else 0)
        try:
            answer = fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name, flags))
        except OSError as exc:
            hint = ""
            if exc.errno == errno_mod.EPERM:
                hint = " (creating or attaching a TAP needs CAP_NET_ADMIN, or a TAP owned by this user)"
            elif exc.errno == errno_mod.EBUSY:
                hint = " (another process has it open)"
            elif exc.errno == errno_mod.EINVAL and ifname:
                hint = f" (is '{ifname}' a TUN, not a TAP, or a multiqueue TAP?)"
            raise TapError(f"could not configure {TUN_PATH} ({label}): {exc.strerror}{hint}",
                           ifname=label, errno=exc.errno) from exc
        actual = IFREQ.unpack(answer)[0].rstrip(b"\0").decode(errors="replace")
        return _finish(fd, actual, use_vnet)
    except BaseException:
        os.close(fd)
        raise


def tap_from_fd(fd: int) -> TapDevice:
    """Take over an already-open TAP file descriptor (``-netdev tap,fd=N``, as libvirt passes them).

    The fd must be a TAP opened with IFF_NO_PI. A vnet header is used exactly when the opener set
    IFF_VNET_HDR (it cannot be switched on afterwards). On success the TapDevice owns ``fd``."""
    label = f"fd={fd}"
    try:
        os.fstat(fd)
    except OSError as exc:
        raise TapError(f"tap: file descriptor {fd} is not open: {exc.strerror}", ifname=label,
                       errno=exc.errno) from exc
    try:
        answer = fcntl.ioctl(fd, TUNGETIFF, IFREQ.pack(b"", 0))
    except OSError as exc:
        raise TapError(f"tap: file descriptor {fd} is not a TAP device (TUNGETIFF: {exc.strerror})",
                       ifname=label, errno=exc.errno) from exc
    raw_name, flags = IFREQ.unpack(answer)
    ifname = raw_name.rstrip(b"\0").decode(errors="replace")
    if not flags & IFF_TAP:
        raise TapError(f"tap: file descriptor {fd} ({ifname}) is a TUN device, not a TAP (no Ethernet frames)",
                       ifname=ifname)
    if not flags & IFF_NO_PI:
        raise TapError(f"tap: file descriptor {fd} ({ifname}) was opened without IFF_NO_PI (packet "
                       "information headers are not supported)", ifname=ifname)
    return _finish(fd, ifname, bool(flags & IFF_VNET_HDR))


def _features(fd: int) -> int:
    try:
        return int(struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4))[0])
    except OSError:
        return IFF_TAP | IFF_NO_PI  # a kernel too old to report features: assume no vnet header


def _finish(fd: int, ifname: str, vnet_hdr: bool) -> TapDevice:
    """Common set-up: non-blocking, header size, little-endian header, offload probing (then none)."""
    os.set_blocking(fd, False)
    offloads = Offload.NONE
    if vnet_hdr:
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as exc:
            raise TapError(f"tap {ifname}: TUNSETVNETHDRSZ {VNET_HDR_LEN} failed: {exc.strerror}",
                           ifname=ifname, errno=exc.errno) from exc
        try:
            # virtio 1.x headers are little-endian; only matters on big-endian hosts (and old kernels lack it).
            fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
        except OSError:
            pass
        offloads = _probe_offloads(fd)
    tap = TapDevice(fd, ifname, vnet_hdr=vnet_hdr, offloads=offloads)
    if vnet_hdr:
        tap.set_offload(Offload.NONE)  # nothing offloaded reaches us until the guest says it copes
    return tap


def _probe_offloads(fd: int) -> Offload:
    """What TUNSETOFFLOAD accepts here. Like QEMU's ``tap_probe_has_ufo``: UFO is tried on its own,
    because kernels since 4.14 treat it differently from the TCP offloads."""
    supported = Offload.NONE
    base = Offload.CSUM | Offload.TSO4 | Offload.TSO6 | Offload.TSO_ECN
    for candidate in (base, Offload.CSUM):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, int(candidate))
        except OSError:
            continue
        supported = candidate
        break
    if supported & Offload.CSUM:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, int(Offload.CSUM | Offload.UFO))
            supported |= Offload.UFO
        except OSError:
            pass
    return supported
