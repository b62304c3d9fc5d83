"""I/O threads: where device work (virtqueue processing, host I/O) runs, off the vCPU threads.

Like QEMU's ``-object iothread,id=io0`` and Cloud Hypervisor's per-device epoll threads: one thread waits
on a set of event notifiers (queue kicks, backend file descriptors) and runs the handler registered for
each. A vCPU thread only signals a notifier (under KVM not even that: the kernel does), so a slow disk or
a busy device never holds up guest code, and device work never runs under the board's big lock.

A handler that raises is the handler's device's problem: the exception goes to the ``on_error`` callback
given with the handler (the device marks itself broken), the thread keeps serving everyone else.

Wake-up flags that handlers leave to the thread (:mod:`pyemu.system.wake_publish`) are set as it goes to
sleep, after it has released the GIL.
"""

from __future__ import annotations

import selectors
import threading
from collections.abc import Callable
from typing import Protocol

from pyemu.errors import ConfigError, PyemuError
from pyemu.system import log, wake_publish
from pyemu.system.event_notifier import EventNotifier

Handler = Callable[[], None]
ErrorHandler = Callable[[BaseException], None]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class IoThreadError(PyemuError):
    """The I/O thread cannot take the request (stopped, or the descriptor is already watched)."""


def _report(name: str, exc: BaseException) -> None:
    log.log("guest_errors", f"iothread {name}: handler failed with nobody to report to: "
                            f"{type(exc).__name__}: {exc}")


class IoThread:
    """One event loop thread. ``add_reader`` / ``call_soon`` are thread-safe."""

    def __init__(self, name: str) -> None:
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"-object iothread: invalid id '{name}'", option="-object")
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wakeup = EventNotifier(f"iothread-{name}-wakeup")
        self._calls: list[tuple[Handler, ErrorHandler | None]] = []
        self._pending_changes: list[Callable[[], None]] = []
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.iterations = 0

    # -- registration (any thread) ----------------------------------------------------------------------
    def add_reader(self, source: HasFileno, handler: Handler, on_error: ErrorHandler | None = None) -> None:
        """Run ``handler()`` on this thread whenever ``source`` is readable. For an
        :class:`EventNotifier` the handler clears it (``test_and_clear``) before looking at its work."""
        def register() -> None:
            self._selector.register(source, selectors.EVENT_READ, (handler, on_error))

        self._change(register)

    def remove_reader(self, source: HasFileno) -> None:
        def unregister() -> None:
            try:
                self._selector.unregister(source)
            except (KeyError, ValueError):
                pass
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

    def _loop(self) -> None:
        pending = wake_publish.take_flags_on_this_thread()
        while not self._stopping:
            publisher = wake_publish.publisher()
            if pending and publisher is not None:
                flags = tuple(pending)
                pending.clear()
                events = self._keys(publisher(self._selector.fileno(), flags))
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
