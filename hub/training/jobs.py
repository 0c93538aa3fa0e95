"""Training jobs as database rows: submit, list, cancel, and the workers' side of the queue.

A job is ``queued`` until a worker claims it (``running``), then ends ``succeeded``,
``failed`` or ``cancelled``. Every change a worker makes is a compare-and-set on
(id, worker, status), so a worker that lost its job (it stopped heartbeating and the job
was handed to another) can never overwrite the new owner's row. Claims are exclusive:
on PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP LOCKED`` so workers
skip each other's picks; on SQLite the database's single writer serialises the claims.

A running job whose heartbeat is older than ``job_lost_after_s`` lost its worker: the
first time it goes back to the queue with the reason in its log, the second time it fails.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import update
from sqlmodel import Session, col, select

from hub.errors import InvalidInputError
from hub.models import TrainingData, TrainingJob, utcnow
from hub.training.spec import parse_spec

if TYPE_CHECKING:
    from hub.config import HubSettings

__all__ = [
    "FINISHED",
    "MAX_HELPERS",
    "JobStatus",
    "append_log",
    "claim",
    "finish",
    "get_job",
    "has_queued",
    "heartbeat",
    "join_search",
    "leave_search",
    "list_jobs",
    "note_waiting",
    "open_search",
    "reap_lost",
    "release",
    "request_cancel",
    "snapshot",
    "submit",
]

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled")
MAX_LINE = 2000  # characters of one log line
MAX_HELPERS = 8  # workers that may join one job's search besides its owner
NO_GPU_NOTE = "waiting for a worker where torch sees a GPU (resource.require_gpu); none has claimed it yet"


def append_log(log: Sequence[str], lines: Sequence[str], limit: int) -> list[str]:
    """Return `log` with `lines` added, each cut to MAX_LINE characters, keeping the last `limit`."""
    out = [*log, *(line if len(line) <= MAX_LINE else line[: MAX_LINE - 1] + "…" for line in lines)]
    return out[-limit:]


def snapshot(job: TrainingJob) -> dict[str, Any]:
    """Return the job as JSON-able data (the API's JobPublic)."""
    return {
        "id": job.id,
        "model": job.model,
        "status": job.status,
        "dry_run": job.dry_run,
        "actor": job.actor,
        "resource": job.resource,
        "note": job.note,
        "worker": job.worker,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "heartbeat_at": job.heartbeat_at,
        "finished_at": job.finished_at,
        "progress": job.progress,
        "log": list(job.log),
        "result": job.result,
        "error": job.error,
        "version": job.version,
    }


def submit(
    session: Session,
    settings: HubSettings,
    task: str,
    *,
    base_dir: Path | None = None,
    data_id: str | None = None,
    dry_run: bool = False,
    actor: str = "api",
) -> TrainingJob:
    """Check the task file now (SpecError names the field and line) and queue the job."""
    if data_id is not None and session.get(TrainingData, data_id) is None:
        raise InvalidInputError(f"data: no uploaded archive {data_id}")
    # With an archive, relative paths are checked against it by the worker that unpacks it.
    base = base_dir or settings.data_dir / "datasets"
    spec = parse_spec(task, source="task", base_dir=base)
    resource = "cuda" if spec.resource.require_gpu else "cpu"
    job = TrainingJob(
        id=uuid.uuid4().hex[:16],
        model=spec.publish.model,
        task=task,
        base_dir=str(base_dir) if base_dir is not None else None,
        data_id=data_id,
        dry_run=dry_run,
        actor=actor,
        resource=resource,
        log=[f"queued: {spec.task} -> model {spec.publish.model} ({resource})"],
    )
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def get_job(session: Session, job_id: str) -> TrainingJob | None:
    """Return the job, or None."""
    return session.get(TrainingJob, job_id)


def list_jobs(session: Session, limit: int = 200) -> list[TrainingJob]:
    """Return the newest jobs first."""
    stmt = select(TrainingJob).order_by(col(TrainingJob.created_at).desc(), col(TrainingJob.id)).limit(limit)
    return list(session.exec(stmt).all())


def request_cancel(session: Session, settings: HubSettings, job_id: str) -> TrainingJob | None:
    """Cancel a job: a queued one never starts; a running one's worker stops it at its next heartbeat."""
    job = session.get(TrainingJob, job_id)
    if job is None:
        return None
    if job.status == "queued":
        now = utcnow()
        done = _cas(
            session,
            job_id,
            {"status": "queued"},
            status="cancelled",
            cancel_requested=True,
            finished_at=now,
            log=append_log(job.log, ["cancelled before it started"], settings.job_log_lines),
        )
        if not done:  # a worker claimed it meanwhile: ask that worker
            _cas(session, job_id, {"status": "running"}, cancel_requested=True)
    elif job.status == "running":
        _cas(session, job_id, {"status": "running"}, cancel_requested=True)
    session.expire_all()
    return session.get(TrainingJob, job_id)


def has_queued(session: Session) -> bool:
    """Return True when any job waits in the queue."""
    found = session.exec(select(TrainingJob.id).where(col(TrainingJob.status) == "queued").limit(1)).first()
    session.rollback()
    return found is not None


def claim(session: Session, worker: str, *, gpu: bool, limit: int) -> TrainingJob | None:
    """Take the oldest queued job this worker can run (``cuda`` ones only with a GPU), or None."""
    allowed = ["cpu", "cuda"] if gpu else ["cpu"]
    stmt = (
        select(TrainingJob)
        .where(col(TrainingJob.status) == "queued", col(TrainingJob.resource).in_(allowed))
        .order_by(col(TrainingJob.created_at), col(TrainingJob.id))
        .limit(1)
        .with_for_update(skip_locked=True)  # PostgreSQL: skip rows another worker is claiming
    )
    for _ in range(3):
        job = session.exec(stmt).first()
        if job is None:
            session.rollback()
            return None
        if session.get_bind().dialect.name == "sqlite":
            # End the read transaction, so the update below starts on the newest snapshot.
            session.rollback()
        now = utcnow()
        taken = _cas(
            session,
            job.id,
            {"status": "queued"},
            status="running",
            worker=worker,
            note="",
            attempts=job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            progress={},
            log=append_log(job.log, [f"claimed by worker {worker} (attempt {job.attempts + 1})"], limit),
        )
        if taken:
            session.expire_all()
            return session.get(TrainingJob, job.id)
    return None


def note_waiting(session: Session, worker: str, *, gpu: bool) -> None:
    """Say in queued ``cuda`` jobs why they wait, when this worker cannot run them."""
    if gpu:
        return
    stmt = (
        update(TrainingJob)
        .where(
            col(TrainingJob.status) == "queued",
            col(TrainingJob.resource) == "cuda",
            col(TrainingJob.note) != NO_GPU_NOTE,
        )
        .values(note=NO_GPU_NOTE)
    )
    session.execute(stmt)
    session.commit()


def heartbeat(
    session: Session, job_id: str, worker: str, *, progress: dict[str, Any], lines: Sequence[str], limit: int
) -> bool | None:
    """Record that `worker` still runs the job, add log `lines`; return whether cancel was asked.

    None means the job is no longer this worker's (it was re-queued or finished meanwhile).
    """
    owned = {"status": "running", "worker": worker}
    if not _cas(session, job_id, owned, commit=False, heartbeat_at=utcnow(), progress=progress):
        session.rollback()
        return None
    cancel = _append(session, job_id, lines, limit)
    session.commit()
    return cancel


def finish(
    session: Session,
    job_id: str,
    worker: str,
    *,
    status: JobStatus,
    lines: Sequence[str],
    limit: int,
    progress: dict[str, Any],
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """Mark the job ended, add log `lines`; False when it is no longer this worker's."""
    version = None if result is None else result.get("version")
    owned = {"status": "running", "worker": worker}
    values = {"result": result, "error": error, "version": version, "progress": progress, "study_name": None}
    if not _cas(session, job_id, owned, commit=False, status=status, finished_at=utcnow(), **values):
        session.rollback()
        return False
    _append(session, job_id, lines, limit)
    session.commit()
    return True


def release(session: Session, job_id: str, worker: str, *, reason: str, lines: Sequence[str], limit: int) -> bool:
    """Put a job back in the queue because its worker stops (not counted as a loss)."""
    owned = {"status": "running", "worker": worker}
    values: dict[str, Any] = {"worker": None, "heartbeat_at": None, "study_name": None}
    if not _cas(session, job_id, owned, commit=False, status="queued", **values):
        session.rollback()
        return False
    _append(session, job_id, [*lines, f"re-queued: {reason}"], limit)
    session.commit()
    return True


def reap_lost(session: Session, settings: HubSettings, *, now: datetime | None = None) -> list[str]:
    """Re-queue (the first time) or fail (the second) running jobs whose worker went silent."""
    cutoff = (now or utcnow()) - timedelta(seconds=settings.job_lost_after_s)
    stale = session.exec(
        select(TrainingJob).where(col(TrainingJob.status) == "running", col(TrainingJob.heartbeat_at) < cutoff)
    ).all()
    session.rollback()
    handled: list[str] = []
    for job in stale:
        silent = (now or utcnow()) - (job.heartbeat_at or job.created_at)
        reason = f"worker {job.worker} stopped heartbeating (silent for {silent.total_seconds():.0f} s)"
        expect = {"status": "running", "worker": job.worker, "heartbeat_at": job.heartbeat_at}
        if job.losses == 0:
            done = _cas(
                session,
                job.id,
                expect,
                status="queued",
                worker=None,
                losses=1,
                heartbeat_at=None,
                study_name=None,
                log=append_log(job.log, [f"{reason}; re-queued"], settings.job_log_lines),
            )
        else:
            error = f"{reason}, the second time this job lost its worker; failed"
            done = _cas(
                session,
                job.id,
                expect,
                status="failed",
                losses=job.losses + 1,
                error=error,
                finished_at=utcnow(),
                study_name=None,
                log=append_log(job.log, [error], settings.job_log_lines),
            )
        if done:
            logger.warning("job %s: %s", job.id, reason)
            handled.append(job.id)
    return handled


def open_search(session: Session, job_id: str, worker: str, study_name: str | None) -> bool:
    """Let other workers join (a study name) or no longer join (None) the job's search."""
    return _cas(session, job_id, {"status": "running", "worker": worker}, study_name=study_name)


def join_search(session: Session, worker: str) -> TrainingJob | None:
    """Join the search of a running job that another worker owns; None when none is open."""
    stmt = (
        select(TrainingJob)
        .where(
            col(TrainingJob.status) == "running",
            col(TrainingJob.study_name).is_not(None),
            col(TrainingJob.worker) != worker,
            col(TrainingJob.helpers) < MAX_HELPERS,
        )
        .order_by(col(TrainingJob.helpers), col(TrainingJob.created_at))
        .limit(1)
    )
    job = session.exec(stmt).first()
    session.rollback()
    if job is None:
        return None
    if not _cas(session, job.id, {"status": "running", "helpers": job.helpers}, helpers=job.helpers + 1):
        return None
    session.expire_all()
    return session.get(TrainingJob, job.id)


def leave_search(session: Session, job_id: str, lines: Sequence[str], limit: int) -> None:
    """Say in the job's log what a helper did, and free its helper slot."""
    stmt = update(TrainingJob).where(col(TrainingJob.id) == job_id).values(helpers=TrainingJob.helpers - 1)
    session.execute(stmt)
    _append(session, job_id, lines, limit)
    session.commit()


def _append(session: Session, job_id: str, lines: Sequence[str], limit: int) -> bool:
    """Add `lines` to the job's log inside the caller's transaction; return its cancel flag.

    The caller has already written the row in this transaction, so it holds the row's lock
    (PostgreSQL) or the database's write lock (SQLite): nobody else's lines get lost.
    """
    row = session.execute(
        select(TrainingJob.log, TrainingJob.cancel_requested).where(col(TrainingJob.id) == job_id)
    ).first()
    if row is None:
        return False
    log, cancel = row
    if lines:
        session.execute(
            update(TrainingJob).where(col(TrainingJob.id) == job_id).values(log=append_log(log, lines, limit))
        )
    return bool(cancel)


def _cas(session: Session, job_id: str, expect: dict[str, Any], *, commit: bool = True, **values: Any) -> bool:
    """Update the job only if its columns still hold `expect`; return whether it did."""
    conditions = [col(TrainingJob.id) == job_id]
    for name, value in expect.items():
        column = getattr(TrainingJob, name)
        conditions.append(col(column).is_(None) if value is None else col(column) == value)
    result = session.execute(update(TrainingJob).where(*conditions).values(**values))
    if commit:
        session.commit()
    return bool(getattr(result, "rowcount", 0) == 1)
