"""``migrate`` and ``migrate-incoming`` as jobs with QEMU's status, statistics and MIGRATION events.

Saving a running VM is live pre-copy (RAM sent while it runs, then rounds of changed pages), then a short
stop-and-copy: the VM is paused (STOP), its virtio I/O drained and its disks
flushed (the disks themselves are shared, as in QEMU's shared-storage migration: the destination opens
the same image paths), the whole state is written, and the VM ends in ``postmigrate`` (a ``cont`` runs it
again, as in QEMU). A failure at any point resumes a VM that was running and reports ``failed`` with the
reason; ``migrate_cancel`` does the same ending ``cancelling`` -> ``cancelled`` (the connection is broken,
so a destination reading it fails its load and stays stopped). The stream goes out at most at the
``max-bandwidth`` parameter's rate. A running VM is saved live (:mod:`~pyemu.migration.precopy`): it is
paused only for the final round, whose length is ``downtime``.

Loading happens in a VM started with ``-incoming`` (run state ``inmigrate``): from the command line's URI
at start-up, or from ``migrate-incoming`` after ``-incoming defer``. A ``tcp:``/``unix:`` destination binds
its socket at once (an error fails the command or the start-up) and waits for the source in the
background, the VM staying in ``inmigrate`` with its monitor served meanwhile. Measured with QEMU 7.2: the
destination then runs if the source was running and no ``-S`` was given, is ``paused`` with ``-S``, and
stays in ``prelaunch`` when the source had never run; the source ends ``postmigrate``. A stream that fails
to load leaves the destination in ``inmigrate`` with zeroed RAM: it cannot be started.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from pyemu.block.errors import BlockError
from pyemu.migration.errors import IncomingLoadFailed, MigrationError
from pyemu.migration.images import activate_images, inactivate_images
from pyemu.migration.mapped_ram import SEEKABLE_ONLY, MappedRamFile, open_outgoing, save_mapped
from pyemu.migration.params import MigrationCancelled, MigrationParameters, RateLimiter
from pyemu.migration.precopy import precopy_save
from pyemu.migration.transport import IncomingStream, OutgoingStream, check_uri, is_socket_uri
from pyemu.migration.vmstate import LoadStats, drain_io, load_vm, migration_blockers, save_vm
from pyemu.system.messages import error_report
from pyemu.system.runstate import RunState

if TYPE_CHECKING:
    from pyemu.machines.base import Machine

EventSink = Callable[[str, dict[str, Any]], None]
_ACTIVE = ("setup", "active", "cancelling")


class MigrationManager:
    """The migration state of one VM (source or destination). Thread-safe; one job at a time."""

    def __init__(self, machine: Machine, emit: EventSink) -> None:
        self.machine = machine
        self._emit = emit
        self._lock = threading.Lock()
        self.status: str | None = None
        """None until the first migration; then setup, active, completed or failed (QEMU's names)."""
        self.error: str | None = None
        self.incoming_expected = False
        """Started with ``-incoming``: ``migrate-incoming`` (for ``defer``) or the start-up load is due."""
        self.autostart = True
        """Run the destination once loaded if the source was running (cleared by ``-S``; ``cont`` during
        ``inmigrate`` sets it again, as in QEMU)."""
        self._started_ns = 0
        self._setup_ns = 0
        self._finished_ns = 0
        self._downtime_ns = 0
        self._stats = LoadStats()
        self._thread: threading.Thread | None = None
        self._outgoing = False
        self._incoming_configured = False
        self.params = MigrationParameters()
        """migrate-set-parameters / -capabilities (kept across migrations, as in QEMU)."""
        self._cancel = threading.Event()
        self._out: OutgoingStream | MappedRamFile | None = None
        self._listening: IncomingStream | None = None
        self.exit_on_failed_load = False
        """End the VM with exit status 1 when a background incoming load fails (the pyemu command sets
        it, matching qemu-system's exit; a start-up ``-incoming file:``/``exec:`` failure raises instead)."""
        self.incoming_address: tuple[str, int] | str | None = None
        """Where a tcp:/unix: destination listens (the real port when 0 was asked for)."""

    @property
    def active(self) -> bool:
        return self.status in _ACTIVE

    # -- status -------------------------------------------------------------------------------------------
    def _set_status(self, status: str) -> None:
        self.status = status
        if self.params.capabilities["events"]:  # QEMU 7.2: MIGRATION events only with this capability
            self._emit("MIGRATION", {"status": status})

    def query(self) -> dict[str, Any]:
        """query-migrate's MigrationInfo ({} before any migration, as QEMU)."""
        status = self.status
        if status is None:
            return {}
        listening = self._listening
        if listening is not None and listening.listening:
            # QEMU 7.2: a destination waiting for its source reports where it listens, and no status.
            return {"socket-address": [listening.socket_address()]}
        info: dict[str, Any] = {"status": status}
        if not self._outgoing:
            if status == "failed" and self.error:
                info["error-desc"] = self.error
            return info
        now = self._finished_ns if status in ("completed", "failed", "cancelled") else time.monotonic_ns()
        info["total-time"] = (now - self._started_ns) // 1_000_000
        if self._setup_ns:
            info["setup-time"] = (self._setup_ns - self._started_ns) // 1_000_000
        stats = self._stats
        if status == "completed":
            info["downtime"] = self._downtime_ns // 1_000_000
        elif status == "active" and stats.dirty_sync_count:
            info["expected-downtime"] = stats.expected_downtime_ms
        seconds = max(1e-9, (now - self._started_ns) / 1e9)
        info["ram"] = {"total": stats.ram_total, "transferred": stats.stream_bytes,
                       "remaining": 0 if status == "completed" else (
                           stats.remaining if stats.dirty_sync_count else stats.ram_total),
                       "duplicate": stats.zero_pages, "skipped": 0, "normal": stats.normal_pages,
                       "normal-bytes": stats.ram_bytes, "page-size": 4096,
                       "dirty-sync-count": stats.dirty_sync_count,
                       "mbps": round(stats.stream_bytes * 8 / 1e6 / seconds, 3), "pages-per-second": 0,
                       "dirty-pages-rate": 0, "postcopy-requests": 0, "multifd-bytes": 0,
                       "precopy-bytes": stats.precopy_bytes, "downtime-bytes": stats.downtime_bytes,
                       "postcopy-bytes": 0,
                       "dirty-sync-missed-zero-copy": 0}
        if status == "failed" and self.error:
            info["error-desc"] = self.error
        return info

    # -- outgoing -----------------------------------------------------------------------------------------
    def migrate(self, uri: str, *, wait: bool = False) -> None:
        """Start saving to ``uri`` (QMP ``migrate``). Refusals (a job running, a blocker, a bad URI, a VM
        that cannot be saved in its state) raise MigrationError before anything changes; the save itself
        runs on its own thread and ends ``completed`` or ``failed``."""
        with self._lock:
            if self.active:
                raise MigrationError("There's a migration process in progress")
            if self.incoming_expected:
                raise MigrationError("Guest is waiting for an incoming migration")
            state = self.machine.runstate.state
            if state not in (RunState.RUNNING, RunState.PAUSED, RunState.PRELAUNCH, RunState.POSTMIGRATE):
                raise MigrationError(f"the VM cannot be migrated in state {state.value}")
            blockers = migration_blockers(self.machine)
            if blockers:
                raise blockers[0]
            check_uri(uri)
            if self.params.capabilities["mapped-ram"] and not uri.startswith("file:"):
                raise MigrationError(SEEKABLE_ONLY)
            self._outgoing = True
            self.error = None
            self._cancel.clear()
            self._stats = LoadStats()
            self._started_ns = time.monotonic_ns()
            self._setup_ns = 0
            self._set_status("setup")
            self._thread = threading.Thread(target=self._save, args=(uri, state), name="migration", daemon=True)
            self._thread.start()
        if wait:
            self.wait()

    def cancel(self) -> None:
        """``migrate_cancel``: an outgoing migration in progress stops (``cancelling`` at once,
        ``cancelled`` when the save thread has let go of the VM, which runs again if it was running).
        Nothing to do otherwise, as QEMU (no error)."""
        with self._lock:
            if not self._outgoing or self.status not in ("setup", "active"):
                return
            self._cancel.set()
            self._set_status("cancelling")
            out = self._out
        if out is not None:
            out.shutdown()  # a write blocked on a slow or stuck receiver returns now

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _save(self, uri: str, state: RunState) -> None:
        machine = self.machine
        was_running = state is RunState.RUNNING
        paused_at = time.monotonic_ns()
        out: OutgoingStream | MappedRamFile | None = None
        inactivated = False
        mapped = self.params.capabilities["mapped-ram"]
        try:
            out = open_outgoing(uri, machine, mapped=mapped)
            with self._lock:
                self._out = out
                if self._cancel.is_set():
                    raise MigrationCancelled()
                self._setup_ns = time.monotonic_ns()
                self._set_status("active")
            limited = RateLimiter(out, self.params, self._cancel)

            def stop_vm() -> None:
                nonlocal paused_at
                paused_at = time.monotonic_ns()
                machine.pause()
                self._emit("STOP", {})
                drain_io(machine)

            if isinstance(out, MappedRamFile):  # stop-and-copy into the file's fixed RAM offsets
                if was_running:
                    stop_vm()
                else:
                    drain_io(machine)
                inactivate_images(machine)
                inactivated = True
                run_state = "running" if was_running else "prelaunch" if state is RunState.PRELAUNCH else "paused"
                save_mapped(machine, out, run_state, self._stats, self._cancel)
            elif was_running:
                precopy_save(machine, limited, self._stats, self.params, self._cancel, stop_vm)
            else:
                drain_io(machine)
                # As QEMU's migration_completion, whatever the run state: the source lets go of its
                # images before the state goes out, so the destination can take them when it has loaded.
                inactivate_images(machine)
                inactivated = True
                # The run state the destination should take: a VM stopped before has its own state.
                run_state = "prelaunch" if state is RunState.PRELAUNCH else "paused"
                save_vm(machine, limited, run_state, self._stats)
            if self._cancel.is_set():
                raise MigrationCancelled()
            out.close()
            out = None
            machine.enter_state(RunState.POSTMIGRATE)
            self._finished_ns = time.monotonic_ns()
            self._downtime_ns = self._finished_ns - paused_at if was_running else 0
            self._set_status("completed")
        except Exception as exc:  # every failure ends in "failed" with its reason; the VM goes on
            if out is not None:
                out.abort()
            if inactivated:  # (pre-copy takes its images back itself)
                try:
                    activate_images(machine)
                except BlockError as activate_error:
                    error_report(str(activate_error))
            cancelled = self._cancel.is_set()
            self.error = None if cancelled else str(exc)
            self._finished_ns = time.monotonic_ns()
            if was_running and machine.runstate.state is RunState.PAUSED:
                machine.resume()
                self._emit("RESUME", {})
            self._set_status("cancelled" if cancelled else "failed")
        finally:
            self._out = None

    # -- incoming -----------------------------------------------------------------------------------------
    def expect_incoming(self, autostart: bool) -> None:
        """The VM was started with ``-incoming``: enter ``inmigrate`` (the machine is started paused)."""
        self.incoming_expected = True
        self._incoming_configured = True
        self.autostart = autostart
        self.machine.enter_state(RunState.INMIGRATE)

    def incoming(self, uri: str, *, background: bool = False) -> None:
        """Load the state from ``uri`` into this VM (``-incoming URI`` at start-up, or ``migrate-incoming``).
        In the foreground a failure raises MigrationError; in the background it ends ``failed``."""
        with self._lock:
            if not self._incoming_configured:
                raise MigrationError("'-incoming' was not specified on the command line")
            if self.status is not None:  # as QEMU: one attempt per process, failed or not
                raise MigrationError("The incoming migration has already been started")
            check_uri(uri)
            self._outgoing = False
            self.error = None
            stream: IncomingStream | None = None
            if is_socket_uri(uri):
                # QEMU binds at once (a bad address fails the command) and waits for the source in the
                # background; the monitor keeps being served meanwhile.
                stream = IncomingStream(uri)
                self.incoming_address = stream.address
                self._listening = stream
                background = True
            self._set_status("setup")
        if background:
            self._thread = threading.Thread(target=self._load_reporting, args=(uri, stream),
                                            name="migration-in", daemon=True)
            self._thread.start()
        elif self.exit_on_failed_load:  # the pyemu command: report as qemu-system does, then exit 1
            try:
                self._load(uri)
            except MigrationError as exc:
                error_report(str(exc))
                raise IncomingLoadFailed() from exc
        else:
            self._load(uri)

    def _destination_gone(self) -> bool:
        """The VM waiting for a tcp:/unix: source was quit or shut down: stop listening (the port and
        the socket file are released)."""
        machine = self.machine
        return bool(getattr(machine, "_quit", False)) or machine.runstate.state is RunState.SHUTDOWN

    def _load_reporting(self, uri: str, stream: IncomingStream | None = None) -> None:
        try:
            self._load(uri, stream)
        except MigrationError as exc:
            # Status failed and the reason are in query-migrate. The pyemu command then ends as QEMU 7.2's
            # qemu-system does (process_incoming_migration_co: "load of migration failed", exit status 1);
            # an embedded VM (pyemu.VM) stays in inmigrate for its owner to inspect.
            if self.exit_on_failed_load and not self._destination_gone():
                from pyemu.system.runstate import ShutdownCause

                error_report(str(exc))
                error_report(str(IncomingLoadFailed()))
                self.machine.request_shutdown(ShutdownCause.HOST_ERROR, 1)

    def _load(self, uri: str, stream: IncomingStream | None = None) -> None:
        machine = self.machine
        try:
            if stream is None:
                stream = IncomingStream(uri)
            stream.accept(self._destination_gone)
            self._set_status("active")
            run_state = load_vm(machine, stream.source, self._stats)
            stream.close()
            stream = None
        except Exception as exc:  # typed stream errors, and anything a device raised while applying
            if stream is not None:
                stream.close(check=False)
            self.error = str(exc)
            self._set_status("failed")
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"loading the VM state failed: {exc}") from exc
        self.incoming_expected = False
        try:
            activate_images(machine)  # the source let go of them before its final state (images.py)
        except BlockError as exc:
            # QEMU 7.2 (process_incoming_migration_bh): the error is reported, the migration completes
            # and the VM stays stopped; a later cont tries again.
            error_report(str(exc))
            machine.enter_state(RunState.PAUSED)
            self._set_status("completed")
            return
        if run_state == "running" and self.autostart:
            machine.resume()
            self._set_status("completed")
            self._emit("RESUME", {})
            return
        machine.enter_state(RunState.PAUSED if run_state != "prelaunch" else RunState.PRELAUNCH)
        self._set_status("completed")
