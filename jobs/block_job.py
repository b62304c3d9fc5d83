"""What every *block* job adds to a :class:`~pyemu.jobs.job.Job`: QEMU's BLOCK_JOB_* events and its
BlockJobInfo (``query-block-jobs``), one implementation for backup, stream, mirror and commit.

A job mixes :class:`BlockJobEvents` in before :class:`~pyemu.jobs.job.Job` and overrides
:meth:`BlockJobEvents._update_progress` when its progress is computed lazily (backup's BlockCopy counters).
"""

from __future__ import annotations

import errno
from typing import Any

from pyemu.jobs.job import Job


def error_action(policy: str, err: int) -> str:
    """QEMU's block_job_error_action: the action an on-*-error policy takes for an errno (enospc/auto stop
    only on ENOSPC)."""
    if policy in ("enospc", "auto"):
        return "stop" if err == errno.ENOSPC else "report"
    return policy


class BlockJobEvents(Job):
    """BLOCK_JOB_COMPLETED/CANCELLED/PENDING/READY with QEMU's data, and BlockJobInfo."""

    is_block_job = True
    io_status = "ok"

    def apply_error_policy(self, policy: str, *, read: bool, err: int) -> str:
        """An I/O error under an on-*-error ``policy``: BLOCK_JOB_ERROR, and for ``stop`` the job pauses as a
        user pause (io-status failed/nospace; ``job-resume`` retries). Returns the action taken."""
        action = error_action(policy, err)
        self._emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": "read" if read else "write",
                                       "action": action})
        if action == "stop":
            with self._cond:
                self.io_status = "nospace" if err == errno.ENOSPC else "failed"
                self.user_paused = True
                self._pause()
        return action

    def user_resume(self) -> None:
        with self._cond:
            super().user_resume()
            self.io_status = "ok"

    def _update_progress(self) -> None:
        """Refresh ``current_progress`` (jobs that count elsewhere override this)."""

    def _block_event_data(self) -> dict[str, Any]:
        return {"device": self.id, "len": self.total_progress, "offset": self.current_progress,
                "speed": self.speed, "type": self.job_type}

    def event_finished(self, *, cancelled: bool) -> None:
        self._update_progress()
        if cancelled:
            self._emit("BLOCK_JOB_CANCELLED", self._block_event_data())
            return
        data = self._block_event_data()
        if self.error is not None:
            data["error"] = self.error
        self._emit("BLOCK_JOB_COMPLETED", data)

    def event_pending(self) -> None:
        self._emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def event_ready(self) -> None:
        self._emit("BLOCK_JOB_READY", self._block_event_data())

    def block_info(self) -> dict[str, Any]:
        """QEMU's BlockJobInfo (query-block-jobs)."""
        if self.status.value in ("running", "paused"):
            self._update_progress()
        with self._cond:
            info: dict[str, Any] = {
                "type": self.job_type, "device": self.id, "len": self.total_progress,
                "offset": self.current_progress, "busy": self.busy, "paused": self.paused,
                "speed": self.speed, "io-status": self.io_status, "ready": self.status.value in ("ready", "standby"),
                "status": self.status.value, "auto-finalize": self.auto_finalize,
                "auto-dismiss": self.auto_dismiss}
            if self.error is not None:
                info["error"] = self.error
            return info

    def info(self) -> dict[str, Any]:
        if self.status.value in ("running", "paused"):
            self._update_progress()
        return super().info()
