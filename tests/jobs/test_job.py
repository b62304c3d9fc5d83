"""The job framework (pyemu.jobs.job) with a fake job: QEMU 7.2's state machine, verbs and event sequences.

The expected sequences were recorded from qemu-storage-daemon 7.2 running backup jobs (minus QEMU's
paused/running pair right after the start, which comes from its drain; see the module doc of job.py).
Waits are event waits with generous timeouts; nothing asserts on timing."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pyemu.testing.job_events import JobEventLog
from pyemu.jobs.job import TRANSITIONS, VERBS, Job, JobError, JobFailed, JobManager, JobStatus, JobTxn

TIMEOUT = 30.0


Recorder = JobEventLog


class FakeJob(Job):
    """Works in ``steps`` chunks of ``chunk`` bytes; fails at step ``fail_at``; never finishes if
    ``forever``."""

    job_type = "backup"

    def __init__(self, job_id: str, emit: Any, *, steps: int = 3, chunk: int = 1000, fail_at: int = -1,
                 forever: bool = False, **kw: Any) -> None:
        super().__init__(job_id, emit=emit, **kw)
        self.steps, self.chunk, self.fail_at, self.forever = steps, chunk, fail_at, forever
        self.total_progress = steps * chunk
        self.gate = threading.Event()
        self.gate.set()
        self.done_steps = 0
        self.hooks: list[str] = []

    def run(self) -> None:
        step = 0
        while self.forever or step < self.steps:
            self.pause_point()
            self.gate.wait(TIMEOUT)
            if step == self.fail_at:
                raise JobFailed("Input/output error")
            self.current_progress = min(self.total_progress, self.current_progress + self.chunk)
            self.done_steps += 1
            step += 1
            self.rate_limit(self.chunk)

    def commit(self) -> None:
        self.hooks.append("commit")

    def abort(self) -> None:
        self.hooks.append("abort")

    def clean(self) -> None:
        self.hooks.append("clean")

    def event_finished(self, *, cancelled: bool) -> None:
        self._emit("BLOCK_JOB_CANCELLED" if cancelled else "BLOCK_JOB_COMPLETED", {"error": self.error})

    def event_pending(self) -> None:
        self._emit("BLOCK_JOB_PENDING", {"id": self.id})


def test_tables_are_qemus() -> None:
    S = JobStatus
    assert TRANSITIONS[S.CREATED] == {S.RUNNING, S.ABORTING, S.NULL}
    assert TRANSITIONS[S.RUNNING] == {S.PAUSED, S.READY, S.WAITING, S.ABORTING}
    assert TRANSITIONS[S.PAUSED] == {S.RUNNING}
    assert TRANSITIONS[S.READY] == {S.STANDBY, S.WAITING, S.ABORTING}
    assert TRANSITIONS[S.PENDING] == {S.ABORTING, S.CONCLUDED}
    assert TRANSITIONS[S.CONCLUDED] == {S.NULL} and TRANSITIONS[S.NULL] == set()
    live = {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY}
    assert VERBS["cancel"] == live | {S.WAITING, S.PENDING}
    assert VERBS["pause"] == VERBS["resume"] == VERBS["set-speed"] == live
    assert VERBS["complete"] == {S.READY, S.STANDBY}
    assert VERBS["finalize"] == {S.PENDING} and VERBS["dismiss"] == {S.CONCLUDED}


def test_auto_success_sequence() -> None:
    rec = Recorder()
    manager = JobManager(rec)
    job = manager.add(FakeJob("j", rec))
    job.start()
    rec.wait_status("j", "null")
    assert rec.names() == ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert job.hooks == ["commit", "clean"]
    assert list(manager) == []


def test_manual_finalize_and_dismiss_and_verbs() -> None:
    rec = Recorder()
    manager = JobManager(rec)
    job = manager.add(FakeJob("j1", rec, auto_finalize=False, auto_dismiss=False))
    job.start()
    rec.wait_status("j1", "pending")
    assert rec.names()[-1] == "BLOCK_JOB_PENDING"
    for verb, call, message in (("complete", job.user_complete, None), ("pause", job.user_pause, None),
                                ("dismiss", job.dismiss, None)):
        with pytest.raises(JobError) as info:
            call()
        assert str(info.value) == f"Job 'j1' in state 'pending' cannot accept command verb '{verb}'"
    job.finalize()
    assert job.status is JobStatus.CONCLUDED
    assert manager.get("j1") is job
    with pytest.raises(JobError, match="cannot accept command verb 'finalize'"):
        job.finalize()
    job.dismiss()
    assert rec.statuses("j1")[-3:] == ["pending", "concluded", "null"]
    with pytest.raises(JobError, match="^Job not found$"):
        manager.get("j1")


def test_cancel_pending_job() -> None:
    rec = Recorder()
    job = JobManager(rec).add(FakeJob("j", rec, auto_finalize=False, auto_dismiss=False))
    job.start()
    rec.wait_status("j", "pending")
    job.cancel()
    assert rec.names()[-3:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded"]
    assert job.info()["error"] == "Operation canceled"
    assert job.hooks == ["abort", "clean"]


def test_pause_resume_cancel_flow() -> None:
    rec = Recorder()
    job = JobManager(rec).add(FakeJob("p", rec, forever=True))
    job.start()
    rec.wait_status("p", "running")
    job.user_pause()
    rec.wait_status("p", "paused")
    with pytest.raises(JobError, match="^Job is already paused$"):
        job.user_pause()
    progress = job.current_progress
    time.sleep(0.05)
    assert job.current_progress == progress  # a paused job does no work
    job.user_resume()
    with pytest.raises(JobError, match="^Can't resume a job that was not paused$"):
        job.user_resume()
    job.user_pause()
    job.cancel()  # a paused job is resumed to unwind: running is reported before aborting
    rec.wait_status("p", "null")
    statuses = rec.statuses("p")
    assert statuses[-5:] == ["paused", "running", "aborting", "concluded", "null"]
    assert "BLOCK_JOB_CANCELLED" in rec.names()


def test_failure_sequence_and_error() -> None:
    rec = Recorder()
    job = JobManager(rec).add(FakeJob("f", rec, fail_at=1, auto_dismiss=False))
    job.start()
    rec.wait_status("f", "concluded")
    assert rec.names() == ["created", "running", "aborting", "BLOCK_JOB_COMPLETED", "concluded"]
    assert rec.events[3][1]["error"] == "Input/output error"
    assert job.info() == {"id": "f", "type": "backup", "status": "concluded", "current-progress": 1000,
                          "total-progress": 3000, "error": "Input/output error"}


def test_manager_ids_and_lookup() -> None:
    rec = Recorder()
    manager = JobManager(rec)
    manager.add(FakeJob("a", rec))
    with pytest.raises(JobError, match="^Job ID 'a' already in use$"):
        manager.check_new_id("a")
    with pytest.raises(JobError, match="^Invalid job ID '1bad'$"):
        manager.check_new_id("1bad")
    with pytest.raises(JobError, match="^Invalid job ID ''$"):
        FakeJob("", rec)
    with pytest.raises(JobError) as info:
        manager.get_block_job("a")  # FakeJob is not a block job
    assert (str(info.value), info.value.error_class) == ("Block job 'a' not found", "DeviceNotActive")
    with pytest.raises(JobError, match="non-negative"):
        manager.get("a").set_speed(-1)


def test_cancel_created_job_never_started() -> None:
    rec = Recorder()
    job = JobManager(rec).add(FakeJob("c", rec))
    job.cancel()
    assert rec.statuses("c") == ["created", "aborting", "concluded", "null"]


def test_speed_limits_throughput() -> None:
    """10 KiB/s with 1 KiB chunks: over a generous window far fewer chunks than unlimited."""
    rec = Recorder()
    job = JobManager(rec).add(FakeJob("s", rec, forever=True, chunk=1024, speed=10 * 1024))
    job.start()
    time.sleep(1.0)
    done = job.done_steps
    # 1 s at 10 KiB/s allows ~10 chunks + a 1 KiB burst; unlimited would be many thousands.
    assert done <= 60, done
    job.set_speed(0)  # unlimited: the sleeping job wakes and speeds up
    deadline = time.monotonic() + TIMEOUT
    while job.done_steps < done + 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.done_steps >= done + 1000
    job.cancel()
    rec.wait_status("s", "null")


def test_cancel_interrupts_rate_limit_sleep() -> None:
    rec = Recorder()
    job = JobManager(rec).add(FakeJob("z", rec, forever=True, chunk=1 << 20, speed=1))
    job.start()
    rec.wait_status("z", "running")
    time.sleep(0.05)  # it is now sleeping off 1 MiB at 1 B/s
    job.cancel()
    rec.wait_status("z", "null")  # long before the ~12 days the debt would take


def test_cancel_all_joins_workers() -> None:
    rec = Recorder()
    manager = JobManager(rec)
    jobs = [manager.add(FakeJob(f"w{i}", rec, forever=True)) for i in range(3)]
    for job in jobs:
        job.start()
    manager.cancel_all(timeout=TIMEOUT)
    for job in jobs:
        assert job._thread is not None and not job._thread.is_alive()
        assert job.status is JobStatus.NULL


# -- completion-mode=grouped (JobTxn) ------------------------------------------------------------------------
def grouped(rec: Recorder, *specs: dict[str, Any]) -> list[FakeJob]:
    jobs = [FakeJob(f"g{i}", rec, **spec) for i, spec in enumerate(specs)]
    group = JobTxn()
    for job in jobs:
        group.add(job)
    return jobs


def test_group_members_wait_for_each_other_then_complete_together() -> None:
    rec = Recorder()
    first, second = grouped(rec, {}, {})
    second.gate.clear()  # the second job cannot finish yet
    first.start()
    second.start()
    rec.wait_status("g0", "waiting")
    assert "pending" not in rec.statuses("g0")  # held back: the group is not done
    second.gate.set()
    rec.wait_status("g0", "null")
    rec.wait_status("g1", "null")
    for job in (first, second):
        assert rec.statuses(job.id) == ["created", "running", "waiting", "pending", "concluded", "null"]
        assert job.hooks == ["commit", "clean"]
    assert [n for n in rec.names() if n.startswith("BLOCK_JOB")] == ["BLOCK_JOB_COMPLETED"] * 2


def test_group_member_failure_cancels_the_others() -> None:
    rec = Recorder()
    done, failing, running = grouped(rec, {}, {"fail_at": 1}, {"forever": True})
    for job in (done, failing, running):
        job.start()
    for job in (done, failing, running):
        rec.wait_status(job.id, "null")
    assert failing.error == "Input/output error"
    assert done.error == running.error == "Operation canceled"
    for job in (done, failing, running):
        assert job.hooks == ["abort", "clean"], job.id
        assert "pending" not in rec.statuses(job.id)
    finished = [(n, d["error"]) for n, d in rec.events if n.startswith("BLOCK_JOB")]
    assert sorted(finished) == [("BLOCK_JOB_CANCELLED", "Operation canceled")] * 2 + \
        [("BLOCK_JOB_COMPLETED", "Input/output error")]


def test_group_with_manual_finalize_finalizes_every_member() -> None:
    rec = Recorder()
    first, second = grouped(rec, {"auto_finalize": False}, {})
    first.start()
    second.start()
    rec.wait_status("g0", "pending")
    rec.wait_status("g1", "pending")
    assert [d["id"] for n, d in rec.events if n == "BLOCK_JOB_PENDING"] == ["g0"]  # only the manual one
    second.finalize()  # any member finalizes the whole group
    rec.wait_status("g0", "null")
    rec.wait_status("g1", "null")
    assert first.hooks == second.hooks == ["commit", "clean"]


def test_cancelling_a_pending_group_member_aborts_the_group() -> None:
    rec = Recorder()
    first, second = grouped(rec, {"auto_finalize": False}, {"auto_finalize": False})
    first.start()
    second.start()
    rec.wait_status("g0", "pending")
    rec.wait_status("g1", "pending")
    first.cancel()
    rec.wait_status("g0", "null")
    rec.wait_status("g1", "null")
    assert first.hooks == second.hooks == ["abort", "clean"]
