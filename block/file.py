"""The ``file`` protocol driver: a host regular file or block device, read and written in place.

This is QEMU's file-posix in miniature. Reads and writes are ``os.preadv``/``os.pwritev`` straight between
the image and the caller's memoryviews (guest RAM), so no byte is copied on the common path. Sparse files are
first-class: :meth:`FileProtocol.block_status` asks SEEK_DATA/SEEK_HOLE, discard punches holes
(fallocate PUNCH_HOLE|KEEP_SIZE), write-zeroes prefers fallocate over writing zero buffers. ``direct=True``
(cache=none) opens with O_DIRECT and hides its alignment rules (see :mod:`pyemu.block.hostio`). On open the
image is locked the way QEMU locks it (see :mod:`pyemu.block.locking`), so pyemu and QEMU never write one
image at the same time.

The size is read once at open: it is the disk's capacity, which a device reads once too. A file that
shrinks behind our back reads as zeros past its new end; requests past the capacity are refused, so a
write never grows the file -- unless the node was opened ``growable`` (the file under a qcow2 node, which
appends clusters): then writes may extend it and :meth:`FileProtocol.truncate` sets its length.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from typing import Sequence

from pyemu.block.driver import BlockCapabilities, BlockStatus, PassThrough, check_request
from pyemu.block.errors import BlockConfigError, BlockIOError, ReadOnlyError
from pyemu.block.hostio import (EXT4_SUPER_MAGIC, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
                                FALLOC_FL_ZERO_RANGE, DirectIO, dio_alignment, fallocate, filesystem_type,
                                read_full, write_full, zero_chunks)
from pyemu.block.iovec import byte_views, total_length
from pyemu.block.locking import BlockPerm, ImageLock, default_permissions, note_opened, opening_inactive
from pyemu.block.reopen import ReopenError

LOCKING_MODES = ("auto", "on", "off")
MAX_FILE_SIZE = (1 << 63) - 1  # off_t

# fallocate/lseek errnos meaning "this filesystem or device cannot do that" (remembered, not retried) ...
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY)
# Buffered writes this large reserve their blocks first (FileProtocol._reserve_blocks), on these filesystems.
RESERVE_MIN = 64 << 10
RESERVING_FILESYSTEMS = (EXT4_SUPER_MAGIC,)
# ... and "not for this request" (a block device wants sector-aligned ranges; a busy device): fall back once.
_NOT_NOW = (errno.EINVAL, errno.EBUSY)



class FileProtocol:
    """A host file or block device as a block node. Create with :meth:`open`."""

    name = "file"

    def __init__(self, *, fd: int, filename: str, size: int, read_only: bool, is_block_device: bool,
                 direct: DirectIO | None, lock: ImageLock | None, growable: bool = False,
                 no_flush: bool = False) -> None:
        self._fd = fd
        # cache=unsafe (cache.no-flush): flushes are ignored right here, so the format drivers above keep
        # their write order but nothing waits for the disk (qemu-img convert's default for its target).
        self.no_flush = no_flush
        self.growable = growable
        self._size_lock = threading.Lock()
        self.filename = filename
        self._size = size
        self.read_only = read_only
        self.is_block_device = is_block_device
        self._direct = direct
        self.lock = lock
        self.capabilities = BlockCapabilities(discard=True, write_zeroes=True, block_status=not is_block_device,
                                              direct_io=direct is not None)
        self._punch_hole = True
        self._zero_range = True
        self._seek_data = not is_block_device
        self._reserve = direct is None and not is_block_device and filesystem_type(fd) in RESERVING_FILESYSTEMS
        self._flush_error = 0  # errno of a failed fdatasync: the page cache state is unknown from then on
        self._close_lock = threading.Lock()
        self._closed = False
        self._saved_perms: tuple[BlockPerm, BlockPerm] | None = None
        """The locks held before a read-write reopen, put back by the reopen to read-only."""

    # -- opening -------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, filename: str, *, read_only: bool = False, direct: bool = False, locking: str = "auto",
             perm: BlockPerm | None = None, shared: BlockPerm | None = None,
             growable: bool = False, no_flush: bool = False) -> "FileProtocol":
        """Open ``filename`` and take QEMU-compatible image locks.

        ``perm``/``shared`` default to what a QEMU virtio-blk drive holds (see
        :func:`~pyemu.block.locking.default_permissions`). Raises BlockConfigError when the file cannot be
        opened as asked (QEMU's "Could not open 'PATH': ..." messages) and ImageLockedError when another
        process uses the image in a conflicting way.
        """
        if locking not in LOCKING_MODES:
            raise BlockConfigError(f"Invalid locking mode '{locking}' (expected auto, on or off)")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(filename, flags | (os.O_DIRECT if direct else 0))
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise BlockConfigError(f"Could not open '{filename}': filesystem does not support O_DIRECT",
                                       errno=exc.errno) from exc
            raise BlockConfigError(f"Could not open '{filename}': {os.strerror(exc.errno or errno.EIO)}",
                                   errno=exc.errno) from exc
        extra_fd = -1
        try:
            st = os.fstat(fd)
            is_block_device = stat.S_ISBLK(st.st_mode)
            if not (stat.S_ISREG(st.st_mode) or is_block_device):
                raise BlockConfigError(f"'file' driver requires '{filename}' to be a regular file or a block "
                                       "device", errno=errno.EINVAL)
            size = os.lseek(fd, 0, os.SEEK_END)
            lock: ImageLock | None = None
            if locking != "off":
                default_perm, default_shared = default_permissions(read_only=read_only)
                lock = ImageLock(fd, filename)
                if opening_inactive():  # a migration destination: the locks are taken at activation
                    lock.perm = default_perm if perm is None else perm
                    lock.shared = default_shared if shared is None else shared
                elif not lock.acquire(default_perm if perm is None else perm,
                                      default_shared if shared is None else shared, required=locking == "on"):
                    lock = None
            direct_io: DirectIO | None = None
            if direct:
                extra_fd = os.open(filename, flags)
                direct_io = DirectIO(fd, extra_fd, size, dio_alignment(fd))
            node = cls(fd=fd, filename=filename, size=size, read_only=read_only, is_block_device=is_block_device,
                       direct=direct_io, lock=lock, growable=growable and not is_block_device, no_flush=no_flush)
            note_opened(node)
            return node
        except BaseException:
            os.close(fd)
            if extra_fd >= 0:
                os.close(extra_fd)
            raise

    # -- reopening (read-only <-> read-write; pyemu.block.reopen) ------------------------------------------

    def reopen(self, *, read_only: bool, perm: BlockPerm | None = None, shared: BlockPerm | None = None) -> None:
        """Switch the node between read-only and read-write in place, all or nothing (QEMU's file-posix
        reopen): a new descriptor is opened with the new access mode, the image locks move to it with the
        new ``perm``/``shared`` (default: a read-write drive's, or what was held before the last read-write
        reopen), and only when both worked does it replace the old one -- ``dup2`` onto the same number, so
        a request already in a system call finishes on the old description and every later one uses the new.
        Raises ReopenError (the file cannot be opened so: "Could not reopen file: ...") or ImageLockedError
        (another process holds a conflicting lock); the node is unchanged then. Callers quiesce the node's
        writers before going read-only."""
        self._check_open(-1, -1)
        if read_only == self.read_only and perm is None and shared is None:
            return
        if perm is None or shared is None:
            if read_only and self._saved_perms is not None:
                default_perm, default_shared = self._saved_perms
            else:
                default_perm, default_shared = default_permissions(read_only=read_only)
            perm = default_perm if perm is None else perm
            shared = default_shared if shared is None else shared
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            new_fd = os.open(self.filename, flags | (os.O_DIRECT if self._direct is not None else 0))
        except OSError as exc:
            raise ReopenError(f"Could not reopen file: {os.strerror(exc.errno or errno.EIO)}",
                               errno=exc.errno) from exc
        new_extra = -1
        new_lock: ImageLock | None = None
        old_lock = self.lock
        held = (old_lock.perm, old_lock.shared) if old_lock is not None and old_lock.active else None
        try:
            st_new, st_old = os.fstat(new_fd), os.fstat(self._fd)
            if (st_new.st_dev, st_new.st_ino) != (st_old.st_dev, st_old.st_ino):
                # QEMU reopens by name too; pyemu refuses to switch to another file behind the same name.
                raise ReopenError(f"Could not reopen file: '{self.filename}' is no longer the image that was "
                                  "opened", errno=errno.ESTALE)
            if self._direct is not None:
                new_extra = os.open(self.filename, flags)
            if old_lock is not None and old_lock.active:
                new_lock = self._move_locks(new_fd, old_lock, perm, shared)
        except BaseException:
            os.close(new_fd)
            if new_extra >= 0:
                os.close(new_extra)
            raise
        # Committed: the new descriptions take the old numbers (the old ones close, dropping nothing we
        # still need: their lock bytes were released above).
        if not read_only and self.read_only:
            self._saved_perms = held
        if read_only:
            self.read_only = True
        try:
            if self._direct is not None:
                os.dup2(new_extra, self._direct.buffered_fd, inheritable=False)
            os.dup2(new_fd, self._fd, inheritable=False)
        finally:
            os.close(new_fd)
            if new_extra >= 0:
                os.close(new_extra)
        if new_lock is not None:
            moved = ImageLock(self._fd, self.filename)  # the same description, under the number we keep
            moved.perm, moved.shared, moved.active = new_lock.perm, new_lock.shared, True
            self.lock = moved
        elif old_lock is not None:  # inactive (a migration destination): activation takes the new mode's
            old_lock.perm, old_lock.shared = perm, shared
        self.read_only = read_only

    def _move_locks(self, new_fd: int, old_lock: ImageLock, perm: BlockPerm, shared: BlockPerm) -> ImageLock:
        """Take ``perm``/``shared`` on ``new_fd``, let the old description's bytes go, then test: a conflict
        puts the old bytes back and raises ImageLockedError (no moment without our old locks' union)."""
        new_lock = ImageLock(new_fd, self.filename)
        old_perm, old_shared = old_lock.perm, old_lock.shared
        try:
            new_lock.take(perm, shared)
        except OSError as exc:
            new_lock.release()
            raise BlockIOError.from_os_error("lock", self.filename, exc) from exc
        old_lock.release()
        try:
            new_lock.check()
        except BaseException:
            new_lock.release()
            try:
                old_lock.take(old_perm, old_shared)
            except OSError:
                pass  # shared read locks cannot conflict; only a vanished descriptor fails, and then nothing holds
            raise
        return new_lock

    # -- the driver interface ------------------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def pass_through(self) -> PassThrough | None:
        """The descriptor requests to this file may use directly (see :class:`PassThrough`); None once
        closed. No writes when the file is read-only."""
        if self._closed:
            return None
        floor = -1 if self.read_only else 0
        direct = self._direct
        if direct is None:
            return PassThrough(self._fd, 0, self._size, 0, 0, floor)
        return PassThrough(direct.fd, 0, self._size, direct.align, direct.tail_start, floor)

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers, writable=True)
        length = total_length(views)
        check_request(offset, length, self._size, what="read")
        if not length:
            return
        self._check_open(offset, length)
        try:
            if self._direct is not None:
                self._direct.preadv(offset, views, length)
            else:
                read_full(self._fd, offset, views)
        except OSError as exc:
            raise BlockIOError.from_os_error("read", self.filename, exc, offset=offset, length=length) from exc

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview]) -> None:
        views = byte_views(buffers, writable=False)
        length = total_length(views)
        self._check_target(offset, length, "write")
        self._check_writable("write", offset, length)
        if not length:
            return
        self._check_open(offset, length)
        try:
            if self._direct is not None:
                self._direct.pwritev(offset, views, length)
            else:
                if self._reserve and length >= RESERVE_MIN:
                    self._reserve_blocks(offset, length)
                write_full(self._fd, offset, views)
        except OSError as exc:
            raise BlockIOError.from_os_error("write", self.filename, exc, offset=offset, length=length) from exc
        self._grew_to(offset + length)

    def flush(self) -> None:
        self._check_open(-1, -1)
        if self.no_flush:
            return
        if self._flush_error:
            # After a failed fdatasync the kernel may have dropped dirty pages: QEMU fails every later flush
            # instead of reporting success over lost data.
            raise BlockIOError(f"flush on '{self.filename}' failed earlier: {os.strerror(self._flush_error)}",
                               errno=self._flush_error)
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            if self._direct is None:
                self._flush_error = exc.errno or errno.EIO
            raise BlockIOError.from_os_error("flush", self.filename, exc) from exc

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole. Unsupported filesystems keep the data: discard is only a hint."""
        check_request(offset, length, self._size, what="discard")
        self._check_writable("discard", offset, length)
        if not length or not self._punch_hole:
            return
        self._check_open(offset, length)
        try:
            with self._serialised(offset, length):
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._punch_hole = False
                return
            if exc.errno in _NOT_NOW:
                return
            raise BlockIOError.from_os_error("discard", self.filename, exc, offset=offset, length=length) from exc

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool) -> None:
        """Punch a hole (``may_unmap``), else zero the range in place (ZERO_RANGE), else write zeros."""
        self._check_target(offset, length, "write-zeroes")
        self._check_writable("write-zeroes", offset, length)
        if not length:
            return
        self._check_open(offset, length)
        end = offset + length
        if end > self._size:  # growing: zeros past the end are what ftruncate gives
            if offset < self._size:
                self.write_zeroes(offset, self._size - offset, may_unmap=may_unmap)
            self.truncate(end)
            return
        try:
            with self._serialised(offset, length):
                if may_unmap and self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
                    return
                if self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
                    return
            self._write_zero_buffers(offset, length)
        except OSError as exc:
            raise BlockIOError.from_os_error("write-zeroes", self.filename, exc, offset=offset,
                                             length=length) from exc

    def truncate(self, size: int) -> None:
        """Set the file's length (growable nodes only: the qcow2 driver grows and trims its file)."""
        if not self.growable:
            raise BlockIOError(f"'{self.filename}' cannot be resized", errno=errno.ENOTSUP)
        self._check_target(size, 0, "truncate")
        self._set_length(size)

    def _set_length(self, size: int) -> None:
        self._check_writable("truncate", size, 0)
        self._check_open(size, 0)
        with self._size_lock:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                raise BlockIOError.from_os_error("truncate", self.filename, exc, offset=size) from exc
            self._size_is(size)

    def resize(self, size: int) -> None:
        """``block_resize`` of a file node (QEMU's file-posix truncate): a regular file gets ``ftruncate``, a
        host block device keeps its length and may only be "resized" to at most that length."""
        self._check_writable("resize", size, 0)
        if size < 0:
            raise BlockIOError("Image size cannot be negative", errno=errno.EINVAL)
        if self.is_block_device:
            self._check_open(size, 0)
            try:
                length = os.lseek(self._fd, 0, os.SEEK_END)
            except OSError as exc:
                raise BlockIOError.from_os_error("resize", self.filename, exc) from exc
            if size > length:
                raise BlockIOError("Cannot grow device files", errno=errno.EINVAL)
            return
        self._check_open(size, 0)
        with self._size_lock:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:  # QEMU's file-posix words
                code = exc.errno or errno.EIO
                raise BlockIOError(f"Could not resize file: {os.strerror(code)}", errno=code) from exc
            self._size_is(size)

    def allocated_bytes(self) -> int:
        """Bytes the host file really occupies (st_blocks), qemu-img's "disk size"."""
        self._check_open(-1, -1)
        return os.fstat(self._fd).st_blocks * 512

    def block_status(self, offset: int, length: int) -> BlockStatus:
        check_request(offset, length, self._size, what="block-status", nonempty=True)
        self._check_open(offset, length)
        end = offset + length
        if not self._seek_data:
            return BlockStatus(offset, length, allocated=True, zero=False)
        try:
            data = os.lseek(self._fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from offset to the end of the file
                return BlockStatus(offset, length, allocated=False, zero=True)
            if exc.errno in _UNSUPPORTED or exc.errno == errno.EINVAL:
                self._seek_data = False
                return BlockStatus(offset, length, allocated=True, zero=False)
            raise BlockIOError.from_os_error("block-status", self.filename, exc, offset=offset,
                                             length=length) from exc
        if data > offset:
            return BlockStatus(offset, min(data, end) - offset, allocated=False, zero=True)
        try:
            hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # the file shrank under us between the two calls
                return BlockStatus(offset, length, allocated=False, zero=True)
            raise BlockIOError.from_os_error("block-status", self.filename, exc, offset=offset,
                                             length=length) from exc
        return BlockStatus(offset, max(1, min(hole, end) - offset), allocated=True, zero=False)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            if self._direct is not None:
                self._direct.close()
                os.close(self._direct.buffered_fd)
            os.close(self._fd)  # drops the OFD image locks with the open file description

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self, offset: int, length: int) -> None:
        if self._closed:
            raise BlockIOError(f"'{self.filename}' is closed", errno=errno.EBADF, offset=offset, length=length)

    def _check_target(self, offset: int, length: int, what: str) -> None:
        """Writes stay inside the file -- or, on a growable node, anywhere below the largest file size."""
        check_request(offset, length, MAX_FILE_SIZE if self.growable else self._size, what=what)

    def _grew_to(self, end: int) -> None:
        if end > self._size:
            with self._size_lock:
                self._size_is(max(self._size, end))

    def _size_is(self, size: int) -> None:
        """The file is ``size`` bytes now (``_size_lock`` held): the O_DIRECT boundary moves with it."""
        self._size = size
        if self._direct is not None:
            self._direct.follow_size(size)

    def _check_writable(self, op: str, offset: int, length: int) -> None:
        if self.read_only:
            raise ReadOnlyError(f"{op} on read-only image '{self.filename}'", offset=offset, length=length)

    def _serialised(self, offset: int, length: int) -> contextlib.AbstractContextManager[None]:
        """Hold the range against concurrent O_DIRECT read-modify-write of the same blocks."""
        if self._direct is None:
            return contextlib.nullcontext()
        return self._direct.range_lock.hold(*self._direct.aligned_range(offset, length))

    def _reserve_blocks(self, offset: int, length: int) -> None:
        """Allocate the blocks a large buffered write is about to fill, in one fallocate (KEEP_SIZE: the
        file's length still changes only through the write).

        Why: ext4 reserves a buffered write into a hole page by page (delayed allocation); one extent
        reservation first is cheaper. Measured here: 512 writes of 1 MiB into a new file (appended, or
        into a sparse file's holes) took 0.085-0.10 s, 0.06 s with this first; over blocks already
        allocated the call costs about 1 us (so small writes skip it: +50% on a 4 KiB overwrite). On tmpfs
        it cost 5% and with O_DIRECT it gained nothing, so only buffered writes on ext4 do it (other
        filesystems are unmeasured). A failure is left to the write to report; an unsupported call is not
        tried again."""
        try:
            fallocate(self._fd, FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._reserve = False

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        if not (self._punch_hole if punch else self._zero_range):
            return False
        try:
            fallocate(self._fd, mode, offset, length)
            return True
        except OSError as exc:
            if exc.errno in _NOT_NOW:
                return False
            if exc.errno not in _UNSUPPORTED:
                raise
            if punch:
                self._punch_hole = False
            else:
                self._zero_range = False
            return False

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        if self._direct is not None:
            self._direct.write_zeroes(offset, length)
            return
        for pos, chunk in zero_chunks(offset, length):
            write_full(self._fd, pos, [chunk])
