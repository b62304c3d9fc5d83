"""BlockBackend: the one object a device holds, and the cache modes that shape its write path.

As in QEMU, a device never talks to a driver node: the backend sits between them and owns the policies
that belong to the *drive*, not to any format -- read-only, write-back vs write-through caching,
flush suppression (cache=unsafe), whether guest discards reach the image -- and the lifetime rule that a
drive closed under a running device fails requests cleanly (ENOMEDIUM, QEMU's "no medium") instead of
touching a closed fd. Keeping these here means a new driver (qcow2, nbd) gets them for free and the graph
below can change (a filter inserted, a node replaced) without the device noticing.

Thread safety: requests may come from several I/O threads at once; the drivers below are safe for that
(positional I/O on one fd). The backend only counts requests in flight so :meth:`close` can wait for them
before it closes the nodes.
"""

from __future__ import annotations

import errno
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from pyemu.block import borrowed, graph
from pyemu.block.borrowed import BorrowedNode
from pyemu.block.dirty_bitmap import BitmapSet, existing_bitmaps
from pyemu.block.driver import BlockCapabilities, BlockDriver, BlockStatus, PassThrough
from pyemu.block.errors import BlockConfigError, BlockIOError, ReadOnlyError
from pyemu.block.hostio import zero_chunks
from pyemu.block.locking import PERM_ALL, BlockPerm, note_opened, opening_inactive
from pyemu.block.throttle import THROTTLE_GROUPS, ThrottleConfig, ThrottleGroupMember, Ticket
from pyemu.block.throttle import admitted as throttle_admitted

DISCARD_MODES = ("ignore", "unmap")


@dataclass(frozen=True)
class CacheMode:
    """QEMU's cache modes as three switches (the ``cache.*`` options).

    ``direct``: O_DIRECT, bypass the host page cache. ``writeback``: the guest sees a volatile write cache and
    must flush; without it every write is followed by a flush (write-through). ``no_flush``: flushes are
    ignored (cache=unsafe: fast, and a host crash loses data).
    """

    direct: bool = False
    writeback: bool = True
    no_flush: bool = False

    @classmethod
    def parse(cls, text: str) -> "CacheMode":
        """``writeback`` (default), ``writethrough``, ``none`` (alias ``off``), ``directsync``, ``unsafe``."""
        modes = {
            "writeback": cls(direct=False, writeback=True, no_flush=False),
            "writethrough": cls(direct=False, writeback=False, no_flush=False),
            "none": cls(direct=True, writeback=True, no_flush=False),
            "off": cls(direct=True, writeback=True, no_flush=False),
            "directsync": cls(direct=True, writeback=False, no_flush=False),
            "unsafe": cls(direct=False, writeback=True, no_flush=True),
        }
        try:
            return modes[text]
        except KeyError:
            raise BlockConfigError(f"-drive: invalid cache option '{text}' (expected writeback, writethrough, "
                                   "none, directsync or unsafe)") from None

    @property
    def writethrough(self) -> bool:
        return not self.writeback

    @property
    def name(self) -> str:
        """The QEMU name of this combination ('writeback', 'none', ...), or a cache.* description."""
        for name in ("writeback", "writethrough", "none", "directsync", "unsafe"):
            if CacheMode.parse(name) == self:
                return name
        return f"cache.direct={'on' if self.direct else 'off'},cache.writeback={'on' if self.writeback else 'off'}" \
               f",cache.no-flush={'on' if self.no_flush else 'off'}"


class BlockBackend:
    """What a device model holds: a root node plus the drive's policies."""

    def __init__(self, root: BlockDriver, *, read_only: bool, cache: CacheMode = CacheMode(),
                 discard: str = "ignore", id: str = "", owns_root: bool = True, user: str | None = None,
                 shared: BlockPerm | None = None) -> None:
        if discard not in DISCARD_MODES:
            raise BlockConfigError(f"-drive: invalid discard option '{discard}' (expected ignore or unmap)")
        if root.read_only and not read_only:
            raise BlockConfigError(f"-drive: '{root.filename}' is opened read-only; the drive must be read-only too")
        self.root = root
        self.id = id
        # A -drive opens its own graph and closes it with the drive; a device on a -blockdev node only
        # uses a node the user owns (owns_root=False). Ownership stays with the first root even after a
        # swap (replace_root), so the drive's own image is closed exactly once, whatever root is current.
        self._owned_root = root if owns_root else None
        self._user = user or (f"drive '{id}'" if id else "a drive")
        self._perm = BlockPerm.CONSISTENT_READ | (BlockPerm(0) if read_only else BlockPerm.WRITE)
        # share-rw=off, QEMU's default: a device refuses other writers even when it only reads. A block
        # export passes ``shared`` (everything, as QEMU's exports: they sit beside the guest's device).
        self._shared = shared if shared is not None else \
            BlockPerm.CONSISTENT_READ | BlockPerm.WRITE_UNCHANGED | BlockPerm.RESIZE
        # QEMU's blk->disable_perm for a device of an -incoming VM: until the VM first runs it shares
        # everything, so a writable NBD export of its node can take the source's mirror (non-shared storage
        # migration); pyemu.migration.images applies the real sharing when the VM runs.
        self._deferred_shared: BlockPerm | None = None
        if shared is None and opening_inactive():
            self._deferred_shared, self._shared = self._shared, PERM_ALL
            note_opened(self)
        self._attachment = graph.attach(root, user=self._user, role="root", perm=self._perm, shared=self._shared)
        self._quiesced = 0
        self.cache = cache
        self.discard_mode = discard
        self._read_only = read_only
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False
        self.throttle: ThrottleGroupMember | None = None
        """The drive's place in a throttle group (``throttling.*``, ``block_set_io_throttle``), or None."""
        # block_resize: the device learns its drive's new size through these (QEMU's resize_cb dev op).
        self._known_size = root.size()
        self.resize_listeners: list[Callable[[int], None]] = []
        self.lease_revokers: list[Callable[[], None]] = []
        """Called (any thread, no lock held) before the drive is drained, closed or throttled: a device that
        lets C code serve requests between its passes holding a :meth:`begin_pass_through` (virtio-blk's
        leased queues, :class:`~pyemu.hw.virtio.blk_plane.Lease`) stops that code and ends it."""

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def capabilities(self) -> BlockCapabilities:
        return self.root.capabilities

    @property
    def filename(self) -> str:
        return self.root.filename

    @property
    def closed(self) -> bool:
        return self._closed

    # -- requests --------------------------------------------------------------------------------------------

    def size(self) -> int:
        return self.root.size()

    def preadv(self, offset: int, buffers: Sequence[memoryview], *, admitted: bool = False) -> None:
        """``admitted``: the caller already got the request through the throttle (:meth:`admit`); else a
        throttled drive makes the calling thread wait its turn (never call that from an I/O thread loop)."""
        if not admitted and self.throttle is not None:
            self.throttle.wait(False, sum(memoryview(b).nbytes for b in buffers))
        self._enter(offset)
        try:
            with throttle_admitted(self.throttle_member() if admitted else None):
                self.root.preadv(offset, buffers)
        finally:
            self._leave()

    def begin_pass_through(self) -> PassThrough | None:
        """Requests may go straight to the returned host descriptor (:class:`PassThrough`) until
        :meth:`end_pass_through`, which must follow whenever this returns one: they count as in flight
        meanwhile, so a drain (a graph change, a snapshot, closing the drive) waits for them. None, with
        nothing to end, when the drive is throttled or its root is not plain raw over a file, or it is
        closed or quiesced: then requests take :meth:`preadv` and :meth:`pwritev`.

        Writes are withheld (``write_floor`` -1) from a read-only drive, a writethrough one (each write
        needs its flush) and, under O_DIRECT, a drive that lets others write the image too (share-rw=on):
        :meth:`pwritev` serialises an aligned write against another writer's read-modify-write of the same
        blocks, which a write that bypasses it could not. Whoever writes through it reports the ranges with
        :meth:`wrote_through`."""
        if self.throttle is not None:
            return None
        offer = getattr(self.root, "pass_through", None)
        if offer is None:
            return None
        with self._cond:
            if self._quiesced or self._closed:
                return None
            self._inflight += 1
        target: PassThrough | None = None
        try:
            target = offer()
            if target is not None and target.write_floor >= 0 and (
                    self._read_only or (self.cache.writethrough and not self.cache.no_flush)
                    or (target.direct_align and self._shared & BlockPerm.WRITE)):
                target = target._replace(write_floor=-1)
            return target
        finally:
            if target is None:
                self._leave()

    def wrote_through(self, ranges: Sequence[tuple[int, int]]) -> None:
        """``(offset, length)`` disk ranges were written through :meth:`begin_pass_through`'s descriptor: the
        dirty bitmaps record them, as after :meth:`pwritev`."""
        for offset, length in ranges:
            self._mark_dirty(offset, length)

    def end_pass_through(self) -> None:
        end = getattr(self.root, "end_pass_through", None)  # the root cannot change while this is in flight
        try:
            if end is not None:
                end()
        finally:
            self._leave()

    def pwritev(self, offset: int, buffers: Sequence[bytes | memoryview], *, admitted: bool = False) -> None:
        self._check_writable("write", offset, buffers)
        if not admitted and self.throttle is not None:
            self.throttle.wait(True, sum(memoryview(b).nbytes for b in buffers))
        self._enter(offset)
        try:
            with throttle_admitted(self.throttle_member() if admitted else None):
                self.root.pwritev(offset, buffers)
            if self.cache.writethrough and not self.cache.no_flush:
                self.root.flush()
        finally:
            self._mark_dirty(offset, sum(memoryview(b).nbytes for b in buffers))
            self._leave()

    def flush(self) -> None:
        if self.cache.no_flush:
            return
        self._enter(-1)
        try:
            self.root.flush()
        finally:
            self._leave()

    def discard(self, offset: int, length: int, *, admitted: bool = False) -> None:
        """Pass the guest's discard down with discard=unmap; with discard=ignore (or a node that cannot
        discard) succeed without doing anything, as QEMU does. The drive's own limits do not apply to
        discards (QEMU's blk_co_pdiscard has no throttle); a ``throttle`` filter node's do, as writes
        (``admitted``: the device already got it through that node's member)."""
        self._check_writable("discard", offset, length)
        if self.discard_mode == "ignore":
            return
        self._enter(offset)
        try:
            if self.root.capabilities.discard:  # a hint: a node without it (after a root swap) just keeps data
                with throttle_admitted(self.throttle_member() if admitted else None):
                    self.root.discard(offset, length)
        finally:
            self._mark_dirty(offset, length)
            self._leave()

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool, admitted: bool = False) -> None:
        """Zero the range; ``may_unmap`` is honoured only with discard=unmap (QEMU drops BDRV_REQ_MAY_UNMAP
        otherwise). Throttled as a write of ``length`` bytes, as QEMU's blk_co_pwrite_zeroes goes through
        blk_co_pwritev_part (``admitted`` as for :meth:`pwritev`): zeroes are no way around a limit."""
        self._check_writable("write-zeroes", offset, length)
        if not admitted and self.throttle is not None:
            self.throttle.wait(True, length)
        self._enter(offset)
        try:
            with throttle_admitted(self.throttle_member() if admitted else None):
                if self.root.capabilities.write_zeroes:
                    self.root.write_zeroes(offset, length, may_unmap=may_unmap and self.discard_mode == "unmap")
                else:  # the device offered WRITE_ZEROES for the node it started on; a swapped-in one gets zeros
                    for pos, zeros in zero_chunks(offset, length):
                        self.root.pwritev(pos, [zeros])
            if self.cache.writethrough and not self.cache.no_flush:
                self.root.flush()
        finally:
            self._mark_dirty(offset, length)
            self._leave()

    def block_status(self, offset: int, length: int) -> BlockStatus:
        self._enter(offset)
        try:
            return self.root.block_status(offset, length)
        finally:
            self._leave()

    # -- I/O throttling (pyemu.block.throttle) ------------------------------------------------------------

    def admit(self, is_write: bool, nbytes: int, wake: Callable[[], None]) -> Ticket | None:
        """Ask the drive's throttle, without blocking, whether a request may start: None (not throttled)
        or a granted ticket = go now, pass ``admitted=True``; a pending ticket = ``wake`` runs (on the
        throttle timer thread) once it may. Devices served by an I/O thread use this."""
        member = self.throttle_member()
        return None if member is None else member.admit(is_write, nbytes, wake)

    def throttle_member(self) -> ThrottleGroupMember | None:
        """The drive's own throttle, else that of a ``throttle`` filter node at its root (one of them:
        with both, requests wait for the filter on the device's thread -- do not combine them)."""
        if self.throttle is not None:
            return self.throttle
        member = getattr(self.root, "throttle_member", None)
        return member if isinstance(member, ThrottleGroupMember) else None

    def set_throttle(self, config: ThrottleConfig, group: str | None = None) -> None:
        """QEMU's ``blk_set_io_limits``/``block_set_io_throttle``: limits for this drive, shared with the
        other members of ``group`` (default: a group named after the drive, as QEMU); no limits at all
        takes the drive out of its group."""
        self._revoke_leases()
        old = self.throttle
        if not config.enabled:
            self.throttle = None
            if old is not None:
                THROTTLE_GROUPS.leave(old)
            return
        name = group or (old.group.name if old is not None else self.id or self._user)
        if old is not None and old.group.name == name:
            old.group.configure(config)
            return
        self.throttle = THROTTLE_GROUPS.join(name, self.id or self._user, config)
        if old is not None:
            THROTTLE_GROUPS.leave(old)

    def join_throttle_group(self, group: str) -> None:
        """``throttling.group=G`` without limits of its own: take the group's (an ``-object throttle-group``)."""
        self._revoke_leases()
        old, self.throttle = self.throttle, THROTTLE_GROUPS.join(group, self.id or self._user, None)
        if old is not None:
            THROTTLE_GROUPS.leave(old)

    def apply_deferred_sharing(self) -> None:
        """Refuse other writers from now on, as a device does (QEMU's blk_vm_state_changed once an incoming
        VM runs); PermissionConflict, and the backend keeps sharing everything, while another user writes."""
        wanted = self._deferred_shared
        if wanted is None or self._closed:
            return
        old = self._attachment
        graph.detach(old)
        try:
            self._attachment = graph.attach(old.node, user=self._user, role="root", perm=self._perm, shared=wanted)
        except BaseException:
            self._attachment = graph.attach(old.node, user=self._user, role="root", perm=self._perm,
                                            shared=self._shared)
            raise
        self._shared, self._deferred_shared = wanted, None

    def close(self) -> None:
        """Refuse new requests, wait for those in flight, close the nodes. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._revoke_leases()
        with self._cond:
            while self._inflight:
                self._cond.wait()
        member, self.throttle = self.throttle, None
        if member is not None:  # requests still waiting for their turn are let go (they then see ENOMEDIUM)
            THROTTLE_GROUPS.leave(member)
        self._attachment.detach()
        if self._owned_root is not None:
            self._owned_root.close()

    def check_resized(self) -> None:
        """After a resize somewhere below the root: if the drive's size changed, call every resize listener
        with the new size (virtio-blk raises its config-change interrupt)."""
        if self._closed:
            return
        size = self.root.size()
        if size == self._known_size:
            return
        self._known_size = size
        for listener in list(self.resize_listeners):
            listener(size)

    # -- changing the root under a running device ------------------------------------------------------

    @contextmanager
    def drained(self) -> Iterator[None]:
        """Hold new requests back (they wait, they do not fail) and wait for those in flight; the guest
        sees only a short stall. Nests."""
        with self._cond:
            self._quiesced += 1
        self._revoke_leases()
        with self._cond:
            while self._inflight:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._quiesced -= 1
                self._cond.notify_all()

    def replace_root(self, root: BlockDriver, *, prepare: Callable[[], None] | None = None,
                     revert: Callable[[], None] | None = None) -> BlockDriver:
        """Make ``root`` the node requests go to (QEMU's ``blk_replace_bs``, what ``qom-set ... drive``
        does) and return the old one. Drains first; between letting go of the old root and attaching to
        the new one ``prepare`` runs (the caller takes the new graph's permissions there) and ``revert``
        undoes it if the attach fails. Any error leaves the old root in place, attached as before."""
        if root.read_only and not self._read_only:
            raise BlockConfigError("Block node is read-only", option=None)
        if root.size() != self.root.size():
            raise BlockConfigError(f"Cannot replace the root of drive '{self.id or self._user}': the new node is "
                                   f"{root.size()} bytes, the device sees {self.root.size()}", option=None)
        with self.drained():
            if self._closed:
                raise BlockIOError(f"drive '{self.id}' is closed (no medium)", errno=errno.ENOMEDIUM)
            old_root, old_attachment = self.root, self._attachment
            old_attachment.detach()
            try:
                if prepare is not None:
                    prepare()
                try:
                    attachment = graph.attach(root, user=self._user, role="root", perm=self._perm,
                                              shared=self._shared)
                except BaseException:
                    if revert is not None:
                        revert()
                    raise
            except BaseException:
                self._attachment = graph.attach(old_root, user=self._user, role="root", perm=self._perm,
                                                shared=self._shared)
                raise
            self.root, self._attachment = root, attachment
            return old_root

    def change_root(self, root: BlockDriver) -> BlockDriver:
        """:meth:`replace_root` for a node of the graph (``qom-set ... drive``): the borrowed edges below the
        old root go passive and those below the new one active (:mod:`pyemu.block.borrowed`), all or
        nothing. Returns the old root."""
        old = self.root
        if root is old:
            return old

        def prepare() -> None:
            borrowed.deactivate(old)
            try:
                borrowed.activate(root)
            except BaseException:
                borrowed.activate(old)
                raise

        def revert() -> None:
            borrowed.deactivate(root)
            borrowed.activate(old)

        return self.replace_root(root, prepare=prepare, revert=revert)

    def insert_filter(self, make: Callable[[BlockDriver], BlockDriver]) -> BlockDriver:
        """Put the filter ``make(root)`` builds above the current root (a backup job's copy-before-write
        node) and return it. ``make`` runs drained with this backend's permissions on the root let go, so
        the filter can take the writer's permissions there; any failure leaves the backend as it was."""
        with self.drained():
            if self._closed:
                raise BlockIOError(f"drive '{self.id}' is closed (no medium)", errno=errno.ENOMEDIUM)
            old_root = self.root
            self._attachment.detach()
            try:
                node = make(old_root)
                try:
                    attachment = graph.attach(node, user=self._user, role="root", perm=self._perm,
                                              shared=self._shared)
                except BaseException:
                    node.close()
                    raise
            except BaseException:
                self._attachment = graph.attach(old_root, user=self._user, role="root", perm=self._perm,
                                                shared=self._shared)
                raise
            self.root, self._attachment = node, attachment
            return node

    def remove_filter(self, node: BlockDriver) -> None:
        """Undo :meth:`insert_filter`: requests go to the filter's child again and the filter is closed
        (it lets go of its permissions). Nothing to do if ``node`` is not the root any more."""
        with self.drained():
            if self.root is not node:
                return
            below = getattr(node, "filtered_child")
            self._attachment.detach()
            node.close()
            self.root = below
            if not self._closed:
                self._attachment = graph.attach(below, user=self._user, role="root", perm=self._perm,
                                                shared=self._shared)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _enter(self, offset: int) -> None:
        with self._cond:
            while self._quiesced and not self._closed:
                self._cond.wait()
            if self._closed:
                raise BlockIOError(f"drive '{self.id}' is closed (no medium)", errno=errno.ENOMEDIUM,
                                   offset=offset)
            self._inflight += 1

    def _revoke_leases(self) -> None:
        for revoke in list(self.lease_revokers):
            revoke()

    def _leave(self) -> None:
        with self._cond:
            self._inflight -= 1
            if not self._inflight:
                self._cond.notify_all()

    def records_writes(self) -> bool:
        """Whether a write now reaches an enabled dirty bitmap (what :meth:`wrote_through` would mark).
        The C data plane asks before a call: with nothing recording, it may let the guest see a write's
        completion before Python hands the ranges to :meth:`wrote_through` after the call."""
        return any(bitmaps.recording for bitmaps in self._bitmap_sets())

    def _mark_dirty(self, offset: int, length: int) -> None:
        """Every enabled dirty bitmap of the node written records the range -- also after a failed request,
        as QEMU does: its data may have changed partly."""
        for bitmaps in self._bitmap_sets():
            bitmaps.mark(offset, length)

    def _bitmap_sets(self) -> Iterator[BitmapSet]:
        """The bitmap sets a write through this backend marks. Nodes that mark their own bitmaps (qcow2, for
        tools that write it without a backend) are left to do so. Filters pass the write on unchanged, so
        the nodes down the ``filtered_child`` chain (a copy-before-write filter put above the disk with
        qom-set) record it too: the disk's bitmaps keep counting while the filter sits above it. A filter
        whose writes do not reach its child (snapshot-access: a discard of the view leaves the disk as it
        is) says so with ``passes_writes_down = False`` and ends the walk."""
        node: object = self.root
        seen: set[int] = set()
        while node is not None and id(node) not in seen:
            seen.add(id(node))
            if not getattr(node, "marks_own_bitmaps", False):
                bitmaps = existing_bitmaps(node)
                if bitmaps is not None:
                    yield bitmaps
            if not getattr(node, "passes_writes_down", True):
                break
            node = getattr(node, "filtered_child", None)
            if isinstance(node, BorrowedNode):
                node = node.node

    def _check_writable(self, op: str, offset: int, extent: int | Sequence[bytes | memoryview]) -> None:
        if self._read_only:
            length = extent if isinstance(extent, int) else -1
            raise ReadOnlyError(f"{op} on read-only drive '{self.id or self.filename}'", offset=offset,
                                length=length)
