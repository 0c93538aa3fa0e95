"""Training jobs: submit a task file, follow its status and log, read its result, cancel it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field

from hub.api.deps import Operator, Viewer
from hub.errors import InvalidInputError, NotFoundError

router = APIRouter(tags=["jobs"])


class JobCreate(BaseModel):
    """A training job: the task file's YAML text."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=256 * 1024, description="the task file (YAML)")
    base_dir: str | None = Field(
        default=None, description="hub-side folder that relative data paths start from; default <data_dir>/datasets"
    )
    dry_run: bool = Field(default=False, description="check the task file and data; train nothing")


class JobPublic(BaseModel):
    """A training job's state."""

    id: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    dry_run: bool
    actor: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    log: list[str]
    result: dict[str, Any] | None = Field(description="the summary: model, version, test_metric, cv_score, ...")
    error: str | None


def _jobs(request: Request) -> Any:
    """Return the app's job manager, made on first use (training is optional in a hub)."""
    from hub.training.jobs import JobManager

    manager = getattr(request.app.state, "jobs", None)
    if manager is None:
        manager = request.app.state.jobs = JobManager(request.app.state.settings)
    return manager


JobsDep = Annotated[Any, Depends(_jobs)]
JobIdPath = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]


@router.post("/jobs", status_code=status.HTTP_202_ACCEPTED)
def create_job(body: JobCreate, caller: Operator, jobs: JobsDep) -> JobPublic:
    """Check a task file and queue it for training, build and registration."""
    from hub.training.errors import SpecError

    try:
        job = jobs.submit(
            body.task,
            base_dir=FilePath(body.base_dir) if body.base_dir else None,
            dry_run=body.dry_run,
            actor=caller.actor,
        )
    except SpecError as exc:
        raise InvalidInputError(str(exc)) from exc
    return JobPublic.model_validate(job.snapshot())


@router.get("/jobs")
def list_jobs(caller: Viewer, jobs: JobsDep) -> list[JobPublic]:
    """List training jobs, newest first."""
    return [JobPublic.model_validate(j.snapshot()) for j in jobs.list()]


@router.get("/jobs/{job_id}")
def get_job(job_id: JobIdPath, caller: Viewer, jobs: JobsDep) -> JobPublic:
    """Return a job's status, log and result."""
    job = jobs.get(job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return JobPublic.model_validate(job.snapshot())


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: JobIdPath, caller: Operator, jobs: JobsDep) -> JobPublic:
    """Stop a job: a queued one never starts, a running one stops at its next batch."""
    job = jobs.cancel(job_id)
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    return JobPublic.model_validate(job.snapshot())
