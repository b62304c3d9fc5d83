"""I/O threads: where device work (virtqueue processing, host I/O) runs, off the vCPU threads.

Like QEMU's ``-object iothread,id=io0`` and Cloud Hypervisor's per-device epoll threads: one thread waits
on a set of event notifiers (queue kicks, backend file descriptors) and runs the handler registered for
each. A vCPU thread only signals a notifier (under KVM not even that: the kernel does), so a slow disk or
a busy device never holds up guest code, and device work never runs under the board's big lock.

A handler that raises is the handler's device's problem: the exception goes to the ``on_error`` callback
given with the handler (the device marks itself broken), the thread keeps serving everyone else.

The thread waits in C (:mod:`pyemu.system.iothread_wait`) with the GIL released: it first sets the wake-up
flags its handlers left (:mod:`pyemu.system.wake_publish`), then spins over its descriptors for an adaptive
window before it sleeps (QEMU's ``poll-max-ns``, ``poll-grow`` and ``poll-shrink``;
:class:`~pyemu.system.poll_window.PollWindow`). Why spin: under the software CPU a guest waiting at queue
depth 1 kicks again ~150-250 µs after its last completion, and a sleeping thread costs that kick ~18 µs
in the waking system call (the vCPU waits for it) and ~25 µs more before the thread runs.

A descriptor may also have a native handler (``add_reader``'s ``native``): C code the wait offers the
event to before it returns, e.g. virtio-blk's leased queue (:class:`~pyemu.hw.virtio.blk_plane.Lease`).
An event it serves never reaches Python, and the wait goes on; one it declines is handled as any other.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable
from typing import Protocol

from pyemu.errors import ConfigError, PyemuError
from pyemu.system import iothread_wait, log, wake_publish
from pyemu.system.event_notifier import EventNotifier
from pyemu.system.iothread_wait import NativeHandler
from pyemu.system.poll_window import PollWindow

Handler = Callable[[], None]
ErrorHandler = Callable[[BaseException], None]


DEFAULT_POLL_MAX_NS = 400_000
"""The spin limit of an I/O thread whose ``poll-max-ns`` was not given (QEMU's is 32768). Under the software
CPU the next kick of a queue-depth-1 guest comes ~150-250 µs after the interrupt for the last request (the
guest's interrupt handler, its block layer and the program's next call all run translated), so QEMU's 32 µs
would never see it. Longer waits are idle time and shrink the window (:data:`DEFAULT_POLL_SHRINK`)."""

DEFAULT_POLL_SHRINK = 2
"""What a wait longer than ``poll-max-ns`` divides the window by when ``poll-shrink`` was not given (QEMU's
default drops it to nothing). Why halve: a queue-depth-1 guest under the software CPU has an occasional
long gap between requests (its timer tick, a page fault, the program's own work), and dropping the window
to 0 then cost the next five or six kicks a sleeping thread while it grew back from 10 µs. Measured
2026-12-07 with virtio-blk 1 MiB reads (host ``perf`` on the vCPU's eventfd write and the I/O thread's
``preadv``): with the window dropped, two kicks in three found the thread asleep (kick to ``preadv``
~130 µs: ~50 µs to wake it, then the GIL, which by then the vCPU held on its way to HLT); halved, 895 of
935 found it spinning (21 µs), and each request's time outside the disk read fell from 445-511 to
371-421 µs in three interleaved pairs. An idle thread still stops: each long wait halves what is left."""


def default_poll_max_ns() -> int:
    """:data:`DEFAULT_POLL_MAX_NS` when this process may run on two CPUs or more (one for the vCPU that runs
    guest code, one for the spinning thread; the CPUs counted are those ``taskset`` or a container's cpuset
    leave it), else 0: on one CPU a spinning thread only takes time from the vCPU it waits for."""
    return DEFAULT_POLL_MAX_NS if len(os.sched_getaffinity(0)) >= 2 else 0


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class IoThreadError(PyemuError):
    """The I/O thread cannot take the request (stopped, or the descriptor is already watched)."""


def _report(name: str, exc: BaseException) -> None:
    log.log("guest_errors", f"iothread {name}: handler failed with nobody to report to: "
                            f"{type(exc).__name__}: {exc}")


class IoThread:
    """One event loop thread. ``add_reader`` / ``call_soon`` are thread-safe."""

    def __init__(self, name: str, *, poll_max_ns: int | None = None, poll_grow: int = 0,
                 poll_shrink: int = 0) -> None:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"-object iothread: invalid id '{name}'", option="-object")
        self.name = name
        self.poll = PollWindow(default_poll_max_ns() if poll_max_ns is None else poll_max_ns,
                               grow=poll_grow, shrink=poll_shrink, default_shrink=DEFAULT_POLL_SHRINK)
        """The adaptive spin before each sleep (its ``max_ns``, ``grow`` and ``shrink`` are what QMP
        ``query-iothreads`` shows; grow and shrink 0 mean the defaults, as in QEMU)."""
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wakeup = EventNotifier(f"iothread-{name}-wakeup")
        self._calls: list[tuple[Handler, ErrorHandler | None]] = []
        self._pending_changes: list[Callable[[], None]] = []
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._polled: set[int] = set()
        self._native: dict[int, NativeHandler] = {}
        self._native_changed = False
        self._wait: iothread_wait.CWait | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.iterations = 0

    # -- registration (any thread) ----------------------------------------------------------------------
    def add_reader(self, source: HasFileno, handler: Handler, on_error: ErrorHandler | None = None, *,
                   polled: bool = False, native: NativeHandler | None = None) -> None:
        """Run ``handler()`` on this thread whenever ``source`` is readable. For an
        :class:`EventNotifier` the handler clears it (``test_and_clear``) before looking at its work.
        ``polled``: an event from this source is one worth spinning for (the window grows with such events
        and drops to nothing after any other, see :meth:`_learn`). ``native``: C code the thread's C wait
        offers the event to first (:data:`~pyemu.system.iothread_wait.NativeHandler`); ``handler`` runs only
        when it declines (without the C wait, always)."""
        def register() -> None:
            self._selector.register(source, selectors.EVENT_READ, (handler, on_error))
            if polled:
                self._polled.add(source.fileno())
            if native is not None:
                self._native[source.fileno()] = native
                self._native_changed = True

        self._change(register)

    def remove_reader(self, source: HasFileno) -> None:
        def unregister() -> None:
            try:
                key = self._selector.unregister(source)
            except (KeyError, ValueError):
                return
            self._polled.discard(key.fd)
            if self._native.pop(key.fd, None) is not None:
                self._native_changed = True
        self._change(unregister)

    def call_soon(self, handler: Handler, on_error: ErrorHandler | None = None) -> None:
        """Run ``handler()`` once on this thread, soon (in call order)."""
        with self._lock:
            self._calls.append((handler, on_error))
        self._wakeup.set()

    def _change(self, change: Callable[[], None]) -> None:
        if self._thread is None or threading.current_thread() is self._thread:
            change()
            return
        done = threading.Event()
        errors: list[BaseException] = []

        def apply() -> None:
            try:
                change()
            except (KeyError, ValueError, OSError) as exc:
                errors.append(exc)
            finally:
                done.set()
        with self._lock:
            self._pending_changes.append(apply)
        self._wakeup.set()
        if not done.wait(timeout=5):
            raise IoThreadError(f"iothread {self.name} did not answer a registration request")
        if errors:
            raise IoThreadError(f"iothread {self.name}: cannot watch the descriptor: {errors[0]}")

    # -- the thread -------------------------------------------------------------------------------------
    @property
    def thread_id(self) -> int:
        """The host thread's id (QMP ``query-iothreads``), 0 before it started."""
        thread = self._thread
        return thread.native_id or 0 if thread is not None else 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name=f"iothread-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for it; pending calls are dropped."""
        self._stopping = True
        self._wakeup.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._selector.close()
        self._wakeup.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def served_natively(self) -> int:
        """Events native handlers served inside the C wait (``add_reader``'s ``native``) so far."""
        return self._wait.served_natively if self._wait is not None else 0

    def _loop(self) -> None:
        wait = self._wait = iothread_wait.waiter()
        pending = wake_publish.take_flags_on_this_thread() if wait is not None else []
        epoll_fd = self._selector.fileno()
        poll = self.poll
        while not self._stopping:
            if wait is not None:
                if self._native_changed:
                    self._native_changed = False
                    wait.set_native(dict(self._native))
                spin = poll.budget_ns()
                fds, waited = wait(epoll_fd, pending, spin)
                pending.clear()
                if spin:
                    poll.polls += 1
                self._learn(fds, waited, spin)
                events = self._keys(fds)
            else:
                events = self._selector.select()
            self.iterations += 1
            for key, _mask in events:
                if key.data is None:
                    self._wakeup.test_and_clear()
                    continue
                handler, on_error = key.data
                self._run(handler, on_error)
            with self._lock:
                changes, self._pending_changes = self._pending_changes, []
                calls, self._calls = self._calls, []
            for change in changes:
                change()
            for handler, on_error in calls:
                self._run(handler, on_error)

    def _learn(self, fds: list[int], waited_ns: int, spin_ns: int) -> None:
        """Adapt the spin window to the wait that just ended. Only events of polled sources count as
        worth spinning for; a wait another source ended (a TAP read, a timer's call, a QMP request)
        counts as idle time, so a thread busy with those alone does not spin: the work behind them is
        often another host process that needs the CPU (a network peer), not this thread's own."""
        if not fds:
            return  # a signal
        if self._polled.isdisjoint(fds):
            self.poll.record_idle()
        else:
            self.poll.record(waited_ns, woken_while_polling=waited_ns <= spin_ns)

    def _keys(self, fds: list[int]) -> list[tuple[selectors.SelectorKey, int]]:
        """What ``select()`` would have returned for these ready descriptors (one unregistered since is
        skipped)."""
        keys = []
        for fd in fds:
            try:
                keys.append((self._selector.get_key(fd), selectors.EVENT_READ))
            except KeyError:
                continue
        return keys

    def _run(self, handler: Handler, on_error: ErrorHandler | None) -> None:
        try:
            handler()
        except Exception as exc:  # a device's failure must not end the thread that serves the others
            (on_error or (lambda e: _report(self.name, e)))(exc)
