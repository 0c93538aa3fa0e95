"""Training jobs: submit a task file, follow its status, progress and log, read its result, cancel it.

Jobs are rows in the hub database (`hub.training.jobs`); ``autodl-hub worker`` processes
run them, so they survive a hub restart. A data archive (tar.gz) uploaded to
``POST /jobs/data`` travels with a job to whichever worker runs it.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field

from hub.api.deps import Operator, SettingsDep, Viewer
from hub.db import SessionDep
from hub.errors import InvalidInputError, NotFoundError, PayloadTooLargeError

router = APIRouter(tags=["jobs"])


class JobCreate(BaseModel):
    """A training job: the task file's YAML text."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=256 * 1024, description="the task file (YAML)")
    base_dir: str | None = Field(
        default=None, description="hub-side folder that relative data paths start from; default <data_dir>/datasets"
    )
    data: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="an archive from POST /jobs/data: relative data paths start in it (instead of base_dir)",
    )
    dry_run: bool = Field(default=False, description="check the task file and data; train nothing")


class JobPublic(BaseModel):
    """A training job's state."""

    id: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    dry_run: bool
    actor: str
    resource: str = Field(description="cpu, or cuda (only workers with a GPU run it)")
    note: str = Field(description="why a queued job waits")
    worker: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    progress: dict[str, Any] = Field(description="phase, trials_done/trials, epoch/epochs, metric, fraction, eta_s")
    log: list[str]
    result: dict[str, Any] | None = Field(description="the summary: model, version, test_metric, cv_score, ...")
    error: str | None
    version: str | None = Field(description="the model version the job registered")


class DataPublic(BaseModel):
    """An uploaded data archive."""

    id: str
    size: int


JobIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]


@router.post("/jobs", status_code=status.HTTP_202_ACCEPTED)
def create_job(body: JobCreate, caller: Operator, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """Check a task file and queue it for training, build and registration."""
    from hub.training import jobs
    from hub.training.errors import SpecError

    try:
        job = jobs.submit(
            session,
            settings,
            body.task,
            base_dir=FilePath(body.base_dir) if body.base_dir else None,
            data_id=body.data,
            dry_run=body.dry_run,
            actor=caller.actor,
        )
    except SpecError as exc:
        raise InvalidInputError(str(exc)) from exc
    return JobPublic.model_validate(jobs.snapshot(job))


@router.post("/jobs/data", status_code=status.HTTP_201_CREATED)
async def upload_data(request: Request, caller: Operator, session: SessionDep, settings: SettingsDep) -> DataPublic:
    """Upload a data archive (tar or tar.gz body) for jobs; absolute paths and '..' are refused."""
    from hub.training.archive import store_archive

    limit = settings.max_job_data_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"data archive larger than {limit} bytes")
        chunks.append(chunk)
    data = store_archive(session, b"".join(chunks), limit=limit, actor=caller.actor)
    return DataPublic(id=data.id, size=data.size)


@router.get("/jobs")
def list_jobs(caller: Viewer, session: SessionDep) -> list[JobPublic]:
    """List training jobs, newest first."""
    from hub.training import jobs

    return [JobPublic.model_validate(jobs.snapshot(j)) for j in jobs.list_jobs(session)]


@router.get("/jobs/{job_id}")
def get_job(job_id: JobIdPath, caller: Viewer, session: SessionDep) -> JobPublic:
    """Return a job's status, progress, log and result."""
    from hub.training import jobs

    job = jobs.get_job(session, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return JobPublic.model_validate(jobs.snapshot(job))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: JobIdPath, caller: Operator, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """Stop a job: a queued one never starts, a running one stops within a heartbeat or two."""
    from hub.training import jobs

    job = jobs.request_cancel(session, settings, job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return JobPublic.model_validate(jobs.snapshot(job))
