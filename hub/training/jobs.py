"""Background training jobs for ``POST /jobs``: a queue, a worker thread, status, log, result.

Jobs live in the hub process's memory: the model version a job registers is in the
registry for good, but the job's own record (status, log) is gone after a restart. One
job trains at a time; the others wait queued, since two trainings on the same cores
would only slow each other down.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hub.training.errors import SpecError, TrainingCancelled, TrainingError
from hub.training.spec import parse_spec

if TYPE_CHECKING:
    from hub.config import HubSettings

__all__ = ["Job", "JobManager", "JobStatus"]

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
MAX_LOG_LINES = 2000
MAX_JOBS = 200


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Job:
    """One training job; its fields change as it runs (guarded by the manager's lock)."""

    id: str
    task: str
    base_dir: Path
    dry_run: bool
    actor: str
    model: str
    status: JobStatus = "queued"
    created_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES))
    result: dict[str, Any] | None = None
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def snapshot(self) -> dict[str, Any]:
        """Return the job as JSON-able data."""
        return {
            "id": self.id,
            "model": self.model,
            "status": self.status,
            "dry_run": self.dry_run,
            "actor": self.actor,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "log": list(self.log),
            "result": self.result,
            "error": self.error,
        }


class JobManager:
    """Accepts task files, runs them one at a time on a worker thread, keeps their records."""

    def __init__(self, settings: HubSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._closed = False

    def submit(self, task: str, *, base_dir: Path | None = None, dry_run: bool = False, actor: str = "api") -> Job:
        """Check the task file now (SpecError names the field) and queue the job."""
        base = base_dir or self._settings.data_dir / "datasets"
        spec = parse_spec(task, source="task", base_dir=base)
        job = Job(
            id=uuid.uuid4().hex[:16], task=task, base_dir=base, dry_run=dry_run, actor=actor, model=spec.publish.model
        )
        with self._lock:
            if self._closed:
                raise TrainingError("the job manager is shut down")
            self._forget_old()
            self._jobs[job.id] = job
            self._queue.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="training-jobs", daemon=True)
                self._worker.start()
            self._wake.notify()
        job.log.append(f"queued: {spec.task} -> model {spec.publish.model}")
        return job

    def get(self, job_id: str) -> Job | None:
        """Return the job, or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        """Return every job, newest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> Job | None:
        """Ask a job to stop: a queued one never starts, a running one stops at the next batch."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            job.cancel.set()
            if job.status == "queued":
                self._queue.remove(job)
                job.status, job.finished_at = "cancelled", _now()
                job.log.append("cancelled before it started")
            return job

    def close(self) -> None:
        """Cancel everything and stop the worker."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                job.cancel.set()
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.status in ("succeeded", "failed", "cancelled")]
        for job in sorted(finished, key=lambda j: j.created_at)[: max(0, len(self._jobs) - MAX_JOBS + 1)]:
            del self._jobs[job.id]

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                job.status, job.started_at = "running", _now()
            self._execute(job)

    def _execute(self, job: Job) -> None:
        from hub.training.job import run_training
        from hub.training.progress import LogProgress

        status: JobStatus = "failed"
        try:
            summary = run_training(
                job.task,
                self._settings,
                base_dir=job.base_dir,
                dry_run=job.dry_run,
                progress=LogProgress(sink=job.log.append),
                cancel=job.cancel,
                actor=job.actor,
            )
            job.result = summary.to_dict()
            status = "succeeded"
        except TrainingCancelled:
            job.error = "cancelled"
            status = "cancelled"
        except (TrainingError, SpecError) as exc:
            job.error = str(exc)
        except Exception as exc:  # a job's failure is reported in the job, never kills the worker
            logger.exception("training job %s failed", job.id)
            job.error = f"{type(exc).__name__}: {exc}"
        if job.cancel.is_set() and status == "failed":
            status, job.error = "cancelled", "cancelled"
        with self._lock:
            job.status, job.finished_at = status, _now()
        job.log.append(f"{status}" + (f": {job.error}" if job.error else ""))
