"""QEMU's job framework: one state machine for every long-running operation (backup now, snapshots later).

A :class:`Job` runs its :meth:`Job.run` on a worker thread of its own -- never a vCPU thread, so a job can
stall the guest only where it shares a lock with the guest's I/O (one job step of a backup). The
management side (QMP's ``job-*`` and ``block-job-*``) only flips flags under the job's lock; the worker
notices them at its :meth:`Job.pause_point` and in :meth:`Job.sleep`, exactly where a QEMU coroutine
yields.

States and verbs follow QEMU 7.2's job.c tables (:data:`TRANSITIONS`, :data:`VERBS`), facts checked against
qemu-storage-daemon 7.2:

* success: running -> waiting -> pending -> (auto-finalize, or ``job-finalize``) BLOCK_JOB_COMPLETED ->
  concluded -> (auto-dismiss, or ``job-dismiss``) null. With auto-finalize off, BLOCK_JOB_PENDING is sent on
  entering pending.
* failure or cancel (also of a pending job): aborting -> BLOCK_JOB_COMPLETED with ``error`` (or
  BLOCK_JOB_CANCELLED) -> concluded -> null; a failed job never passes through pending.
* ``job-pause`` takes effect at the job's next pause point (JOB_STATUS_CHANGE ``paused``, ``standby`` for a
  ready job); an I/O error with the ``stop`` policy pauses the job as a user pause would, so ``job-resume``
  retries. Cancelling a paused job resumes it first (``running`` is reported before ``aborting``).

QEMU also reports a paused/running pair right after ``created, running`` (blockdev-backup drains the graph
while the job starts); pyemu's start needs no drain, so that pair is not sent.
"""

from __future__ import annotations

import enum
import os
import re
import threading
import time
from typing import Any, Callable, Iterator

from pyemu.errors import PyemuError

EventSink = Callable[[str, dict[str, Any]], None]


class JobStatus(str, enum.Enum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus
#: QEMU's JobSTT: the states each state may move to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}
_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})
#: QEMU 7.2's JobVerbTable: the states in which each verb is accepted.
VERBS: dict[str, frozenset[JobStatus]] = {
    "cancel": _LIVE | {S.WAITING, S.PENDING},
    "pause": _LIVE,
    "resume": _LIVE,
    "set-speed": _LIVE,
    "complete": frozenset({S.READY, S.STANDBY}),
    "finalize": frozenset({S.PENDING}),
    "dismiss": frozenset({S.CONCLUDED}),
}

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
_RATE_SLICE = 0.1  # seconds of credit a rate-limited job may burst (QEMU's 100 ms slices)


class JobError(PyemuError):
    """A refused job request; ``error_class`` is the QMP error class QEMU gives it."""

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


class JobCancelled(Exception):
    """Raised inside the worker at a pause point or sleep once the job is cancelled (unwinds ``run``)."""


class JobFailed(PyemuError):
    """``run`` gives up: the message becomes the job's ``error`` (QEMU's strerror-style text)."""


def check_job_id(job_id: str) -> None:
    """QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'."""
    if not _ID_RE.match(job_id):
        raise JobError(f"Invalid job ID '{job_id}'")


def error_text(exc: BaseException) -> str:
    """What QEMU puts in a job's ``error``: strerror of the errno when there is one."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(exc) or type(exc).__name__


class Job:
    """One job. Subclasses set :attr:`job_type` and implement :meth:`run`; the hooks :meth:`prepare`,
    :meth:`commit`, :meth:`abort`, :meth:`clean` and :meth:`complete` are QEMU's JobDriver callbacks."""

    job_type = "create"
    is_block_job = False

    def __init__(self, job_id: str, *, emit: EventSink, auto_finalize: bool = True, auto_dismiss: bool = True,
                 speed: int = 0) -> None:
        check_job_id(job_id)
        check_speed(speed)
        self.id = job_id
        self._emit = emit
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.speed = speed
        self.status = JobStatus.UNDEFINED
        self.current_progress = 0
        self.total_progress = 0
        self.error: str | None = None
        self.busy = False
        self.user_paused = False
        self._pause_count = 0
        self._cancelled = False
        self._force = False
        self._wakeups = 0  # bumped by set-speed/pause/cancel: a sleep re-evaluates
        self._tokens = 0.0
        self._refill_at = time.monotonic()
        self._cond = threading.Condition(threading.RLock())
        self._thread: threading.Thread | None = None
        self._ending = False
        self._done = threading.Event()  # set once the job is concluded (or never started and dropped)
        self._on_null: list[Callable[["Job"], None]] = []
        self.txn: JobTxn | None = None
        """The group of a ``transaction`` with completion-mode=grouped (None: the job completes alone)."""
        self._transition(JobStatus.CREATED)

    # -- what subclasses implement --------------------------------------------------------------------------
    def run(self) -> None:
        """The work. Call :meth:`pause_point` often and :meth:`rate_limit` after each chunk; raise
        :class:`JobFailed` (or any exception) to fail; :class:`JobCancelled` propagates from the helpers."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Last check before commit (may raise to turn success into failure)."""

    def commit(self) -> None:
        """The job succeeded: make its result final."""

    def abort(self) -> None:
        """The job failed or was cancelled: undo what can be undone."""

    def clean(self) -> None:
        """Release resources, whatever the outcome (after commit or abort)."""

    def complete(self) -> None:
        """``job-complete`` on a ready job (mirror-like jobs); others refuse."""
        raise JobError(f"The active block job '{self.id}' cannot be completed")

    # -- events (block jobs add theirs) ------------------------------------------------------------------------
    def _transition(self, new: JobStatus) -> None:
        with self._cond:
            old = self.status
            if new not in TRANSITIONS[old]:
                raise AssertionError(f"job '{self.id}': illegal transition {old.value} -> {new.value}")
            self.status = new
            if old is not new:
                self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})
            self._cond.notify_all()

    def event_pending(self) -> None:
        """Entered pending with auto-finalize off (BLOCK_JOB_PENDING for block jobs)."""

    def event_ready(self) -> None:
        """Became ready (BLOCK_JOB_READY for block jobs)."""

    def event_finished(self, *, cancelled: bool) -> None:
        """Finalized (BLOCK_JOB_COMPLETED, with ``error`` on failure) or cancelled (BLOCK_JOB_CANCELLED)."""

    # -- information ---------------------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def paused(self) -> bool:
        return self._pause_count > 0

    def info(self) -> dict[str, Any]:
        """QEMU's JobInfo (query-jobs)."""
        with self._cond:
            out: dict[str, Any] = {"id": self.id, "type": self.job_type, "status": self.status.value,
                                   "current-progress": self.current_progress,
                                   "total-progress": self.total_progress}
            if self.error is not None:
                out["error"] = self.error
            return out

    # -- verbs (any thread) -------------------------------------------------------------------------------
    def _apply_verb(self, verb: str) -> None:
        if self.status not in VERBS[verb]:
            raise JobError(f"Job '{self.id}' in state '{self.status.value}' cannot accept command verb '{verb}'")

    def start(self) -> None:
        """Run the job on its own thread (created -> running)."""
        with self._cond:
            if self.status is not JobStatus.CREATED or self._thread is not None:
                raise AssertionError(f"job '{self.id}' started twice")
            self.busy = True
            self._transition(JobStatus.RUNNING)  # synchronously, as QEMU's job_start: a cancel now unwinds run()
            self._thread = threading.Thread(target=self._main, name=f"job {self.id}", daemon=True)
            self._thread.start()

    def user_pause(self) -> None:
        with self._cond:
            self._apply_verb("pause")
            if self.user_paused:
                raise JobError("Job is already paused")
            self.user_paused = True
            self._pause()

    def user_resume(self) -> None:
        with self._cond:
            self._apply_verb("resume")
            if not self.user_paused or self._pause_count <= 0:
                raise JobError("Can't resume a job that was not paused")
            self.user_paused = False
            self._resume()

    def _pause(self) -> None:
        with self._cond:
            self._pause_count += 1
            self._wakeups += 1
            self._cond.notify_all()

    def _resume(self) -> None:
        with self._cond:
            self._pause_count = max(0, self._pause_count - 1)
            self._wakeups += 1
            self._cond.notify_all()

    def set_speed(self, speed: int) -> None:
        with self._cond:
            self._apply_verb("set-speed")
            check_speed(speed)
            self.speed = speed
            self._tokens = 0.0  # a new rate starts a new slice, as QEMU's ratelimit_set_speed
            self._refill_at = time.monotonic()
            self._wakeups += 1
            self._cond.notify_all()

    def user_complete(self) -> None:
        with self._cond:
            self._apply_verb("complete")
            if self._cancelled:
                raise JobError(f"The active block job '{self.id}' cannot be completed")
        self.complete()

    def cancel(self, *, force: bool = False) -> None:
        """QEMU's job_user_cancel: a created job is aborted at once, a pending one too, a running one
        unwinds at its next pause point (a paused one is resumed so that it can)."""
        with self._cond:
            self._apply_verb("cancel")
            status = self.status
            self._cancelled = True
            self._force = self._force or force
            if self.user_paused:
                self.user_paused = False
                self._pause_count = max(0, self._pause_count - 1)
            self._wakeups += 1
            self._cond.notify_all()
        if status in (JobStatus.CREATED, JobStatus.PENDING):  # no worker will notice: abort here
            self._abort_path(cancelled=True)

    def finalize(self) -> None:
        with self._cond:
            self._apply_verb("finalize")
        if self.txn is not None:
            self.txn.finalize()
        else:
            self._finalize()

    def dismiss(self) -> None:
        with self._cond:
            self._apply_verb("dismiss")
        self._dismiss()

    def drop(self) -> None:
        """A created job that will never start (its setup failed): created -> null."""
        with self._cond:
            if self.status is JobStatus.CREATED and self._thread is None:
                self._done.set()
                self._dismiss()

    def add_null_callback(self, callback: Callable[["Job"], None]) -> None:
        """``callback(job)`` once the job reaches null (the manager forgets it)."""
        self._on_null.append(callback)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is concluded (or dropped); True if it is."""
        return self._done.wait(timeout)

    def join_worker(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- worker-side helpers -----------------------------------------------------------------------------------
    def pause_point(self) -> None:
        """Where the job may pause or be cancelled: blocks while paused; raises JobCancelled if cancelled."""
        with self._cond:
            if self._cancelled:
                raise JobCancelled()
            if self._pause_count > 0:
                before = self.status
                self._transition(JobStatus.STANDBY if before is JobStatus.READY else JobStatus.PAUSED)
                self.busy = False
                while self._pause_count > 0 and not self._cancelled:
                    self._cond.wait()
                self.busy = True
                self._transition(before)
            if self._cancelled:
                raise JobCancelled()

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``; returns early when the job is paused, cancelled or its speed changes.
        Never raises by itself: the caller's next pause point does."""
        deadline = time.monotonic() + seconds
        with self._cond:
            generation = self._wakeups
            self.busy = False
            try:
                while not self._cancelled and self._wakeups == generation:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self.busy = True

    def rate_limit(self, nbytes: int) -> None:
        """Charge ``nbytes`` to the job's speed (a token bucket with a 100 ms burst, like QEMU's slices) and
        sleep off any debt, re-checking pause/cancel/set-speed while sleeping."""
        while True:
            with self._cond:
                speed = self.speed
                now = time.monotonic()
                if speed <= 0:
                    self._tokens = 0.0
                    self._refill_at = now
                    return
                self._tokens = min(self._tokens + (now - self._refill_at) * speed, speed * _RATE_SLICE)
                self._refill_at = now
                if nbytes:
                    self._tokens -= nbytes
                    nbytes = 0
                if self._tokens >= 0:
                    return
                delay = -self._tokens / speed
            self.sleep(delay)
            self.pause_point()

    def set_ready(self) -> None:
        """running -> ready (BLOCK_JOB_READY): the job waits for ``job-complete``."""
        with self._cond:
            self._transition(JobStatus.READY)
        self.event_ready()

    def wait_until_cancelled(self) -> None:
        """Idle until cancelled (a sync=none backup), pausing when asked."""
        while True:
            self.pause_point()
            with self._cond:
                generation = self._wakeups
                self.busy = False
                while not self._cancelled and self._wakeups == generation:
                    self._cond.wait()
                self.busy = True

    # -- completion ----------------------------------------------------------------------------------------
    def _main(self) -> None:
        failure: str | None = None
        cancelled = False
        try:
            self.run()
            with self._cond:
                cancelled = self._cancelled and self._force  # a forced cancel after the last point still aborts
        except JobCancelled:
            cancelled = True
        except BaseException as exc:  # noqa: B902 - any failure of run() is the job's error, never a crash
            failure = error_text(exc)
        finally:
            self.busy = False
        with self._cond:
            if self._cancelled and failure is None:
                cancelled = True
        if failure is None and not cancelled:
            with self._cond:
                self._transition(JobStatus.WAITING)
            if self.txn is not None:
                self.txn.member_waiting(self)  # pending (and finalized) together with the others
            else:
                self._enter_pending()
            return
        with self._cond:
            self.error = "Operation canceled" if cancelled and failure is None else failure
        self._abort_path(cancelled=cancelled and failure is None)

    def _enter_pending(self, *, finalize: bool | None = None) -> None:
        """waiting -> pending, then finalize (auto-finalize) or wait for ``job-finalize``; a cancel that came
        after the last pause point aborts instead. ``finalize`` overrides auto-finalize (a group decides)."""
        with self._cond:
            if self._cancelled:
                self.error = "Operation canceled"
            else:
                self._transition(JobStatus.PENDING)
        if self.status is JobStatus.WAITING:
            self._abort_path(cancelled=True)
        elif self.auto_finalize if finalize is None else finalize:
            self._finalize()
        elif not self.auto_finalize:  # QEMU: BLOCK_JOB_PENDING only for jobs that wait for job-finalize
            self.event_pending()

    def _claim_end(self) -> bool:
        """Only one of finalize/abort may run, once (a cancel can race the worker's auto-finalize)."""
        with self._cond:
            if self._ending:
                return False
            self._ending = True
            return True

    def _finalize(self) -> None:
        if not self._claim_end():
            return
        try:
            self.prepare()
        except BaseException as exc:  # noqa: B902 - a failed prepare aborts the job
            with self._cond:
                self.error = error_text(exc)
            self._abort_path(cancelled=False, claimed=True)
            return
        try:
            self.commit()
        finally:
            self.clean()
        self.event_finished(cancelled=False)
        self._transition(JobStatus.CONCLUDED)
        self._done.set()
        if self.auto_dismiss:
            self._dismiss()

    def _abort_path(self, *, cancelled: bool, claimed: bool = False) -> None:
        if not claimed and not self._claim_end():
            return
        if self.txn is not None:
            self.txn.abort(self)  # one member failing or cancelled cancels the rest of its group
        with self._cond:
            if self.error is None:
                self.error = "Operation canceled"
            self._transition(JobStatus.ABORTING)
        try:
            self.abort()
        finally:
            self.clean()
        self.event_finished(cancelled=cancelled)
        self._transition(JobStatus.CONCLUDED)
        self._done.set()
        if self.auto_dismiss:
            self._dismiss()

    def _dismiss(self) -> None:
        self._transition(JobStatus.NULL)
        for callback in list(self._on_null):
            callback(self)


def check_speed(speed: int) -> None:
    if speed < 0:
        raise JobError("Parameter 'speed' expects a non-negative value")


class JobTxn:
    """QEMU's JobTxn: the jobs of one ``transaction`` with ``completion-mode=grouped``.

    They complete together: a member that finished its work waits (state ``waiting``) until every member
    has; then all go ``pending`` and are finalized together -- at once when every member has auto-finalize,
    else when ``job-finalize`` names any of them. One member failing or being cancelled cancels all the
    others (they report BLOCK_JOB_CANCELLED), so a group of backups either all succeed or none does.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.jobs: list[Job] = []
        self.aborted = False
        self._pending = False
        self._finalized = False

    def add(self, job: Job) -> None:
        with self._lock:
            job.txn = self
            self.jobs.append(job)

    def member_waiting(self, job: Job) -> None:
        with self._lock:
            ready = not self.aborted and not self._pending and \
                all(member.status is JobStatus.WAITING for member in self.jobs)
            if ready:
                self._pending = True  # exactly one member moves the group on
        if self.aborted:
            job._abort_path(cancelled=True)
            return
        if not ready:
            return
        auto = all(member.auto_finalize for member in self.jobs)
        for member in list(self.jobs):
            member._enter_pending(finalize=False)
        if auto:
            self.finalize()

    def finalize(self) -> None:
        """Finalize every member once all are pending (QEMU's job_do_finalize over the group)."""
        with self._lock:
            if self._finalized or self.aborted or \
                    not all(member.status is JobStatus.PENDING for member in self.jobs):
                return
            self._finalized = True
        for member in list(self.jobs):
            member._finalize()

    def abort(self, origin: Job) -> None:
        with self._lock:
            if self.aborted or self._finalized:
                return
            self.aborted = True
            others = [member for member in self.jobs if member is not origin]
        for member in others:
            with member._cond:
                member._cancelled = True
                member._force = True
                member._pause_count = 0
                member.user_paused = False
                member._wakeups += 1
                member._cond.notify_all()
                idle = member.status in (JobStatus.CREATED, JobStatus.WAITING, JobStatus.PENDING)
            if idle:  # no worker of its own will notice the cancel
                member._abort_path(cancelled=True)


class JobManager:
    """The jobs of one VM: unique ids, lookup with QEMU's messages, and shutdown."""

    def __init__(self, emit: EventSink) -> None:
        self.emit = emit
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[Job]:
        with self._lock:
            return iter(list(self._jobs.values()))

    def check_new_id(self, job_id: str) -> None:
        check_job_id(job_id)
        with self._lock:
            if job_id in self._jobs:
                raise JobError(f"Job ID '{job_id}' already in use")

    def add(self, job: Job) -> Job:
        """Register a created job (refused if its id is taken); it leaves when it reaches null."""
        with self._lock:
            if job.id in self._jobs:
                raise JobError(f"Job ID '{job.id}' already in use")
            self._jobs[job.id] = job
        job.add_null_callback(self._forget)
        return job

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def get_block_job(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or not job.is_block_job:
            raise JobError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    def cancel_all(self, timeout: float = 30.0) -> None:
        """VM shutdown: force-cancel every live job and wait for its worker, so no job touches a node after
        the block graph closes (QEMU's job_cancel_sync_all)."""
        for job in list(self):
            try:
                job.cancel(force=True)
            except JobError:
                pass  # already finishing (waiting/aborting/concluded): just wait for it below
        deadline = time.monotonic() + timeout
        for job in list(self):
            job.join_worker(max(0.0, deadline - time.monotonic()))


__all__ = ["Job", "JobCancelled", "JobError", "JobFailed", "JobManager", "JobStatus", "TRANSITIONS", "VERBS",
           "check_job_id", "check_speed", "error_text"]
