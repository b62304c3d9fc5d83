"""Image locking that QEMU understands: OFD byte-range locks on permission bytes.

QEMU (block/file-posix.c, ``raw_apply_lock_bytes`` / ``raw_check_lock_bytes``) advertises how it uses an
image with shared (F_RDLCK) open-file-description locks on single bytes of the image file:

* byte ``100 + bit`` held: "I use permission *bit*";
* byte ``200 + bit`` held: "I do not let anybody else use permission *bit*".

Bits (include/block/block-common.h): CONSISTENT_READ=0, WRITE=1, WRITE_UNCHANGED=2, RESIZE=3 (BLK_PERM_ALL
is 0x0f; the former GRAPH_MOD bit 4 is unused since QEMU 6.2). Opening takes the locks first and then
tests, with F_OFD_GETLK for an exclusive lock, that nobody else holds the "unshare" byte of a permission we
use nor the "use" byte of a permission we unshare. Taking before testing means two racing openers can both
fail, but never both succeed. Because the locks are only shared locks, taking them never blocks anybody;
only the test decides. The bytes lie past the end of small images, which is fine for locks.

OFD locks belong to the open file description, not to the process, so two opens of one image inside one
process conflict like two processes do, and closing another fd of the same file does not drop them (the
trap of classic POSIX locks). They go away when the description is closed.

What QEMU 7.2 actually holds (measured with /proc/locks): a read-write virtio-blk drive over raw locks
100, 101 and 201 (uses consistent-read and write, unshares write); a read-only one 100 and 201; with raw's
``offset``/``size`` it also unshares resize (203). ``qemu-io`` read-write holds 100-101 and unshares
nothing. :func:`default_permissions` reproduces the drive defaults.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

from pyemu.block.errors import BlockConfigError, BlockIOError, ImageLockedError

PERM_LOCK_BASE = 100
SHARED_LOCK_BASE = 200

F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock on 64-bit Linux: short l_type, short l_whence, (pad), off_t l_start, off_t l_len,
# pid_t l_pid, (pad) -- native alignment inserts the padding, 32 bytes in all.
_FLOCK = struct.Struct("hhqqi4x")
assert _FLOCK.size == 32, "struct flock layout differs on this platform"

# errnos meaning "this filesystem/kernel cannot do OFD locks" (as opposed to "somebody holds it").
_UNSUPPORTED = (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class BlockPerm(enum.IntFlag):
    """QEMU's BLK_PERM_* bits."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


PERM_ALL = BlockPerm(0x0F)
_NAMES = {
    BlockPerm.CONSISTENT_READ: "consistent read",
    BlockPerm.WRITE: "write",
    BlockPerm.WRITE_UNCHANGED: "write unchanged",
    BlockPerm.RESIZE: "resize",
}
_BITS = tuple(enumerate((BlockPerm.CONSISTENT_READ, BlockPerm.WRITE, BlockPerm.WRITE_UNCHANGED,
                         BlockPerm.RESIZE)))


def perm_name(perm: BlockPerm) -> str:
    """QEMU's ``bdrv_perm_names`` for one or more bits ("write", "consistent read, resize")."""
    return ", ".join(name for bit, name in _NAMES.items() if perm & bit)


def default_permissions(*, read_only: bool, fixed_size: bool = False) -> tuple[BlockPerm, BlockPerm]:
    """``(perm, shared)`` a QEMU virtio-blk drive holds on its file node.

    Read-write: uses consistent-read + write, shares all but write. Read-only: uses consistent-read and
    *still* refuses writers (share-rw=off, QEMU's default). ``fixed_size`` (raw with offset/size) also
    refuses resizing.
    """
    perm = BlockPerm.CONSISTENT_READ if read_only else BlockPerm.CONSISTENT_READ | BlockPerm.WRITE
    shared = BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED | BlockPerm.RESIZE
    if fixed_size:
        shared &= ~BlockPerm.RESIZE
    return perm, shared


def _fcntl_lock(fd: int, cmd: int, lock_type: int, start: int) -> bytes:
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, start, 1, 0)
    while True:
        try:
            return fcntl.fcntl(fd, cmd, arg)
        except InterruptedError:
            continue


def byte_is_locked_by_others(fd: int, byte: int) -> bool:
    """True when another open file description holds any lock on ``byte`` (F_OFD_GETLK, exclusive probe)."""
    result = _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, byte)
    return bool(_FLOCK.unpack(result)[0] != fcntl.F_UNLCK)


class ImageLock:
    """The permission locks one open file description holds on an image."""

    def __init__(self, fd: int, filename: str) -> None:
        self._fd = fd
        self._filename = filename
        self.perm = BlockPerm(0)
        self.shared = PERM_ALL
        self.active = False

    def _bytes(self, perm: BlockPerm, shared: BlockPerm) -> list[int]:
        used = [PERM_LOCK_BASE + i for i, bit in _BITS if perm & bit]
        unshared = [SHARED_LOCK_BASE + i for i, bit in _BITS if not shared & bit]
        return used + unshared

    def acquire(self, perm: BlockPerm, shared: BlockPerm, *, required: bool) -> bool:
        """Take the locks for ``perm``/``shared`` and check for conflicts.

        Returns False (and holds nothing) when the filesystem cannot do OFD locks and ``required`` is False
        (locking=auto); raises BlockConfigError for that case when ``required`` (locking=on), and
        ImageLockedError when another user conflicts.
        """
        try:
            for byte in self._bytes(perm, shared):
                _fcntl_lock(self._fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
            self.active = True
            self.perm, self.shared = perm, shared
            self._check(perm, shared)
        except OSError as exc:
            self.release()
            if exc.errno in _UNSUPPORTED:
                if not required:
                    return False
                raise BlockConfigError(f"Could not lock '{self._filename}': the filesystem does not support "
                                       f"OFD locks ({os.strerror(exc.errno or errno.ENOLCK)}); use locking=off",
                                       errno=exc.errno) from exc
            raise BlockIOError.from_os_error("lock", self._filename, exc) from exc
        except ImageLockedError:
            self.release()
            raise
        return True

    def take(self, perm: BlockPerm, shared: BlockPerm) -> None:
        """Hold the bytes for ``perm``/``shared`` without testing for conflicts (a reopen moving its locks to
        a new file description tests with :meth:`check` only once the old description let go of its own,
        which would otherwise conflict with the new ones). Shared locks never block. Raises OSError."""
        for byte in self._bytes(perm, shared):
            _fcntl_lock(self._fd, F_OFD_SETLK, fcntl.F_RDLCK, byte)
        self.active = True
        self.perm, self.shared = perm, shared

    def check(self) -> None:
        """Raise ImageLockedError when another description conflicts with the permissions held."""
        self._check(self.perm, self.shared)

    def _check(self, perm: BlockPerm, shared: BlockPerm) -> None:
        for i, bit in _BITS:
            if perm & bit and byte_is_locked_by_others(self._fd, SHARED_LOCK_BASE + i):
                raise ImageLockedError(self._filename, _NAMES[bit], shared=False)
        for i, bit in _BITS:
            if not shared & bit and byte_is_locked_by_others(self._fd, PERM_LOCK_BASE + i):
                raise ImageLockedError(self._filename, _NAMES[bit], shared=True)

    def release(self) -> None:
        """Drop every permission byte (closing the fd would too; this is for failed opens and tests)."""
        if not self.active:
            return
        for byte in self._bytes(PERM_ALL, BlockPerm(0)):
            try:
                _fcntl_lock(self._fd, F_OFD_SETLK, fcntl.F_UNLCK, byte)
            except OSError:
                pass  # unlocking cannot conflict; an fd already closed releases everything anyway
        self.active = False
        self.perm, self.shared = BlockPerm(0), PERM_ALL


# -- inactive images (an incoming migration's destination; pyemu.migration.images) -------------------------
_OPENED: ContextVar[list[Any] | None] = ContextVar("pyemu_opened_images", default=None)
_INACTIVE: ContextVar[bool] = ContextVar("pyemu_inactive_images", default=False)


@contextmanager
def collecting_images(*, inactive: bool) -> Iterator[list[Any]]:
    """Record the file nodes opened in the body (a VM being built); with ``inactive`` they open without
    taking their locks, as QEMU opens a migration destination's images (BDRV_O_INACTIVE): the source still
    uses them until the end of the migration. :meth:`ImageLock.acquire` with the recorded ``perm`` and
    ``shared`` activates one later."""
    opened: list[Any] = []
    opened_token = _OPENED.set(opened)
    inactive_token = _INACTIVE.set(inactive)
    try:
        yield opened
    finally:
        _INACTIVE.reset(inactive_token)
        _OPENED.reset(opened_token)


def opening_inactive() -> bool:
    return _INACTIVE.get()


def note_opened(node: Any) -> None:
    opened = _OPENED.get()
    if opened is not None:
        opened.append(node)
